"""Forward hooks that record a model's inputs, outputs and intermediate features for one step.

Hooks are registered by layer name when a step starts and removed when it ends, so no hook stays
on the model. A layer that another callback swaps (for a QAT module, for example) is found again
under its name at the next step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ForwardRecord:
    """Arguments, output and layer features of the first forward call of a model in one step."""

    calls: int = 0
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def find_modules(model: nn.Module, names: Sequence[str], argument: str) -> dict[str, nn.Module]:
    """Return the submodules of ``model`` called ``names``, raising ``ValueError`` for a missing one."""
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules:
            candidates = [candidate for candidate in modules if candidate][:20]
            raise ValueError(
                f"{argument}: layer {name!r} not found in {type(model).__name__}; "
                f"expected one of the names from named_modules(), such as {candidates}"
            )
        found[name] = modules[name]
    return found


@contextlib.contextmanager
def record_forward(
    model: nn.Module, feature_layers: Sequence[str] = (), record_call: bool = True
) -> Iterator[ForwardRecord]:
    """Record the first forward call of ``model`` and the outputs of ``feature_layers`` within it.

    Later calls during the same context only increase ``calls``. The hooks are removed on exit,
    also when the body raises.
    """
    record = ForwardRecord()
    handles = []

    def on_model_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if record.calls == 0:
            record.args, record.kwargs, record.output = args, kwargs, output
        record.calls += 1

    def on_feature(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in record.features and record.calls == 0:
                record.features[name] = output

        return hook

    try:
        for name, module in find_modules(model, feature_layers, "features").items():
            handles.append(module.register_forward_hook(on_feature(name)))
        if record_call:
            handles.append(model.register_forward_hook(on_model_forward, with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def select_output(output: Any, key: str | int | None, model_role: str) -> torch.Tensor:
    """Pick the logits out of a forward output: the output itself, ``output[key]`` or ``output.key``."""
    value = output
    if key is not None:
        if isinstance(output, Mapping) or (isinstance(output, (tuple, list)) and isinstance(key, int)):
            value = output[key]
        elif isinstance(key, str) and hasattr(output, key):
            value = getattr(output, key)
        else:
            raise ValueError(
                f"output: cannot select {key!r} from the {model_role}'s output "
                f"of type {type(output).__name__}"
            )
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"output: expected the {model_role}'s forward to give a tensor of logits, "
            f"but got {type(value).__name__}; set output to the key or index of the logits"
        )
    return value
