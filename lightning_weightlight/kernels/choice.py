"""Per-layer kernel choice: dense fp32, int8, sparse or sparse int8, from the weight or by timing."""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from lightning_weightlight.kernels import packing
from lightning_weightlight.kernels.conv import Int8Conv2d, SparseConv2d, SparseInt8Conv2d
from lightning_weightlight.kernels.linear import Int8Linear, SparseInt8Linear, SparseLinear

KERNELS = ("dense", "int8", "sparse", "sparse_int8")
"""Kernel names that :func:`choose_kernel` returns and :func:`build_deploy_module` accepts."""

# Cost of a stored sparse weight entry relative to a dense one, estimated from the ratios in
# BENCHMARKS.md (index loads, gathers at one token, scattered stores). A sparse kernel is chosen
# when density * overhead stays below this margin, so that near-ties keep the dense kernel.
_SPARSE_OVERHEAD_ONE_TOKEN = 3.0
_SPARSE_OVERHEAD_BATCH = 2.0
_MARGIN = 0.8


def _stored_density(weight: torch.Tensor, block: tuple[int, int]) -> float:
    """Return the fraction of the weight that a block-sparse format with this block shape stores."""
    flat = weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:]))
    if flat.numel() == 0:
        return 0.0
    sparse = packing.pack_sparse_weight(flat, block)
    return sparse.values.numel() / flat.numel()


def _check_weight(weight: torch.Tensor, batch_rows: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        raise TypeError(
            f"choose_kernel: expected a 2-D Linear or 4-D Conv2d weight tensor, but got {weight!r:.80}"
        )
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows: expected a positive int, but got {batch_rows!r}")


def estimate_kernel(weight: torch.Tensor, *, batch_rows: int = 1, quantized: bool = False) -> str:
    """Pick a kernel from the weight's zeros and the typical number of rows per call, without timing."""
    _check_weight(weight, batch_rows)
    overhead = _SPARSE_OVERHEAD_ONE_TOKEN if batch_rows == 1 else _SPARSE_OVERHEAD_BATCH
    if quantized:
        # The int8 kernels store groups of 4 consecutive inputs.
        density = _stored_density(weight, packing.BLOCK_SHAPES["1x4"])
        return "sparse_int8" if density * overhead < _MARGIN else "int8"
    pattern = packing.detect_pattern(weight)
    if pattern == "dense":
        return "dense"
    density = _stored_density(weight, packing.BLOCK_SHAPES[pattern])
    return "sparse" if density * overhead < _MARGIN else "dense"


def _candidates(quantized: bool) -> tuple[str, ...]:
    return ("int8", "sparse_int8") if quantized else ("dense", "sparse")


def _median_seconds(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def choose_kernel(
    weight: torch.Tensor, *, batch_rows: int = 1, quantized: bool = False, measure: bool = False
) -> str:
    """Choose the fastest kernel for a Linear (2-D) or Conv2d (4-D) weight.

    Args:
        weight: the trained weight, with pruned entries exactly zero.
        batch_rows: typical rows per call (tokens times batch for a Linear, output pixels times
            batch for a convolution).
        quantized: choose between the int8 kernels (``"int8"``, ``"sparse_int8"``) instead of
            the float32 ones (``"dense"``, ``"sparse"``).
        measure: time both candidates on random input of ``batch_rows`` rows for a few
            milliseconds instead of estimating from the weight's zeros.

    Returns:
        One of :data:`KERNELS`.

    Example:
        >>> weight = torch.randn(64, 64)
        >>> choose_kernel(weight), choose_kernel(weight * (torch.rand(64, 64) > 0.95))
        ('dense', 'sparse')
    """
    if not measure:
        return estimate_kernel(weight, batch_rows=batch_rows, quantized=quantized)
    _check_weight(weight, batch_rows)
    flat = weight.detach().float().reshape(weight.shape[0], math.prod(weight.shape[1:]))
    linear = nn.Linear(flat.shape[1], flat.shape[0])
    with torch.no_grad():
        linear.weight.copy_(flat)
    x = torch.randn(batch_rows, flat.shape[1])
    repeats = 20
    timings = {
        name: _median_seconds(build_deploy_module(linear, name), x, repeats)
        for name in _candidates(quantized)
    }
    return min(timings, key=timings.get)


def build_deploy_module(
    layer: nn.Module,
    kernel: str | None = None,
    *,
    batch_rows: int = 1,
    quantized: bool = False,
    measure: bool = False,
    weight_scale: torch.Tensor | None = None,
    input_scale: float | None = None,
    input_zero_point: int | None = None,
) -> nn.Module:
    """Build the deploy module that runs ``layer`` (an ``nn.Linear`` or ``nn.Conv2d``) with ``kernel``.

    ``kernel`` defaults to :func:`choose_kernel` with ``batch_rows``, ``quantized`` and
    ``measure``. ``"dense"`` returns an unchanged copy of the layer. The quantization arguments
    are those of :meth:`Int8Linear.from_float` and apply to the int8 kernels only.

    Example:
        >>> build_deploy_module(nn.Linear(8, 4), "int8").kernel
        'int8'
    """
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(
            f"build_deploy_module: expected an nn.Linear or nn.Conv2d, but got {type(layer).__name__}"
        )
    if kernel is None:
        kernel = choose_kernel(layer.weight, batch_rows=batch_rows, quantized=quantized, measure=measure)
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, but got {kernel!r}")
    quantization = {
        "weight_scale": weight_scale,
        "input_scale": input_scale,
        "input_zero_point": input_zero_point,
    }
    is_conv = isinstance(layer, nn.Conv2d)
    if kernel == "dense":
        return copy.deepcopy(layer)
    if kernel == "sparse":
        return (SparseConv2d if is_conv else SparseLinear).from_dense(layer)
    if kernel == "int8":
        return (Int8Conv2d if is_conv else Int8Linear).from_float(layer, **quantization)
    return (SparseInt8Conv2d if is_conv else SparseInt8Linear).from_float(layer, **quantization)
