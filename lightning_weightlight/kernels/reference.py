"""Pure-PyTorch reference of every ``torch.ops.weightlight`` op: the numerics contract.

Fake quantization during training, this reference and the C++ kernels follow the same rules:

* Rounding is half to even (``torch.round``) of a true float32 division ``x / scale``, never a
  multiplication by a reciprocal, and every clamp saturates at the integer type's range.
* Affine parameters come from a range that always includes zero: ``lo = min(x_min, 0)``,
  ``hi = max(x_max, 0)``, ``scale = (hi - lo) / (qmax - qmin)`` (``1`` when the range is empty)
  and ``zero_point = clamp(round(qmin - lo / scale), qmin, qmax)``.
* Weights are symmetric (zero point 0): ``scale = max|w| / qmax``, per output channel by
  default, and ``q = clamp(round(w / scale), qmin, qmax)``.
* Integer products accumulate exactly in int32; dequantization is
  ``acc * (x_scale * w_scale) + bias`` in float32.
"""

from __future__ import annotations

import math

import torch

UINT8_RANGE = (0, 255)
INT8_RANGE = (-128, 127)


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """Return ``(qmin, qmax)`` of a ``bits``-wide signed or unsigned integer."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def choose_qparams_affine(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute float32 scales and integer-valued float32 zero points for the range ``[lo, hi]``."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    scale = (hi - lo) / float(qmax - qmin)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def choose_qparams_symmetric(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Compute float32 scales of a symmetric (zero point 0) quantizer for magnitudes up to ``amax``."""
    scale = amax.float() / float(qmax)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize to integer values held in float32: ``clamp(round(x / scale) + zero_point)``."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Map integer values back to float32: ``(q - zero_point) * scale``."""
    return (q.float() - zero_point) * scale


def fake_quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize and dequantize in float32, which gives the value that training uses."""
    return dequantize_affine(quantize_affine(x, scale, zero_point, qmin, qmax), scale, zero_point)


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D float32 tensor to uint8 with its own scale and zero point.

    Returns ``(q, scale, zero_point)``: uint8 ``(M, K)``, float32 ``(M,)`` and int32 ``(M,)``.

    Example:
        >>> q, scale, zero_point = quantize_per_row(torch.tensor([[-1.0, 0.0, 3.0]]))
        >>> q.tolist(), zero_point.tolist()
        ([[0, 64, 255]], [64])
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_per_row: expected a 2-D tensor, but got {x.dim()} dimensions")
    x = x.float()
    qmin, qmax = UINT8_RANGE
    if x.shape[1] == 0:
        lo = hi = torch.zeros(x.shape[0])
    else:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
    scale, zero_point = choose_qparams_affine(lo, hi, qmin, qmax)
    q = quantize_affine(x, scale[:, None], zero_point[:, None], qmin, qmax)
    # A row with NaN, an infinity, or a range beyond float32 (say 3e38 and -3e38) has no usable
    # scale. It gets scale NaN, zero point INT32_MIN and q = 0, so that every output of it is NaN.
    bad = torch.isnan(lo) | torch.isnan(hi) | ~torch.isfinite(scale)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    zero_point = torch.where(bad, torch.full_like(zero_point, -(2.0**31)), zero_point)
    q = torch.where(bad[:, None], torch.zeros_like(q), q)
    return q.to(torch.uint8), scale, zero_point.to(torch.int32)


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight symmetrically per output channel (dimension 0).

    Returns ``(q, scale)``: int8 values shaped like ``weight`` and float32 scales ``(out,)``.
    """
    qmin, qmax = integer_range(bits, signed=True)
    flat = weight.detach().float().reshape(weight.shape[0], math.prod(weight.shape[1:]))
    amax = flat.abs().amax(dim=1) if flat.shape[1] > 0 else torch.zeros(flat.shape[0])
    scale = choose_qparams_symmetric(amax, qmax)
    view = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.float() / scale.view(view)), qmin, qmax)
    return q.to(torch.int8), scale


def int8_linear_accumulators(
    q_x: torch.Tensor, x_zero_point: torch.Tensor, q_w: torch.Tensor
) -> torch.Tensor:
    """Compute exact int32 accumulators ``sum_k (q_x - zero_point) * q_w`` of a uint8 x int8 GEMM.

    ``q_x`` is uint8 ``(M, K)`` with ``x_zero_point`` of shape ``(M,)`` or scalar, ``q_w`` int8
    ``(N, K)``; the result is int32 ``(M, N)``.
    """
    centered = q_x.to(torch.int64) - x_zero_point.to(torch.int64).reshape(-1, 1)
    return (centered @ q_w.to(torch.int64).t()).to(torch.int32)


