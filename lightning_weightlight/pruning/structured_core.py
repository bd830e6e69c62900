"""Functional core of structured pruning on torch-pruning's dependency graph.

Plain functions over modules and tensors, usable without Lightning. They trace a dependency
graph, score the channels of every prunable group, plan which channels to remove for a target
ratio, apply the plan, and replay recorded plans on a fresh model. A plan maps the name of each
group's root layer to the output channel indices removed from it. Applied in order, the same plans
rebuild the same structure, so a checkpoint never needs the pickled model.

Example:
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> example = torch.zeros(1, 8)
    >>> graph = build_dependency_graph(model, example)
    >>> groups, skipped = prunable_groups(graph, model, ignored={"2"})
    >>> scores = score_groups(groups, build_importance("l1"))
    >>> plan = plan_removal(scores, {"0": 16}, ratio=0.5)
    >>> apply_plan(graph, model, plan)
    >>> model[0].out_features, model[2].in_features, model[2].out_features
    (8, 8, 4)
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "lamp")
"""Importance criteria by the names used in arguments and YAML files."""

GROUP_REDUCTIONS = ("mean", "sum", "max", "prod", "first")
"""Reductions that combine the scores of a group's coupled layers into one score per channel."""

ROOT_LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}
"""Layer types whose output channels can start a pruning group."""

Plan = dict[str, list[int]]
"""Output channel indices to remove, by the qualified name of each group's root layer."""


@dataclass
class ChannelGroup:
    """A set of coupled channels: the output channels of ``root`` and everything tied to them."""

    root: str
    channels: int
    group: Any
    """The full-index ``torch_pruning`` group used for scoring."""


def build_importance(name: str, group_reduction: str = "mean") -> tp.importance.Importance:
    """Build the torch-pruning importance estimator for one of :data:`IMPORTANCES`.

    ``l1`` and ``l2`` are channel weight norms, ``taylor`` is the first-order Taylor score
    ``|weight * grad|`` (it needs gradients), ``bn_scale`` the absolute BatchNorm scale of the
    channel, and ``lamp`` the layer-adaptive magnitude score, which is comparable across layers.
    """
    if name not in IMPORTANCES:
        raise ValueError(f"importance: expected one of {list(IMPORTANCES)}, but got {name!r}")
    if group_reduction not in GROUP_REDUCTIONS:
        raise ValueError(
            f"group_reduction: expected one of {list(GROUP_REDUCTIONS)}, but got {group_reduction!r}"
        )
    if name in ("l1", "l2"):
        return tp.importance.MagnitudeImportance(p=1 if name == "l1" else 2, group_reduction=group_reduction)
    if name == "taylor":
        return tp.importance.TaylorImportance(group_reduction=group_reduction)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance(group_reduction=group_reduction)
    return tp.importance.LAMPImportance(group_reduction=group_reduction)


def describe_example_input(example: Any) -> Any:
    """Reduce an example input to shapes and dtypes, so that a checkpoint can store it."""
    if isinstance(example, torch.Tensor):
        return {"shape": list(example.shape), "dtype": str(example.dtype).removeprefix("torch.")}
    if isinstance(example, (tuple, list)):
        return {"sequence": [describe_example_input(item) for item in example]}
    if isinstance(example, Mapping):
        return {"mapping": {key: describe_example_input(value) for key, value in example.items()}}
    if example is None or isinstance(example, (bool, int, float, str)):
        return {"value": example}
    raise TypeError(
        "example input: expected tensors, or tuples, lists and dicts of them, "
        f"but got {type(example).__name__}"
    )


def make_example_input(description: Any, device: torch.device | str = "cpu") -> Any:
    """Build zero tensors from :func:`describe_example_input`'s description."""
    if "shape" in description:
        return torch.zeros(description["shape"], dtype=getattr(torch, description["dtype"]), device=device)
    if "sequence" in description:
        return tuple(make_example_input(item, device) for item in description["sequence"])
    if "mapping" in description:
        return {key: make_example_input(value, device) for key, value in description["mapping"].items()}
    return description["value"]


