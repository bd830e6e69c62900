"""Weight layouts that the C++ kernels read, built and undone with plain torch ops.

* Int8 GEMM: int8 ``(ceil(N / 16), ceil(K / 4), 16, 4)``, so one 64-byte load contains 4
  consecutive inputs of 16 output channels, plus the per-channel int32 weight sums.
* Sparse fp32 GEMM: block-compressed sparse rows (BSR) with blocks of ``R`` outputs by ``C``
  inputs, 16-bit block column indices and values stored ``(nblocks, C, R)``.
* Sparse int8 GEMM: the same with ``1x4`` blocks of int8 values ``(nblocks, 4)``.

Padding rows and columns are zero, so packing and unpacking round-trip exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

BLOCK_SHAPES: dict[str, tuple[int, int]] = {
    "unstructured": (1, 1),
    "1x4": (1, 4),
    "4x1": (4, 1),
    "8x1": (8, 1),
    "16x16": (16, 16),
}
"""Sparse block patterns that the kernels support: ``(outputs, inputs)`` per block."""

INT8_BLOCK_COLUMNS = 16
MAX_BLOCK_COLUMNS = 2**16


class PackedInt8Weight(NamedTuple):
    """An int8 weight in the layout of ``torch.ops.weightlight.int8_linear``."""

    packed: torch.Tensor
    sums: torch.Tensor


class SparseWeight(NamedTuple):
    """A weight in block-compressed sparse rows."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _padded(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    n, k = weight.shape
    if (n, k) == (rows, cols):
        return weight.contiguous()
    out = weight.new_zeros((rows, cols))
    out[:n, :k] = weight
    return out


