"""Scores and masks for weight pruning: magnitude or random scores, unstructured, N:M or block patterns.

A mask is a boolean tensor shaped like the tensor it prunes, ``True`` where an entry is kept. A
weight of ``k`` dimensions is seen as a matrix of ``weight.shape[0]`` output rows by the product of
the remaining dimensions as inputs, in PyTorch's memory order (``in_channels, kernel_h, kernel_w``
for a convolution). Patterns work on that matrix:

- ``"unstructured"``: any entry can be pruned.
- ``"N:M"`` such as ``"2:4"``: at most ``M - N`` entries of every ``M`` consecutive inputs of a row
  are pruned, so at a sparsity of exactly ``(M - N) / M`` every group keeps exactly ``N``.
- ``"RxC"`` such as ``"1x4"``, ``"4x1"`` or ``"16x16"``: blocks of ``R`` output rows by ``C``
  consecutive inputs are kept or pruned together. ``"1x4"`` is the block that int8 VNNI kernels
  consume, because ``vpdpbusd`` multiplies four int8 pairs per lane.

Counting is exact. A pruning unit is an entry, or a block for block patterns. With the layer scope a
tensor of ``U`` units gets ``round(sparsity * U)`` pruned units. With the global scope the selected
tensors share one ranking and get ``round(sparsity * total_units)`` pruned units together.
``round`` is Python's: to the nearest integer, halves to even.

Example:
    >>> import torch
    >>> weight = torch.arange(1.0, 9.0).reshape(2, 4)
    >>> compute_masks({"w": magnitude_scores(weight)}, 0.5, parse_pattern("2:4"))["w"]
    tensor([[False, False,  True,  True],
            [False, False,  True,  True]])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

SCOPES = ("layer", "global")
"""Rankings a mask can come from: each tensor on its own, or all selected tensors together."""

_N_M = re.compile(r"(\d+):(\d+)")
_BLOCK = re.compile(r"(\d+)x(\d+)")


@dataclass(frozen=True)
class SparsityPattern:
    """Parsed form of a ``pattern`` argument: ``"unstructured"``, ``"N:M"`` or ``"RxC"``."""

    kind: str
    n: int = 1
    m: int = 1
    rows: int = 1
    cols: int = 1

    @property
    def max_sparsity(self) -> float:
        """Highest sparsity the pattern allows: ``(M - N) / M`` for N:M, otherwise 1."""
        return (self.m - self.n) / self.m if self.kind == "n:m" else 1.0

    @property
    def unit_size(self) -> int:
        """Entries in one pruning unit: the block size for blocks, otherwise 1."""
        return self.rows * self.cols if self.kind == "block" else 1

    def incompatibility(self, shape: torch.Size | tuple[int, ...]) -> str | None:
        """Return why a tensor of ``shape`` cannot take this pattern, or ``None`` when it can."""
        if self.kind == "unstructured":
            return None
        if len(shape) < 2:
            return f"a tensor of shape {tuple(shape)} has no input dimension for pattern {self}"
        rows, cols = shape[0], _numel(shape[1:])
        if self.kind == "n:m" and cols % self.m:
            return f"{cols} inputs per row (shape {tuple(shape)}) are not a multiple of M={self.m}"
        if self.kind == "block" and (rows % self.rows or cols % self.cols):
            return (
                f"block {self} does not divide the {rows}x{cols} weight matrix (shape {tuple(shape)}); "
                f"rows must be a multiple of {self.rows} and inputs a multiple of {self.cols}"
            )
        return None

    def __str__(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.rows}x{self.cols}"
        return "unstructured"


def parse_pattern(pattern: str, argument: str = "pattern") -> SparsityPattern:
    """Parse ``"unstructured"``, ``"N:M"`` (``0 < N < M``) or ``"RxC"`` (positive sizes).

    Raises:
        ValueError: The text is none of these, or N >= M, or a size is zero.
    """
    allowed = "'unstructured', 'N:M' with 0 < N < M (such as '2:4') or 'RxC' (such as '1x4')"
    if not isinstance(pattern, str):
        raise TypeError(f"{argument}: expected a string, {allowed}, but got {pattern!r}")
    text = pattern.strip().lower()
    if text == "unstructured":
        return SparsityPattern("unstructured")
    if match := _N_M.fullmatch(text):
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"{argument}: expected N:M with 0 < N < M, but got {pattern!r} (N={n}, M={m})")
        return SparsityPattern("n:m", n=n, m=m)
    if match := _BLOCK.fullmatch(text):
        rows, cols = int(match.group(1)), int(match.group(2))
        if rows < 1 or cols < 1:
            raise ValueError(f"{argument}: expected a block of positive sizes, but got {pattern!r}")
        if rows == cols == 1:
            return SparsityPattern("unstructured")
        return SparsityPattern("block", rows=rows, cols=cols)
    raise ValueError(f"{argument}: expected {allowed}, but got {pattern!r}")


def validate_sparsity(argument: str, value: float) -> float:
    """Check that a target sparsity is a number in [0, 1) and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument}: expected a number in [0, 1), but got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{argument}: expected a sparsity in [0, 1), but got {value}")
    return float(value)


