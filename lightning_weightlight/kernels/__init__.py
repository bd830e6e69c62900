"""Compiled CPU kernels, their pure-PyTorch reference and the deploy modules built on them."""

from lightning_weightlight.kernels.ops import active_isa, has_cpp, quantize_per_row, set_isa

__all__ = ["active_isa", "has_cpp", "quantize_per_row", "set_isa"]