def build_dependency_graph(model: nn.Module, example_input: Any) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_input`` into a torch-pruning dependency graph.

    Tracing runs a forward pass in eval mode with gradients enabled, so BatchNorm statistics do not
    change; every module's training flag is restored afterwards. A tuple input is passed as
    positional arguments and a dict as keyword arguments, as ``LightningModule.example_input_array``.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # Parameters outside standard layers (such as a learned scale) are reported by the
            # check of ``prunable_groups``, which names them; torch-pruning's own notice repeats it.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    finally:
        for module, training in modes.items():
            module.training = training
    return graph


def prunable_groups(
    graph: tp.DependencyGraph,
    model: nn.Module,
    ignored: set[str],
    layer_types: Sequence[type[nn.Module]] = tuple(ROOT_LAYER_TYPES.values()),
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """List the groups whose output channels may be removed, and the layers that cannot be pruned.

    Args:
        graph: The dependency graph of ``model``.
        model: The traced model.
        ignored: Qualified names of layers whose output channels must stay (the head, say). Groups
            coupled with such a layer, through a residual addition for example, stay whole too.
        layer_types: Types of the layers that can be a group's root.

    Returns:
        The prunable groups in graph order, and ``{layer name: reason}`` for every layer of
        ``layer_types`` that is neither ignored nor part of a prunable group.
    """
    names = {module: name for name, module in model.named_modules()}
    modules = {name: module for module, name in names.items()}
    ignored_modules = [module for module, name in names.items() if name in ignored]
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    reached: set[str] = set()
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=tuple(layer_types)):
        root = group[0].dep.target.module
        members = [
            names[dep.target.module]
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler)
            and isinstance(dep.target.module, tuple(layer_types))
            and dep.target.module in names
        ]
        reached.update(members)
        grouped = [
            names[dep.target.module]
            for dep, _ in group
            if isinstance(dep.target.module, nn.modules.conv._ConvNd)
            and 1 < dep.target.module.groups < dep.target.module.out_channels
        ]
        channels = graph.get_out_channels(root)
        widths = {name: graph.get_out_channels(modules[name]) for name in members}
        if len(set(widths.values())) > 1:
            # torch-pruning couples both operands of a broadcasting product, such as a 1-channel
            # gate times a feature map, and would index past the narrow one.
            reason = f"its channels are joined by broadcasting to layers of other widths {widths}"
        elif grouped:
            reason = f"its channels are tied to the grouped convolutions {grouped}, which are not supported"
        elif channels <= 1:
            reason = "it has only one output channel"
        else:
            groups.append(ChannelGroup(root=names[root], channels=channels, group=group))
            continue
        for name in members:
            skipped[name] = reason

    for module, name in names.items():
        if isinstance(module, tuple(layer_types)) and name not in ignored and name not in reached:
            skipped[name] = "its channels are tied to an ignored layer, or the trace did not reach it"
    return groups, skipped


