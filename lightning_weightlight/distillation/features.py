"""Feature pairs and the learned projections that map student features to the teacher's width."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_weightlight.distillation.losses import FEATURE_LOSSES, feature_channel_dim


@dataclass
class FeaturePair:
    """A student layer whose output is trained to match a teacher layer's output.

    Args:
        student: Name of the student layer, as in the student's ``named_modules()``.
        teacher: Name of the teacher layer, as in the teacher's ``named_modules()``.
        weight: Factor of this pair's loss in the total loss.
        loss: ``"mse"`` or ``"cosine"``.
        teacher_index: Which teacher to take the layer from, when there are several.
    """

    student: str
    teacher: str
    weight: float = 1.0
    loss: str = "mse"
    teacher_index: int = 0


def check_feature_pairs(
    features: Sequence[FeaturePair | Mapping] | None, teacher_count: int
) -> list[FeaturePair]:
    """Return ``features`` as a list of ``FeaturePair`` (dicts are converted), checking every field."""
    pairs = []
    for index, pair in enumerate(features or []):
        if isinstance(pair, Mapping):
            pair = FeaturePair(**pair)
        if not isinstance(pair, FeaturePair):
            raise TypeError(f"features[{index}]: expected a FeaturePair, but got {type(pair).__name__}")
        if pair.loss not in FEATURE_LOSSES:
            raise ValueError(
                f"features[{index}].loss: expected one of {FEATURE_LOSSES}, but got {pair.loss!r}"
            )
        if not pair.weight >= 0:
            raise ValueError(
                f"features[{index}].weight: expected a value of 0 or more, but got {pair.weight}"
            )
        if not 0 <= pair.teacher_index < teacher_count:
            raise ValueError(
                f"features[{index}].teacher_index: expected a value in [0, {teacher_count}), "
                f"but got {pair.teacher_index}"
            )
        pairs.append(pair)
    return pairs


def make_projection(
    index: int, pair: FeaturePair, student: torch.Tensor, teacher: torch.Tensor
) -> nn.Module | None:
    """Return a projection from the student's feature width to the teacher's, or None for equal shapes.

    4-D maps get a 1x1 convolution over dimension 1, other features a Linear layer over the last
    dimension, both without bias. The other dimensions must be equal.
    """
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise ValueError(f"features[{index}]: expected both layers to output tensors, but got {pair}")
    if student.shape == teacher.shape:
        return None
    dim = feature_channel_dim(student.dim()) % student.dim()
    same_rank = student.dim() == teacher.dim()
    if (
        not same_rank
        or student.shape[:dim] + student.shape[dim + 1 :] != teacher.shape[:dim] + teacher.shape[dim + 1 :]
    ):
        raise ValueError(
            f"features[{index}]: expected {pair.student!r} and {pair.teacher!r} to differ "
            f"in channels only, but got shapes {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    in_width, out_width = student.shape[dim], teacher.shape[dim]
    if student.dim() == 4:
        return nn.Conv2d(in_width, out_width, kernel_size=1, bias=False)
    return nn.Linear(in_width, out_width, bias=False)


def add_parameter_group(config: Any, parameters: list[nn.Parameter]) -> None:
    """Add ``parameters`` to the first optimizer of a ``configure_optimizers`` result.

    The new group copies the settings of the optimizer's first parameter group, including
    LR-scheduler entries such as ``initial_lr``, and every LR scheduler of that optimizer gets a
    base learning rate for it, so that schedulers keep working.
    """
    optimizers = list(_find_instances(config, torch.optim.Optimizer))
    if not optimizers:
        raise ValueError(
            "features: the student's configure_optimizers returned no optimizer, so the feature "
            "projections cannot be trained"
        )
    optimizer = optimizers[0]
    group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    group["params"] = parameters
    optimizer.add_param_group(group)
    for scheduler in _find_instances(config, torch.optim.lr_scheduler.LRScheduler):
        if scheduler.optimizer is optimizer and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr.append(group["lr"])


def _find_instances(value: Any, cls: type) -> Iterator[Any]:
    """Yield every instance of ``cls`` in the nested lists, tuples and dicts of ``value``."""
    if isinstance(value, cls):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _find_instances(item, cls)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _find_instances(item, cls)
