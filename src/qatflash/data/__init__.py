"""Text-classification data: synthetic task, local files and hub datasets, one DataModule."""

from qatflash.data.datamodule import TextClassificationData

__all__ = ["TextClassificationData"]
