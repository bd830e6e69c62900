"""Compressed models: ``compress`` to deploy modules, and one safe safetensors file to save and load them."""

from lightning_weightlight.export.compress import CompressionError, compress
from lightning_weightlight.export.serialization import (
    FORMAT_VERSION,
    CompressedFileError,
    load_compressed,
    read_metadata,
    save_compressed,
)

__all__ = [
    "FORMAT_VERSION",
    "CompressedFileError",
    "CompressionError",
    "compress",
    "load_compressed",
    "read_metadata",
    "save_compressed",
]
