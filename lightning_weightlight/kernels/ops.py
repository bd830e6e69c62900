"""Typed wrappers and fake kernels for the ``torch.ops.weightlight`` operators.

Each wrapper calls the compiled operator when the extension is loaded and the reference in
:mod:`lightning_weightlight.kernels.reference` otherwise.
"""

from __future__ import annotations

import os

import torch

from lightning_weightlight.kernels import _loader, reference

ISA_NAMES = ("auto", "amx", "avx512", "avx2", "scalar")
"""Values of ``WEIGHTLIGHT_ISA`` and of :func:`set_isa`."""

_ENV_ISA = os.environ.get("WEIGHTLIGHT_ISA", "")
if _ENV_ISA and _ENV_ISA not in ISA_NAMES:
    # Checked before the extension loads: the compiled kernels would only fail at their first call.
    raise ValueError(
        f"WEIGHTLIGHT_ISA: expected one of {ISA_NAMES}, but got {_ENV_ISA!r}; unset it or use one of these"
    )

_loader.load()

if _loader.HAS_CPP:
    # Resolved overloads: calling them skips the overload lookup of torch.ops.weightlight.<name>.
    _INT8_LINEAR = torch.ops.weightlight.int8_linear.default
    _SPARSE_LINEAR = torch.ops.weightlight.sparse_linear.default
    _SPARSE_INT8_LINEAR = torch.ops.weightlight.sparse_int8_linear.default
    _ZERO_PRUNED = torch.ops.weightlight.zero_pruned_.default


def has_cpp() -> bool:
    """Return whether the compiled operators are loaded in this process."""
    return _loader.HAS_CPP


def active_isa() -> str:
    """Return the instruction set that the kernels use: ``"amx"``, ``"avx512"``, ``"avx2"`` or ``"scalar"``.

    ``"amx"`` is AVX-512 VNNI plus the AMX int8 tiles. The dense int8 GEMM uses the tiles at more
    than 4 rows and K of 64 or more, and every other kernel runs its AVX-512 code there.
    """
    if not _loader.HAS_CPP:
        return "reference"
    return torch.ops.weightlight.isa()


def set_isa(name: str) -> str:
    """Cap the instruction set that the kernels use and return the one in effect.

    ``name`` is ``"auto"``, ``"amx"``, ``"avx512"``, ``"avx2"`` or ``"scalar"``.

    A request above what this CPU supports gives the best supported set. The environment
    variable ``WEIGHTLIGHT_ISA`` sets the same cap at start-up.
    """
    if name not in ISA_NAMES:
        raise ValueError(f"set_isa: expected one of {ISA_NAMES}, but got {name!r}")
    if not _loader.HAS_CPP:
        return "reference"
    return torch.ops.weightlight.set_isa(name)


def set_gathers(mode: str) -> str:
    """Choose how the AVX-512 sparse kernels read the inputs of a single row; return ``"on"`` or ``"off"``.

    ``"on"`` gathers 16 inputs per instruction (``vgatherdps``, ``vpgatherdd``). ``"off"`` loads
    them one by one into vectors of 8, as the AVX2 kernels do. ``"auto"`` restores the default,
    which is gathers on Intel CPUs and loads elsewhere (on AMD Zen 4 the loads were 1.2-3x
    faster). Only ``SparseLinear`` (unstructured and 1x4) and ``SparseInt8Linear`` called with
    one row, under the ``avx512`` or ``amx`` instruction set, use this setting.
    ``SparseInt8Linear`` gives the same outputs either way. ``SparseLinear`` adds its products in
    another order, so its outputs may differ in the last bits.
    """
    allowed = ("auto", "on", "off")
    if mode not in allowed:
        raise ValueError(f"set_gathers: expected one of {allowed}, but got {mode!r}")
    if not _loader.HAS_CPP:
        return "off"
    return torch.ops.weightlight.set_gathers(mode)


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D float32 tensor to uint8: ``(q, scale, zero_point)``.

    Bit-identical to :func:`lightning_weightlight.kernels.reference.quantize_per_row`.
    """
    if _loader.HAS_CPP:
        return torch.ops.weightlight.quantize_per_row(x)
    return reference.quantize_per_row(x)


def int8_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_sums: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply float32 ``x`` ``(..., K)`` by a packed int8 weight: float32 ``(..., N)``.

    ``w_packed`` and ``w_sums`` come from :func:`~lightning_weightlight.kernels.packing.pack_int8_weight`,
    ``w_scale`` contains the N per-channel scales. ``x`` is quantized to uint8 per row at run time,
    or per tensor with ``x_scale`` and ``x_zero_point`` (one-element tensors) when they are given.
    Matches :func:`lightning_weightlight.kernels.reference.int8_linear`.
    """
    if _loader.HAS_CPP:
        return _INT8_LINEAR(x, w_packed, w_sums, w_scale, bias, x_scale, x_zero_point)
    return reference.int8_linear(x, w_packed, w_sums, w_scale, bias, x_scale, x_zero_point)


