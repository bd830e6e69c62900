"""The zero_pruned_ op that the pruning callbacks run every step, against its reference."""

from __future__ import annotations

import pytest
import torch

from lightning_weightlight.kernels import ops, reference

ISAS = ["avx512", "avx2", "scalar"]
# Sizes around the 64-entry group of the AVX-512 path, and one split across two threads.
NUMELS = [0, 1, 63, 64, 65, 130, 4096 * 3 + 17]


@pytest.fixture(params=ISAS)
def isa(request):
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa("auto")


def masked_pair(numel: int, seed: int, keep_share: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(numel, generator=generator)
    keep = torch.rand(numel, generator=generator) < keep_share
    return tensor, keep


@pytest.mark.parametrize("numel", NUMELS)
def test_zero_pruned_matches_reference(isa, numel):
    tensor, keep = masked_pair(numel, seed=numel)
    expected = tensor.clone()
    reference.zero_pruned_([expected], [keep])
    ops.zero_pruned_([tensor], [keep])
    assert torch.equal(tensor, expected)
    assert torch.equal(tensor[keep], expected[keep])
    assert int((tensor[~keep] != 0).sum()) == 0


def test_zero_pruned_by_hand():
    tensor = torch.tensor([[1.0, -2.0, 3.0], [float("nan"), float("inf"), -0.5]])
    keep = torch.tensor([[True, False, True], [False, False, True]])
    ops.zero_pruned_([tensor], [keep])
    assert tensor.tolist() == [[1.0, 0.0, 3.0], [0.0, 0.0, -0.5]]


def test_zero_pruned_several_tensors_and_threads(isa):
    pairs = [masked_pair(numel, seed=index) for index, numel in enumerate([300_000, 5, 70_001])]
    expected = [tensor.clone() for tensor, _ in pairs]
    reference.zero_pruned_(expected, [keep for _, keep in pairs])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ops.zero_pruned_([tensor for tensor, _ in pairs], [keep for _, keep in pairs])
    finally:
        torch.set_num_threads(threads)
    for (tensor, _), want in zip(pairs, expected):
        assert torch.equal(tensor, want)


def test_zero_pruned_leaves_masked_tensor_unchanged(isa):
    tensor, keep = masked_pair(1000, seed=3)
    tensor[~keep] = 0.0
    before = tensor.clone()
    ops.zero_pruned_([tensor], [keep])
    assert torch.equal(tensor, before)


def test_zero_pruned_empty_lists_do_nothing():
    ops.zero_pruned_([], [])
    reference.zero_pruned_([], [])


def test_zero_pruned_opcheck():
    tensor, keep = masked_pair(257, seed=5)
    torch.library.opcheck(torch.ops.weightlight.zero_pruned_.default, ([tensor.view(257)], [keep]))


@pytest.mark.parametrize(
    ("tensors", "keeps", "message"),
    [
        ([torch.zeros(4, dtype=torch.float64)], [torch.ones(4, dtype=torch.bool)], "float32"),
        ([torch.zeros(4, 4).t()], [torch.ones(16, dtype=torch.bool)], "not contiguous"),
        ([torch.zeros(4)], [torch.ones(4)], "bool"),
        ([torch.zeros(4)], [torch.ones(5, dtype=torch.bool)], r"shape \[5\]"),
        (
            [torch.zeros(8, 4)],
            [torch.ones(4, 8, dtype=torch.bool)],
            r"shape \[4, 8\], but its tensor has shape \[8, 4\]",
        ),
        ([torch.zeros(4)], [], "one mask per tensor"),
    ],
)
def test_zero_pruned_rejects_bad_input(tensors, keeps, message):
    with pytest.raises(RuntimeError, match=message):
        ops.zero_pruned_(tensors, keeps)
