"""Deploy modules: ``nn.Linear`` and ``nn.Conv2d`` replacements that run the compiled kernels.

See :mod:`lightning_weightlight.kernels.linear` for the shared contract (``state_dict`` of
tensors only, ``extra_config``/``from_config``, ``to_float``, ``sparsity``, ``pattern``,
``bits``, ``kernel``).
"""

from lightning_weightlight.kernels.conv import Int8Conv2d, SparseConv2d, SparseInt8Conv2d
from lightning_weightlight.kernels.linear import Int8Linear, SparseInt8Linear, SparseLinear

DEPLOY_MODULES = (Int8Linear, SparseLinear, SparseInt8Linear, Int8Conv2d, SparseConv2d, SparseInt8Conv2d)
"""Every deploy module class, for rebuilding a module from its class name and ``extra_config``."""

__all__ = [
    "DEPLOY_MODULES",
    "Int8Conv2d",
    "Int8Linear",
    "SparseConv2d",
    "SparseInt8Conv2d",
    "SparseInt8Linear",
    "SparseLinear",
]
