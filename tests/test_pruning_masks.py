"""The functional core of pruning: patterns, exact counts, N:M and block shapes, drop and grow."""

from __future__ import annotations

import pytest
import torch

from lightning_weightlight.pruning import (
    apply_masks,
    compute_masks,
    drop_and_grow,
    magnitude_scores,
    mask_sparsity,
    parse_pattern,
    random_scores,
)


def pruned_count(mask: torch.Tensor) -> int:
    return int((~mask).sum())


@pytest.mark.parametrize(
    ("text", "kind", "fields"),
    [
        ("unstructured", "unstructured", {}),
        ("2:4", "n:m", {"n": 2, "m": 4}),
        ("1:8", "n:m", {"n": 1, "m": 8}),
        ("1x4", "block", {"rows": 1, "cols": 4}),
        ("16x16", "block", {"rows": 16, "cols": 16}),
        ("1x1", "unstructured", {}),
    ],
)
def test_parse_pattern_accepts(text, kind, fields):
    pattern = parse_pattern(text)
    assert pattern.kind == kind
    for key, value in fields.items():
        assert getattr(pattern, key) == value


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "0x4", "dense", "2-4", ""])
def test_parse_pattern_rejects_naming_value(text):
    with pytest.raises(ValueError, match=rf"pattern: .*{text!r}"):
        parse_pattern(text)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("shape", [(10,), (7, 13), (8, 3, 3, 3)])
def test_layer_scope_prunes_round_of_target(sparsity, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = compute_masks({"w": magnitude_scores(weight)}, sparsity, parse_pattern("unstructured"))["w"]
    assert mask.shape == weight.shape
    assert mask.dtype == torch.bool
    assert pruned_count(mask) == round(sparsity * weight.numel())


def test_rounding_is_half_to_even():
    # 0.25 * 10 = 2.5 and 0.35 * 10 = 3.5 in floating point round to 2 and 4.
    scores = {"w": torch.arange(1.0, 11.0)}
    assert pruned_count(compute_masks(scores, 0.25, parse_pattern("unstructured"))["w"]) == 2
    assert pruned_count(compute_masks(scores, 0.35, parse_pattern("unstructured"))["w"]) == 4


def test_magnitude_prunes_smallest_entries():
    weight = torch.tensor([[0.5, -0.1, 2.0, -3.0], [0.2, -0.05, 1.0, 0.3]])
    mask = compute_masks({"w": magnitude_scores(weight)}, 0.5, parse_pattern("unstructured"))["w"]
    assert mask.tolist() == [[True, False, True, True], [False, False, True, False]]


def test_global_scope_counts_across_tensors():
    generator = torch.Generator().manual_seed(1)
    small = torch.randn(30, 7, generator=generator) * 0.01
    large = torch.rand(11, 5, generator=generator) + 1.0
    scores = {"small": magnitude_scores(small), "large": magnitude_scores(large)}
    masks = compute_masks(scores, 0.6, parse_pattern("unstructured"), scope="global")
    total = small.numel() + large.numel()
    assert pruned_count(masks["small"]) + pruned_count(masks["large"]) == round(0.6 * total)
    # Every pruned entry comes from the tensor of small magnitudes.
    assert pruned_count(masks["small"]) == round(0.6 * total)
    assert pruned_count(masks["large"]) == 0
    assert mask_sparsity(masks) == round(0.6 * total) / total


def test_n_m_keeps_n_of_every_m_inputs():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    mask = compute_masks({"w": magnitude_scores(weight)}, 0.5, parse_pattern("2:4"))["w"]
    groups = mask.reshape(6, 4, 4)
    assert torch.equal(groups.sum(dim=2), torch.full((6, 4), 2))
    kept_magnitudes = weight.abs().reshape(6, 4, 4)
    for row in range(6):
        for group in range(4):
            values = kept_magnitudes[row, group]
            assert set(values.topk(2).indices.tolist()) == set(
                groups[row, group].nonzero().flatten().tolist()
            )


def test_n_m_below_maximum_counts_exactly():
    weight = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(3))
    mask = compute_masks({"w": magnitude_scores(weight)}, 0.3, parse_pattern("2:4"))["w"]
    assert pruned_count(mask) == round(0.3 * weight.numel())
    assert int((~mask).reshape(-1, 4).sum(dim=1).max()) <= 2


