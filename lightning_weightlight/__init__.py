"""lightning-weightlight: pruning, quantization and distillation as PyTorch Lightning callbacks."""

from lightning_weightlight import kernels

__version__ = "0.1.0"

__all__ = ["__version__", "kernels"]