def pack_int8_weight(q_weight: torch.Tensor) -> PackedInt8Weight:
    """Pack an int8 weight ``(N, K)`` for the int8 GEMM and compute its per-channel sums."""
    if q_weight.dtype != torch.int8 or q_weight.dim() != 2:
        raise ValueError(
            f"pack_int8_weight: expected a 2-D int8 weight, but got {q_weight.dtype} of shape "
            f"{tuple(q_weight.shape)}"
        )
    n, k = q_weight.shape
    n_pad, k_pad = _ceil_to(n, INT8_BLOCK_COLUMNS), _ceil_to(k, 4)
    padded = _padded(q_weight, n_pad, k_pad)
    packed = padded.view(n_pad // INT8_BLOCK_COLUMNS, INT8_BLOCK_COLUMNS, k_pad // 4, 4)
    packed = packed.permute(0, 2, 1, 3).contiguous()
    return PackedInt8Weight(packed, q_weight.sum(dim=1, dtype=torch.int32))


def unpack_int8_weight(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Undo :func:`pack_int8_weight`: the int8 weight ``(N, K)``."""
    blocks, groups = packed.shape[0], packed.shape[1]
    dense = packed.permute(0, 2, 1, 3).reshape(blocks * INT8_BLOCK_COLUMNS, groups * 4)
    return dense[:out_features, :in_features].contiguous()


def pack_sparse_weight(weight: torch.Tensor, block: tuple[int, int] = (1, 1)) -> SparseWeight:
    """Pack the nonzero blocks of a weight ``(N, K)`` into block-compressed sparse rows.

    A block is kept when any of its entries is nonzero. The values keep ``weight``'s dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_sparse_weight: expected a 2-D weight, but got shape {tuple(weight.shape)}")
    if tuple(block) not in BLOCK_SHAPES.values():
        raise ValueError(
            f"pack_sparse_weight: expected a block shape in {sorted(set(BLOCK_SHAPES.values()))}, "
            f"but got {tuple(block)}"
        )
    r, c = block
    n, k = weight.shape
    n_pad, k_pad = _ceil_to(n, r), _ceil_to(k, c)
    block_cols = k_pad // c
    if block_cols > MAX_BLOCK_COLUMNS:
        raise ValueError(
            f"pack_sparse_weight: the format stores 16-bit column indices, so in_features / {c} must be "
            f"at most {MAX_BLOCK_COLUMNS}, but got in_features = {k}"
        )
    weight = weight.detach()
    blocks = _padded(weight, n_pad, k_pad).view(n_pad // r, r, block_cols, c).permute(0, 2, 3, 1)
    kept = blocks.ne(0).any(dim=3).any(dim=2)
    counts = kept.sum(dim=1)
    row_ptr = torch.zeros(n_pad // r + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, dim=0)
    block_row, block_col = kept.nonzero(as_tuple=True)
    values = blocks[block_row, block_col].contiguous()
    # Indices up to 65535 are stored in int16 with the same bits; the kernels read them unsigned.
    col_idx = torch.where(block_col >= 2**15, block_col - 2**16, block_col).to(torch.int16)
    return SparseWeight(row_ptr, col_idx, values)


def check_sparse_weight(
    sparse: SparseWeight,
    out_features: int,
    in_features: int,
    *,
    owner: str = "unpack_sparse_weight",
    index_name: str = "col_idx",
) -> None:
    """Raise ``ValueError`` unless ``sparse`` describes a weight ``(out_features, in_features)``.

    ``values`` is ``(nblocks, C, R)``. ``row_ptr`` must run from 0 to ``nblocks`` without
    decreasing, and every block column index must lie below ``ceil(in_features / C)``. ``owner``
    and ``index_name`` name the caller and the index tensor in the message.
    """
    row_ptr, col_idx, values = sparse
    if values.dim() != 3:
        raise ValueError(f"{owner}: expected values of shape (nblocks, C, R), but got {tuple(values.shape)}")
    c, r = values.shape[1], values.shape[2]
    block_rows = -(-out_features // r) if r else 0
    if row_ptr.dim() != 1 or row_ptr.numel() != block_rows + 1:
        raise ValueError(
            f"{owner}: expected row_ptr to have {block_rows + 1} entries for {out_features} outputs in "
            f"blocks of {r}, but got shape {tuple(row_ptr.shape)}"
        )
    blocks = col_idx.numel()
    if values.shape[0] != blocks:
        raise ValueError(
            f"{owner}: expected one value block per entry of {index_name} ({blocks}), "
            f"but got {values.shape[0]}"
        )
    starts = row_ptr.long()
    if int(starts[0]) != 0 or int(starts[-1]) != blocks:
        raise ValueError(
            f"{owner}: expected row_ptr to run from 0 to the number of blocks {blocks}, but got "
            f"{int(starts[0])} to {int(starts[-1])}"
        )
    steps = starts[1:] - starts[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"{owner}: expected a non-decreasing row_ptr, but row_ptr[{i}] = {int(starts[i])} > "
            f"row_ptr[{i + 1}] = {int(starts[i + 1])}"
        )
    block_cols = -(-in_features // c)
    if blocks:
        largest = int((col_idx.long() & 0xFFFF).max())
        if largest >= block_cols:
            raise ValueError(
                f"{owner}: expected every index in {index_name} to be below {block_cols}, "
                f"but {index_name} contains {largest}"
            )


def unpack_sparse_weight(
    sparse: SparseWeight,
    out_features: int,
    in_features: int,
    *,
    owner: str = "unpack_sparse_weight",
    index_name: str = "col_idx",
) -> torch.Tensor:
    """Undo :func:`pack_sparse_weight`: the dense weight ``(N, K)``.

    Raises ``ValueError`` when the format does not describe such a weight. ``owner`` and
    ``index_name`` go into its message, as in :func:`check_sparse_weight`.
    """
    check_sparse_weight(sparse, out_features, in_features, owner=owner, index_name=index_name)
    row_ptr, col_idx, values = sparse
    c, r = values.shape[1], values.shape[2]
    block_rows = row_ptr.numel() - 1
    block_cols = -(-in_features // c)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    block_row = torch.repeat_interleave(torch.arange(block_rows), counts)
    block_col = col_idx.long() & 0xFFFF
    blocks = values.new_zeros((block_rows, block_cols, c, r))
    blocks[block_row, block_col] = values
    dense = blocks.permute(0, 3, 1, 2).reshape(block_rows * r, block_cols * c)
    return dense[:out_features, :in_features].contiguous()


def pack_sparse_int8_weight(q_weight: torch.Tensor) -> tuple[SparseWeight, torch.Tensor]:
    """Pack the nonzero groups of 4 inputs of an int8 weight ``(N, K)``; also return its row sums."""
    if q_weight.dtype != torch.int8 or q_weight.dim() != 2:
        raise ValueError(
            f"pack_sparse_int8_weight: expected a 2-D int8 weight, but got {q_weight.dtype} of shape "
            f"{tuple(q_weight.shape)}"
        )
    row_ptr, col_idx, values = pack_sparse_weight(q_weight, (1, 4))
    sparse = SparseWeight(row_ptr, col_idx, values.reshape(-1, 4))
    return sparse, q_weight.sum(dim=1, dtype=torch.int32)


def unpack_sparse_int8_weight(
    sparse: SparseWeight,
    out_features: int,
    in_features: int,
    *,
    owner: str = "unpack_sparse_int8_weight",
    index_name: str = "col_idx",
) -> torch.Tensor:
    """Undo :func:`pack_sparse_int8_weight`: the int8 weight ``(N, K)``."""
    row_ptr, col_idx, values = sparse
    if values.dim() != 2 or values.shape[1] != 4:
        raise ValueError(f"{owner}: expected values of shape (ngroups, 4), but got {tuple(values.shape)}")
    return unpack_sparse_weight(
        SparseWeight(row_ptr, col_idx, values.reshape(-1, 4, 1)),
        out_features,
        in_features,
        owner=owner,
        index_name=index_name,
    )


def detect_pattern(weight: torch.Tensor, min_fill: float = 0.95) -> str:
    """Name the coarsest block pattern of a weight's zeros.

    Returns ``"dense"`` for a weight without zeros, else the largest block shape of
    :data:`BLOCK_SHAPES` whose blocks that hold any nonzero are at least ``min_fill`` nonzero
    (a few zeros inside kept blocks, from rounding or chance, are allowed), else
    ``"unstructured"``. Convolution weights are viewed as ``(out_channels, -1)``.
    """
    flat = weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:]))
    nonzero = flat.ne(0)
    nonzero_count = int(nonzero.sum())
    if nonzero_count == flat.numel():
        return "dense"
    n, k = flat.shape
    for name in ("16x16", "8x1", "4x1", "1x4"):
        r, c = BLOCK_SHAPES[name]
        if n % r or k % c:
            continue
        kept = nonzero.view(n // r, r, k // c, c).any(dim=3).any(dim=1)
        if nonzero_count >= min_fill * int(kept.sum()) * r * c:
            return name
    return "unstructured"
