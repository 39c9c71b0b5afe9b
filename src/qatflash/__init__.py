"""qatflash: decide how to ship a transformer — FP32, PTQ or QAT INT8, which attention kernel, which length."""

__version__ = "0.1.0"