def run_forward(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` on an example input the way tracing does: a tuple as arguments, a dict as keywords."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def find_breaking_groups(model: nn.Module, example_input: Any, roots: Sequence[str]) -> dict[str, str]:
    """Find the groups whose channels cannot be removed without breaking ``model``'s forward pass.

    The dependency graph does not see every coupling: a residual addition with the model's input,
    for example, ties channels to a tensor that no layer produces. Each check removes one channel
    from a copy of ``model`` and runs the forward pass; the model itself does not change. All
    groups are tried together first, so a model without such groups costs one check.

    Returns:
        ``{root layer name: the error of the forward pass}`` for every breaking group.
    """

    def error_after_removal(names: Sequence[str]) -> str | None:
        trial = copy.deepcopy(model).eval()
        try:
            replay_plans(trial, [{name: [0] for name in names}], example_input)
            with torch.no_grad():
                run_forward(trial, example_input)
        except Exception as error:
            # Whatever the user's forward pass raises, the group is unsafe to prune.
            return f"{type(error).__name__}: {error}"
        return None

    if not roots or error_after_removal(roots) is None:
        return {}
    errors = {name: error_after_removal([name]) for name in roots}
    return {name: error for name, error in errors.items() if error is not None}


def score_groups(
    groups: Sequence[ChannelGroup], importance: tp.importance.Importance
) -> dict[str, torch.Tensor]:
    """Score every channel of every group with ``importance``; higher means more important.

    Groups that the importance cannot score are left out: ``bn_scale`` scores only groups with a
    BatchNorm layer.
    """
    scores = {}
    for item in groups:
        score = importance(item.group)
        if score is None:
            continue
        if len(score) != item.channels:
            raise RuntimeError(
                f"importance {type(importance).__name__} returned {len(score)} scores for the "
                f"{item.channels} channels of the group of {item.root!r}; choose another importance"
            )
        scores[item.root] = torch.nan_to_num(score.detach().float().cpu(), nan=0.0)
    return scores


def _round_keep(keep: int, channels: int, round_to: int | None) -> int:
    if round_to and round_to > 1:
        keep = max(round_to, keep - keep % round_to)
    return min(channels, max(1, keep))


def plan_removal(
    scores: Mapping[str, torch.Tensor],
    initial_channels: Mapping[str, int],
    ratio: float,
    *,
    global_ranking: bool = False,
    max_layer_ratio: float = 1.0,
    round_to: int | None = None,
) -> Plan:
    """Choose the channels to remove so that ``ratio`` of the initial channels are gone.

    Args:
        scores: Channel scores of each group's root layer, as from :func:`score_groups`.
        initial_channels: Channels of each root layer before any pruning; the ratio counts from them.
        ratio: Fraction of the initial channels to remove, in [0, 1).
        global_ranking: Rank all channels of all groups together, so that layers lose different
            fractions; otherwise each group loses ``ratio`` of its own channels.
        max_layer_ratio: No layer loses more than this fraction of its initial channels.
        round_to: Keep a multiple of this many channels in every layer: the largest multiple not
            above the target, and at least ``round_to``.

    Returns:
        The channel indices to remove by root layer name, the lowest scores first. Ties go to the
        lower index, so every process computes the same plan from the same scores.
    """
    min_keep = {
        name: max(1, math.ceil(initial_channels.get(name, len(score)) * (1.0 - max_layer_ratio) - 1e-9))
        for name, score in scores.items()
    }
    if global_ranking:
        keep = _global_keep(scores, initial_channels, ratio, min_keep)
    else:
        keep = {
            name: max(min_keep[name], round(initial_channels.get(name, len(score)) * (1.0 - min(ratio, 1.0))))
            for name, score in scores.items()
        }

    plan: Plan = {}
    for name, score in scores.items():
        target = _round_keep(max(keep[name], min_keep[name]), len(score), round_to)
        remove = len(score) - target
        if remove > 0:
            order = torch.sort(score, stable=True).indices
            plan[name] = sorted(order[:remove].tolist())
    return plan


def _global_keep(
    scores: Mapping[str, torch.Tensor],
    initial_channels: Mapping[str, int],
    ratio: float,
    min_keep: Mapping[str, int],
) -> dict[str, int]:
    total_initial = sum(initial_channels.get(name, len(score)) for name, score in scores.items())
    total_now = sum(len(score) for score in scores.values())
    to_remove = total_now - round(total_initial * (1.0 - ratio))
    keep = {name: len(score) for name, score in scores.items()}
    if to_remove <= 0:
        return keep

    names = [name for name, score in scores.items() for _ in range(len(score))]
    flat = torch.cat([score for score in scores.values()])
    for index in torch.sort(flat, stable=True).indices.tolist():
        if to_remove == 0:
            break
        name = names[index]
        if keep[name] > min_keep[name]:
            keep[name] -= 1
            to_remove -= 1
    return keep


def apply_plan(graph: tp.DependencyGraph, model: nn.Module, plan: Mapping[str, Sequence[int]]) -> None:
    """Remove the planned output channels of each root layer and every channel coupled to them."""
    modules = dict(model.named_modules())
    for name, indices in plan.items():
        if not indices:
            continue
        if name not in modules:
            raise ValueError(f"pruning plan: layer {name!r} not found in {type(model).__name__}")
        module = modules[name]
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            raise ValueError(
                f"pruning plan: torch-pruning has no pruner for layer {name!r} ({type(module).__name__})"
            )
        channels = pruner.get_out_channels(module)
        bad = [index for index in indices if not 0 <= index < channels]
        if bad or len(set(indices)) >= channels:
            raise ValueError(
                f"pruning plan: layer {name!r} has {channels} output channels, "
                f"but the plan removes {list(indices)}"
            )
        group = graph.get_pruning_group(module, pruner.prune_out_channels, list(indices))
        group.prune(record_history=False)


def replay_plans(model: nn.Module, plans: Sequence[Mapping[str, Sequence[int]]], example_input: Any) -> None:
    """Apply recorded plans in order to ``model``, which must have the structure they started from."""
    for plan in plans:
        if plan:
            apply_plan(build_dependency_graph(model, example_input), model, plan)


def kept_positions(
    model: nn.Module, plan: Mapping[str, Sequence[int]], example_input: Any
) -> dict[str, torch.Tensor]:
    """Return, for every parameter that ``plan`` shrinks, the flat indices of the entries it keeps.

    The plan is applied to a float64 copy of ``model`` whose parameters hold their own flat indices
    (exact up to 2**53 entries), so the values left after pruning are the kept positions. Tensors
    shaped like a parameter, such as its optimizer state, can then be cut the same way.
    """
    probe = copy.deepcopy(model).double()
    shapes = {}
    with torch.no_grad():
        for name, parameter in probe.named_parameters():
            shapes[name] = parameter.shape
            parameter.copy_(torch.arange(parameter.numel(), dtype=torch.float64).view_as(parameter))
    replay_plans(probe, [plan], _to_double(example_input))
    return {
        name: parameter.detach().flatten().long()
        for name, parameter in probe.named_parameters()
        if parameter.shape != shapes[name]
    }


def _to_double(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example.double() if example.is_floating_point() else example
    if isinstance(example, (tuple, list)):
        return type(example)(_to_double(item) for item in example)
    if isinstance(example, Mapping):
        return {key: _to_double(value) for key, value in example.items()}
    return example


def count_params_and_macs(model: nn.Module, example_input: Any) -> tuple[int, int]:
    """Count the parameters and multiply-accumulates of one forward pass (torch-pruning's counter)."""
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(params), int(macs)


def channels_by_layer(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Return the output channels of the named Linear and convolution layers."""
    modules = dict(model.named_modules())
    counts = {}
    for name in names:
        module = modules[name]
        counts[name] = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return counts


def ratio_for_reduction(
    model: nn.Module,
    example_input: Any,
    scores: Mapping[str, torch.Tensor],
    initial_channels: Mapping[str, int],
    reduction: float,
    initial_count: int,
    measure: str,
    **plan_options: Any,
) -> tuple[float, Plan]:
    """Search the channel ratio whose plan removes ``reduction`` of the initial parameters or MACs.

    Each trial applies a plan to a copy of ``model``, so the model itself does not change.

    Returns:
        The smallest ratio found (to 1/1024) that reaches the reduction, and its plan. When no
        ratio reaches it, the largest ratio below 1 and its plan.
    """
    target_count = initial_count * (1.0 - reduction)

    def count_after(ratio: float) -> tuple[int, Plan]:
        plan = plan_removal(scores, initial_channels, ratio, **plan_options)
        trial = copy.deepcopy(model)
        replay_plans(trial, [plan], example_input)
        params, macs = count_params_and_macs(trial, example_input)
        return (params if measure == "params" else macs), plan

    low, high = 0.0, 1.0 - 1.0 / 1024
    count, plan = count_after(high)
    if count > target_count:
        return high, plan
    best = (high, plan)
    for _ in range(10):
        middle = (low + high) / 2
        count, plan = count_after(middle)
        if count <= target_count:
            high, best = middle, (middle, plan)
        else:
            low = middle
    return best