def dynamic_int8_linear(
    x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Compute ``x @ w.T + bias`` with ``x`` quantized per row at run time and int8 weights."""
    q_x, x_scale, x_zero_point = quantize_per_row(x)
    acc = int8_linear_accumulators(q_x, x_zero_point, q_w)
    out = acc.float() * (x_scale[:, None] * w_scale[None, :].float())
    if bias is not None:
        out = out + bias.float()
    return out


def static_int8_linear(
    x: torch.Tensor,
    q_w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | float,
    x_zero_point: torch.Tensor | int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute ``x @ w.T + bias`` with ``x`` (M, K) quantized per tensor to uint8 with a fixed scale."""
    qmin, qmax = UINT8_RANGE
    x_scale = torch.as_tensor(x_scale, dtype=torch.float32).reshape(())
    x_zero_point = torch.as_tensor(x_zero_point, dtype=torch.float32).reshape(())
    # A full-shape divisor keeps the true division: torch may multiply by the reciprocal of a scalar.
    q_x = quantize_affine(x.float(), x_scale.expand(x.shape), x_zero_point, qmin, qmax)
    zero_points = x_zero_point.to(torch.int32).expand(x.shape[0])
    acc = int8_linear_accumulators(q_x.to(torch.uint8), zero_points, q_w)
    out = acc.float() * (x_scale * w_scale[None, :].float())
    if bias is not None:
        out = out + bias.float()
    return out


def _over_rows(fn, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Apply ``fn`` to ``x`` viewed as rows ``(M, K)`` and restore the leading dimensions."""
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    return fn(rows).reshape(*x.shape[:-1], out_features)


def int8_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_sums: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of ``weightlight::int8_linear``: an int8 GEMM over the packed weight.

    ``x`` is float32 ``(..., K)``. Without ``x_scale`` the rows are quantized at run time as in
    :func:`dynamic_int8_linear`, otherwise as in :func:`static_int8_linear`.
    """
    from lightning_weightlight.kernels.packing import unpack_int8_weight

    n = w_scale.shape[0]
    q_w = unpack_int8_weight(w_packed, n, x.shape[-1])
    if x_scale is None:
        return _over_rows(lambda rows: dynamic_int8_linear(rows, q_w, w_scale, bias), x, n)
    return _over_rows(lambda rows: static_int8_linear(rows, q_w, w_scale, x_scale, x_zero_point, bias), x, n)


def sparse_linear(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """Reference of ``weightlight::sparse_linear``: ``x @ W.T + bias`` in float64, rounded to float32."""
    from lightning_weightlight.kernels.packing import SparseWeight, unpack_sparse_weight

    weight = unpack_sparse_weight(SparseWeight(row_ptr, col_idx, values), out_features, x.shape[-1])
    out = x.double() @ weight.double().t()
    if bias is not None:
        out = out + bias.double()
    return out.float()


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
    """Reference of ``weightlight::sparse_int8_linear``: the int8 GEMM of a sparse int8 weight."""
    from lightning_weightlight.kernels.packing import SparseWeight, unpack_sparse_int8_weight

    n = w_scale.shape[0]
    q_w = unpack_sparse_int8_weight(SparseWeight(row_ptr, group_idx, values), n, x.shape[-1])
    if x_scale is None:
        return _over_rows(lambda rows: dynamic_int8_linear(rows, q_w, w_scale, bias), x, n)
    return _over_rows(lambda rows: static_int8_linear(rows, q_w, w_scale, x_scale, x_zero_point, bias), x, n)


def zero_pruned_(tensors: list[torch.Tensor], keeps: list[torch.Tensor]) -> None:
    """Reference of ``weightlight::zero_pruned_``: zero in place the entries where ``keeps`` is False."""
    if len(tensors) != len(keeps):
        raise ValueError(
            f"zero_pruned_: expected one mask per tensor, but got {len(tensors)} tensors "
            f"and {len(keeps)} masks"
        )
    for index, (tensor, keep) in enumerate(zip(tensors, keeps)):
        if keep.shape != tensor.shape:
            raise ValueError(
                f"zero_pruned_: mask {index} has shape {list(keep.shape)}, "
                f"but its tensor has shape {list(tensor.shape)}"
            )
    with torch.no_grad():
        for tensor, keep in zip(tensors, keeps):
            tensor.masked_fill_(~keep, 0.0)
