"""Compiled CPU kernels, their pure-PyTorch reference and the deploy modules built on them."""

from lightning_weightlight.kernels.choice import KERNELS, build_deploy_module, choose_kernel, estimate_kernel
from lightning_weightlight.kernels.layers import (
    DEPLOY_MODULES,
    Int8Conv2d,
    Int8Linear,
    SparseConv2d,
    SparseInt8Conv2d,
    SparseInt8Linear,
    SparseLinear,
)
from lightning_weightlight.kernels.ops import (
    active_isa,
    has_cpp,
    int8_linear,
    quantize_per_row,
    set_gathers,
    set_isa,
    sparse_int8_linear,
    sparse_linear,
)

__all__ = [
    "DEPLOY_MODULES",
    "KERNELS",
    "Int8Conv2d",
    "Int8Linear",
    "SparseConv2d",
    "SparseInt8Conv2d",
    "SparseInt8Linear",
    "SparseLinear",
    "active_isa",
    "build_deploy_module",
    "choose_kernel",
    "estimate_kernel",
    "has_cpp",
    "int8_linear",
    "quantize_per_row",
    "set_gathers",
    "set_isa",
    "sparse_int8_linear",
    "sparse_linear",
]