def sparse_linear(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """Multiply float32 ``x`` ``(..., K)`` by a block-sparse weight: float32 ``(..., out_features)``.

    The weight comes from :func:`~lightning_weightlight.kernels.packing.pack_sparse_weight`.
    Matches :func:`lightning_weightlight.kernels.reference.sparse_linear` within float32 rounding.
    """
    if _loader.HAS_CPP:
        return _SPARSE_LINEAR(x, row_ptr, col_idx, values, bias, out_features)
    return reference.sparse_linear(x, row_ptr, col_idx, values, bias, out_features)


def sparse_int8_linear(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    group_idx: torch.Tensor,
    values: torch.Tensor,
    w_sums: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply float32 ``x`` ``(..., K)`` by a sparse int8 weight in groups of 4 inputs.

    The weight comes from :func:`~lightning_weightlight.kernels.packing.pack_sparse_int8_weight`;
    the activation quantization is that of :func:`int8_linear`.
    """
    args = (x, row_ptr, group_idx, values, w_sums, w_scale, bias, x_scale, x_zero_point)
    if _loader.HAS_CPP:
        return _SPARSE_INT8_LINEAR(*args)
    return reference.sparse_int8_linear(*args)


def zero_pruned_(tensors: list[torch.Tensor], keeps: list[torch.Tensor]) -> None:
    """Zero in place the entries of each float32 tensor where its bool mask is False.

    ``keeps[i]`` is a contiguous bool tensor of the shape of the contiguous float32 ``tensors[i]``
    (True keeps the entry). An entry that is already zero is not written, so a pass over masked
    weights only reads them. Two empty lists do nothing. Matches
    :func:`lightning_weightlight.kernels.reference.zero_pruned_`.
    """
    if not tensors and not keeps:
        return
    if _loader.HAS_CPP:
        _ZERO_PRUNED(tensors, keeps)
    else:
        reference.zero_pruned_(tensors, keeps)


if _loader.HAS_CPP:

    @torch.library.register_fake("weightlight::quantize_per_row")
    def _quantize_per_row_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check(x.dim() == 2, lambda: f"quantize_per_row: expected a 2-D tensor, got {x.dim()}-D")
        rows = x.shape[0]
        return (
            x.new_empty(x.shape, dtype=torch.uint8),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.int32),
        )

    def _check_input(op: str, x: torch.Tensor) -> None:
        torch._check(x.dtype == torch.float32, lambda: f"{op}: expected a float32 input, but got {x.dtype}")
        torch._check(x.dim() >= 1, lambda: f"{op}: expected an input with at least 1 dimension, but got 0")

    @torch.library.register_fake("weightlight::int8_linear")
    def _int8_linear_fake(x, w_packed, w_sums, w_scale, bias=None, x_scale=None, x_zero_point=None):
        _check_input("int8_linear", x)
        torch._check(
            w_packed.dim() == 4 and w_packed.shape[1] * 4 >= x.shape[-1],
            lambda: f"int8_linear: w_packed of shape {tuple(w_packed.shape)} does not fit K = {x.shape[-1]}",
        )
        return x.new_empty((*x.shape[:-1], w_scale.shape[0]))

    @torch.library.register_fake("weightlight::sparse_linear")
    def _sparse_linear_fake(x, row_ptr, col_idx, values, bias, out_features):
        _check_input("sparse_linear", x)
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("weightlight::sparse_int8_linear")
    def _sparse_int8_linear_fake(
        x, row_ptr, group_idx, values, w_sums, w_scale, bias=None, x_scale=None, x_zero_point=None
    ):
        _check_input("sparse_int8_linear", x)
        return x.new_empty((*x.shape[:-1], w_scale.shape[0]))

    @torch.library.register_fake("weightlight::zero_pruned_")
    def _zero_pruned_fake(tensors, keeps):
        torch._check(
            len(tensors) == len(keeps),
            lambda: f"zero_pruned_: expected one mask per tensor, but got {len(tensors)} and {len(keeps)}",
        )