def test_n_m_above_maximum_raises():
    with pytest.raises(ValueError, match=r"sparsity: pattern 2:4 allows at most 0.5, but got 0.6"):
        compute_masks({"w": torch.rand(4, 8)}, 0.6, parse_pattern("2:4"))


@pytest.mark.parametrize(("pattern", "shape"), [("1x4", (8, 16)), ("4x1", (8, 16)), ("8x1", (16, 2, 3, 3))])
def test_blocks_are_pruned_whole(pattern, shape):
    parsed = parse_pattern(pattern)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    mask = compute_masks({"w": magnitude_scores(weight)}, 0.7, parsed)["w"]
    matrix = mask.reshape(shape[0], -1)
    blocks = matrix.reshape(shape[0] // parsed.rows, parsed.rows, -1, parsed.cols)
    block_kept = blocks.any(dim=3).any(dim=1)
    assert torch.equal(blocks.all(dim=3).all(dim=1), block_kept)
    assert int((~block_kept).sum()) == round(0.7 * block_kept.numel())
    assert pruned_count(mask) == round(0.7 * block_kept.numel()) * parsed.rows * parsed.cols


def test_blocks_rank_by_l1_norm():
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 5.0]])
    mask = compute_masks({"w": magnitude_scores(weight)}, 0.5, parse_pattern("1x4"))["w"]
    # The first block (L1 norm 4.0) is pruned: the second holds small entries but an L1 norm of 5.3.
    assert mask.tolist() == [[False] * 4 + [True] * 4]


def test_16x16_block_that_does_not_divide_raises():
    with pytest.raises(ValueError, match=r"pattern: tensor 'w' cannot be pruned with 16x16: block 16x16"):
        compute_masks({"w": torch.rand(24, 32)}, 0.5, parse_pattern("16x16"))


def test_previous_masks_stay_pruned():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(20, 20, generator=generator)
    first = compute_masks({"w": random_scores(weight, generator)}, 0.3, parse_pattern("unstructured"))
    second = compute_masks(
        {"w": random_scores(weight, generator)}, 0.6, parse_pattern("unstructured"), previous=first
    )
    assert pruned_count(second["w"]) == 240
    assert not bool((second["w"] & ~first["w"]).any())


def test_random_scores_follow_generator():
    weight = torch.empty(4, 5)
    first = random_scores(weight, torch.Generator().manual_seed(7))
    second = random_scores(weight, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_drop_and_grow_keeps_count_and_follows_gradient():
    weight = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.5, 0.0]])
    mask = weight != 0
    grad = torch.tensor([[0.0, 0.0, 3.0, 0.2, 0.0, 0.1]])
    new = drop_and_grow(
        mask, magnitude_scores(weight), magnitude_scores(grad), 1 / 3, parse_pattern("unstructured")
    )
    # One of the three kept entries moves: the smallest (0.1) is dropped, the largest gradient regrows.
    assert new.tolist() == [[True, False, True, False, True, False]]


def test_drop_and_grow_in_blocks():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(4, 16, generator=generator)
    pattern = parse_pattern("1x4")
    mask = compute_masks({"w": magnitude_scores(weight)}, 0.5, pattern)["w"]
    new = drop_and_grow(
        mask, magnitude_scores(weight * mask), torch.rand(4, 16, generator=generator), 0.5, pattern
    )
    assert pruned_count(new) == pruned_count(mask)
    blocks = new.reshape(4, 4, 4)
    assert torch.equal(blocks.all(dim=2), blocks.any(dim=2))
    assert not torch.equal(new, mask)


def test_apply_masks_zeroes_in_place():
    weight = torch.nn.Parameter(torch.ones(3, 4))
    before = weight.data_ptr()
    mask = torch.tensor([[True, False, True, False]] * 3)
    apply_masks({"w": weight}, {"w": mask})
    assert weight.data_ptr() == before
    assert torch.equal(weight.detach() != 0, mask)