def _numel(shape: torch.Size | tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def magnitude_scores(tensor: Tensor) -> Tensor:
    """Return ``|tensor|`` in float32, the L1 magnitude score of every entry."""
    return tensor.detach().abs().float()


def random_scores(tensor: Tensor, generator: torch.Generator) -> Tensor:
    """Return uniform random scores shaped like ``tensor``, drawn on the CPU from ``generator``."""
    return torch.rand(tensor.shape, generator=generator, dtype=torch.float32)


def unit_scores(scores: Tensor, pattern: SparsityPattern) -> Tensor:
    """Reduce entry scores to one score per pruning unit, as a 1-D tensor.

    Blocks sum the scores of their entries (the L1 norm for magnitude scores), ordered block-row by
    block-row.
    """
    if pattern.kind != "block":
        return scores.reshape(-1)
    rows, cols = scores.shape[0], scores[0].numel()
    blocks = scores.reshape(rows // pattern.rows, pattern.rows, cols // pattern.cols, pattern.cols)
    return blocks.sum(dim=(1, 3)).reshape(-1)


def expand_units(unit_mask: Tensor, pattern: SparsityPattern, shape: torch.Size) -> Tensor:
    """Expand a 1-D mask over pruning units back to a mask of ``shape`` (the inverse of ``unit_scores``)."""
    if pattern.kind != "block":
        return unit_mask.reshape(shape)
    rows, cols = shape[0], _numel(shape[1:])
    block_rows, block_cols = rows // pattern.rows, cols // pattern.cols
    grid = unit_mask.reshape(block_rows, 1, block_cols, 1)
    return grid.expand(block_rows, pattern.rows, block_cols, pattern.cols).reshape(shape)


def unit_mask_of(mask: Tensor, pattern: SparsityPattern) -> Tensor:
    """Return the 1-D mask over pruning units of an entry mask; a unit is kept if any entry is kept."""
    if pattern.kind != "block":
        return mask.reshape(-1)
    return unit_scores(mask.float(), pattern) > 0


def _protect_n_m(scores: Tensor, pattern: SparsityPattern) -> Tensor:
    """Give the ``N`` best entries of every group of ``M`` an infinite score so that they are never pruned."""
    groups = scores.reshape(-1, pattern.m)
    keep = groups.topk(pattern.n, dim=1).indices
    protected = groups.clone()
    protected.scatter_(1, keep, float("inf"))
    return protected.reshape(-1)


def _ranked_units(scores: Tensor, previous: Tensor | None, pattern: SparsityPattern) -> Tensor:
    """Return the 1-D unit scores used for ranking: already pruned units first, N:M limits enforced."""
    units = unit_scores(scores, pattern).clone()
    if previous is not None:
        units[~unit_mask_of(previous, pattern)] = float("-inf")
    if pattern.kind == "n:m":
        units = _protect_n_m(units, pattern)
    return units


def _keep_all_but_lowest(units: Tensor, num_pruned: int) -> Tensor:
    keep = torch.ones(units.numel(), dtype=torch.bool)
    if num_pruned > 0:
        lowest = torch.topk(units, num_pruned, largest=False, sorted=False).indices
        keep[lowest] = False
    return keep


def compute_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    pattern: SparsityPattern,
    scope: str = "layer",
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Compute masks that prune the lowest-scoring units to a total ``sparsity``.

    Args:
        scores: Score of every entry by tensor name, shaped like the tensor (see
            :func:`magnitude_scores` and :func:`random_scores`).
        sparsity: Target share of pruned units in [0, 1), counted as described in the module
            docstring. It is the total sparsity, not a share of what is left.
        pattern: Which entries are pruned together.
        scope: ``"layer"`` ranks each tensor on its own; ``"global"`` ranks all of them together.
        previous: Masks of an earlier pruning event. Units pruned there stay pruned as long as the new
            target needs at least as many pruned units, so gradual pruning never regrows.

    Returns:
        A boolean CPU mask per tensor name, ``True`` where the entry is kept.

    Raises:
        ValueError: An argument is out of range, or a tensor does not fit the pattern.
    """
    validate_sparsity("sparsity", sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {list(SCOPES)}, but got {scope!r}")
    if sparsity > pattern.max_sparsity:
        raise ValueError(
            f"sparsity: pattern {pattern} allows at most {pattern.max_sparsity}, but got {sparsity}"
        )
    for name, tensor in scores.items():
        if reason := pattern.incompatibility(tensor.shape):
            raise ValueError(f"pattern: tensor {name!r} cannot be pruned with {pattern}: {reason}")

    ranked = {
        name: _ranked_units(tensor.cpu(), None if previous is None else previous[name].cpu(), pattern)
        for name, tensor in scores.items()
    }
    if scope == "layer":
        unit_masks = {
            name: _keep_all_but_lowest(units, round(sparsity * units.numel()))
            for name, units in ranked.items()
        }
    else:
        everything = torch.cat(list(ranked.values()))
        keep = _keep_all_but_lowest(everything, round(sparsity * everything.numel()))
        unit_masks = dict(zip(ranked, keep.split([units.numel() for units in ranked.values()]), strict=True))
    return {name: expand_units(unit_masks[name], pattern, tensor.shape) for name, tensor in scores.items()}


def drop_and_grow(
    mask: Tensor,
    drop_scores: Tensor,
    grow_scores: Tensor,
    drop_fraction: float,
    pattern: SparsityPattern,
) -> Tensor:
    """Move part of a mask: prune the weakest kept units and regrow as many of the strongest pruned ones.

    ``round(drop_fraction * kept_units)`` kept units with the lowest ``drop_scores`` are pruned, then
    the same number of units that are pruned after that drop and have the highest ``grow_scores``
    are kept, so the count of pruned units does not change. A unit dropped in this call can be
    regrown. This is RigL's update with gradient magnitudes as ``grow_scores`` and SET's with random
    ones.

    Returns:
        The new boolean CPU mask, shaped like ``mask``.
    """
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction: expected a value in [0, 1], but got {drop_fraction}")
    if pattern.kind == "n:m":
        raise ValueError(
            f"pattern: drop and grow supports unstructured and block patterns, but got {pattern}"
        )
    kept = unit_mask_of(mask.cpu(), pattern)
    num_moved = round(drop_fraction * int(kept.sum()))
    if num_moved == 0:
        return mask.cpu().clone()

    # Ranking only the kept units is several times faster than ranking all of them at high sparsity.
    kept_indices = kept.nonzero().squeeze(1)
    drop_units = unit_scores(drop_scores.cpu().float(), pattern)[kept_indices]
    dropped = kept_indices[torch.topk(drop_units, num_moved, largest=False, sorted=False).indices]
    after_drop = kept.clone()
    after_drop[dropped] = False

    grow_units = unit_scores(grow_scores.cpu().float(), pattern).clone()
    grow_units[after_drop] = float("-inf")
    grown = torch.topk(grow_units, num_moved, largest=True, sorted=False).indices
    after_drop[grown] = True
    return expand_units(after_drop, pattern, mask.shape)


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Return pruned entries over all entries of ``masks``, each tensor counted once."""
    total = sum(mask.numel() for mask in masks.values())
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    return pruned / total if total else 0.0


@torch.no_grad()
def apply_masks(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero in place the entries of ``tensors`` that ``masks`` prunes; tensors keep their identity."""
    for name, tensor in tensors.items():
        tensor.mul_(masks[name].to(device=tensor.device, dtype=tensor.dtype))
