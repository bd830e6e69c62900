"""The functional core of structured pruning on torch-pruning's dependency graph, without a Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_weightlight.pruning import structured_core as core
from tests.structured_models import ChainMLP, ResidualCNN, TokenMLP

IMAGE = torch.zeros(1, 1, 8, 8)


def prune_once(model: nn.Module, example, ratio: float, ignored: set[str], **options) -> core.Plan:
    graph = core.build_dependency_graph(model, example)
    groups, _ = core.prunable_groups(graph, model, ignored)
    scores = core.score_groups(groups, core.build_importance("l2"))
    plan = core.plan_removal(scores, {item.root: item.channels for item in groups}, ratio, **options)
    core.apply_plan(graph, model, plan)
    return plan


def test_residual_channels_removed_together():
    torch.manual_seed(0)
    model = ResidualCNN(width=16)
    reference = copy.deepcopy(model)
    plan = prune_once(model, IMAGE, 0.5, {"head"})

    # stem and conv2 are summed, so they form one group with a single list of removed channels.
    assert "stem" in plan or "conv2" in plan
    removed = plan.get("stem", plan.get("conv2"))
    kept = [index for index in range(16) if index not in removed]
    assert len(removed) == 8
    assert model.stem.out_channels == 8
    assert model.conv2.out_channels == 8
    assert model.stem_bn.num_features == 8
    assert model.bn2.num_features == 8
    assert model.conv1.in_channels == 8
    assert model.expand.in_channels == 8
    assert torch.equal(model.stem.weight, reference.stem.weight[kept])
    assert torch.equal(
        model.conv2.weight, reference.conv2.weight[kept][:, [i for i in range(16) if i not in plan["conv1"]]]
    )
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_one_channel_conv_not_depthwise():
    model = ResidualCNN(width=16)
    graph = core.build_dependency_graph(model, IMAGE)
    groups, skipped = core.prunable_groups(graph, model, {"head"})
    plan = core.plan_removal(core.score_groups(groups, core.build_importance("l1")), {}, 0.5)
    core.apply_plan(graph, model, plan)

    # A depthwise convolution ties its input channels to its output channels; this one must not.
    assert model.squeeze.out_channels == 1
    assert model.squeeze.in_channels == 16
    assert model.squeeze.groups == 1
    assert model.spatial.in_features == 64
    assert skipped == {"squeeze": "it has only one output channel"}


def test_head_keeps_output_size():
    model = ResidualCNN(width=16)
    prune_once(model, IMAGE, 0.5, {"head"})
    assert model.head.out_features == 10
    assert model.head.in_features == 16
    assert model.spatial.out_features == 16


def test_chained_layers_param_count():
    model = ChainMLP(hidden=128)
    before = sum(parameter.numel() for parameter in model.parameters())
    prune_once(model, torch.zeros(1, 64), 0.5, {"out"})
    after = sum(parameter.numel() for parameter in model.parameters())

    assert before == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert after == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    # The hidden-to-hidden layer loses rows and columns: 1 - (1 - 0.5) ** 2 of its weights.
    assert model.fc2.weight.numel() == 128 * 128 * (1 - 0.5) ** 2
    # fc1 and the head keep their fixed input and output sizes, so they lose only half.
    assert 1 - after / before == pytest.approx(1 - 8970 / 26122)


def test_token_mlp_block_prunes():
    torch.manual_seed(0)
    model = TokenMLP(dim=32, hidden=64)
    prune_once(model, model.example_input_array, 0.5, {"head"})

    assert model.fc1.out_features == 32
    assert model.fc2.in_features == 32
    # The residual stream ties embed, the LayerNorm, fc1's input and fc2's output together.
    assert model.embed.out_features == 16
    assert model.norm.normalized_shape == (16,)
    assert model.fc2.out_features == 16
    assert model.head.in_features == 16
    assert model.head.out_features == 10
    assert model(torch.randn(3, 8, 8)).shape == (3, 10)


def test_replay_rebuilds_same_model():
    torch.manual_seed(0)
    model = ResidualCNN(width=16)
    fresh = copy.deepcopy(model)
    plans = [prune_once(model, IMAGE, 0.25, {"head"}), prune_once(model, IMAGE, 0.5, {"head"})]

    core.replay_plans(fresh, plans, IMAGE)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_plan_per_layer_and_global():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    initial = {"a": 4, "b": 4}
    assert core.plan_removal(scores, initial, 0.5) == {"a": [0, 1], "b": [0, 1]}
    # Globally the low scores of "a" go first, down to the one channel every layer keeps.
    assert core.plan_removal(scores, initial, 0.5, global_ranking=True) == {"a": [0, 1, 2], "b": [0]}
    assert core.plan_removal(scores, initial, 0.5, global_ranking=True, max_layer_ratio=0.5) == {
        "a": [0, 1],
        "b": [0, 1],
    }


def test_plan_round_to_and_ties():
    scores = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}
    # 8 * (1 - 0.3) = 5.6 keeps 6 channels; round_to=4 keeps the multiple of 4 below, 4.
    assert core.plan_removal(scores, {"a": 8}, 0.3) == {"a": [0, 1]}
    assert core.plan_removal(scores, {"a": 8}, 0.3, round_to=4) == {"a": [0, 1, 2, 3]}
    # A ratio counts from the initial channels, so a second step removes only the difference.
    assert core.plan_removal({"a": torch.ones(6)}, {"a": 8}, 0.5) == {"a": [0, 1]}


def test_reduction_search_reaches_params():
    torch.manual_seed(0)
    model = ChainMLP(hidden=128)
    example = torch.zeros(1, 64)
    graph = core.build_dependency_graph(model, example)
    groups, _ = core.prunable_groups(graph, model, {"out"})
    scores = core.score_groups(groups, core.build_importance("l1"))
    initial = {item.root: item.channels for item in groups}
    params, _ = core.count_params_and_macs(model, example)

    ratio, plan = core.ratio_for_reduction(model, example, scores, initial, 0.5, params, "params")
    core.apply_plan(graph, model, plan)
    after, _ = core.count_params_and_macs(model, example)
    assert after <= params * 0.5
    smaller = core.plan_removal(scores, initial, ratio - 0.01)
    trial = ChainMLP(hidden=128)
    core.replay_plans(trial, [smaller], example)
    assert core.count_params_and_macs(trial, example)[0] > params * 0.5


def test_tracing_keeps_batchnorm_statistics():
    model = ResidualCNN(width=8).train()
    before = model.stem_bn.running_mean.clone(), int(model.stem_bn.num_batches_tracked)
    core.build_dependency_graph(model, torch.randn(2, 1, 8, 8))
    assert torch.equal(model.stem_bn.running_mean, before[0])
    assert int(model.stem_bn.num_batches_tracked) == before[1]
    assert model.training
    assert model.stem_bn.training


def test_example_input_description_round_trip():
    example = (torch.zeros(2, 3), {"mask": torch.ones(2, dtype=torch.bool)}, 4)
    rebuilt = core.make_example_input(core.describe_example_input(example))
    assert rebuilt[0].shape == (2, 3)
    assert rebuilt[1]["mask"].dtype == torch.bool
    assert rebuilt[2] == 4


@pytest.mark.parametrize("name", core.IMPORTANCES)
def test_every_importance_scores_cnn(name):
    torch.manual_seed(0)
    model = ResidualCNN(width=8)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    graph = core.build_dependency_graph(model, IMAGE)
    groups, _ = core.prunable_groups(graph, model, {"head"})
    scores = core.score_groups(groups, core.build_importance(name))
    # BatchNorm scales exist only in the groups of stem/conv2 and conv1.
    expected = {"conv1", "conv2"} if name == "bn_scale" else {item.root for item in groups}
    assert set(scores) == expected
    for item in groups:
        if item.root in scores:
            assert scores[item.root].shape == (item.channels,)


def test_unknown_importance_raises():
    with pytest.raises(ValueError, match=r"importance: expected one of .*'l1'.*, but got 'l3'"):
        core.build_importance("l3")


class InputResidual(nn.Module):
    """An MLP block added to the model's input: the trace sees no layer producing that input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def test_group_tied_to_input_found():
    model = InputResidual()
    example = torch.zeros(1, 16)
    graph = core.build_dependency_graph(model, example)
    groups, _ = core.prunable_groups(graph, model, {"head"})
    assert sorted(item.root for item in groups) == ["fc1", "fc2"]

    breaking = core.find_breaking_groups(model, example, [item.root for item in groups])
    assert list(breaking) == ["fc2"]
    assert "RuntimeError" in breaking["fc2"]
    assert model.fc2.out_features == 16

    scores = core.score_groups([item for item in groups if item.root == "fc1"], core.build_importance("l2"))
    core.apply_plan(graph, model, core.plan_removal(scores, {"fc1": 32}, 0.5))
    assert model.fc1.out_features == 16
    assert model(torch.randn(2, 16)).shape == (2, 4)
