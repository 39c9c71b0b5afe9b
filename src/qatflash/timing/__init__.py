"""Timing whose figures can be trusted: per-iteration latency with spread, models compared side by
side in interleaved rounds (latency.py), peak memory of one forward (memory.py), and the backends
a forward can run through (backends.py), registered here by name and imported only when used."""

from qatflash.registry import Registry

TIMING_BACKENDS: Registry = Registry(
    "benchmark.backends entry",
    {
        "torch": "qatflash.timing.backends:TimingBackend",
        "torch_compile": "qatflash.timing.backends:CompiledBackend",
        "onnxruntime": "qatflash.timing.backends:OnnxRuntimeBackend",
    },
    group="qatflash.timing_backends",
)
