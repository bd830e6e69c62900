"""Lightning glue of structured pruning: checkpoint replay, optimizer rebuild, DDP and example inputs."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_weightlight.pruning.structured_core import ChannelGroup, make_example_input, replay_plans

log = logging.getLogger(__name__)

STATE_FORMAT = "weightlight.structured/1"
"""Marks the checkpoint state of a ``StructuredPruning`` callback, whatever its ``state_key``."""

_APPLIED_ATTRIBUTE = "_weightlight_structured_plans"


def applied_plans(model: nn.Module, state_key: str) -> list[dict[str, list[int]]]:
    """Return the list of plans that the callback with ``state_key`` has applied to ``model``.

    The list lives in the module's ``__dict__``, outside its parameters and state dict, so that a
    model that already carries some pruning steps gets only the missing ones when replayed.
    """
    registry = model.__dict__.setdefault(_APPLIED_ATTRIBUTE, {})
    return registry.setdefault(state_key, [])


def restore_structure(model: nn.Module, state_key: str, state: Mapping[str, Any]) -> int:
    """Replay the pruning steps of a checkpoint state on ``model`` that it does not carry yet.

    Returns:
        The number of steps replayed.

    Raises:
        ValueError: ``model`` carries pruning steps that differ from the checkpoint's.
    """
    plans = [record["plan"] for record in state["history"]]
    done = applied_plans(model, state_key)
    if done != plans[: len(done)]:
        raise ValueError(
            f"{state_key}: the model carries {len(done)} pruning steps that differ from the checkpoint's "
            f"{len(plans)} steps; load the checkpoint into a fresh instance of the model class"
        )
    remaining = plans[len(done) :]
    if remaining:
        if state.get("example_input") is None:
            raise ValueError(f"{state_key}: the checkpoint state has no example input to trace the model")
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
        replay_plans(model, remaining, make_example_input(state["example_input"], device))
        done.extend(remaining)
    return len(remaining)


_REPLAY_HOOKS = "_weightlight_replay_hooks"


def install_replay_hook(
    pl_module: L.LightningModule, replay: Callable[[L.LightningModule, dict[str, Any]], None]
) -> None:
    """Run ``replay(pl_module, checkpoint)`` when Lightning next passes a checkpoint to ``pl_module``.

    Lightning calls ``pl_module.on_load_checkpoint`` right before it loads the weights, so the
    replay rebuilds the pruned structure in time. The wrapper is an attribute of this instance only:
    it calls every installed replay and then the class's own hook, and removes itself on first use.
    """
    replays = pl_module.__dict__.get(_REPLAY_HOOKS)
    if replays is None:
        replays = []
        pl_module.__dict__[_REPLAY_HOOKS] = replays

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            remove_replay_hook(pl_module)
            for item in replays:
                item(pl_module, checkpoint)
            type(pl_module).on_load_checkpoint(pl_module, checkpoint)

        pl_module.__dict__["on_load_checkpoint"] = on_load_checkpoint
    if replay not in replays:
        replays.append(replay)


def remove_replay_hook(pl_module: L.LightningModule) -> None:
    """Remove the wrapper of :func:`install_replay_hook`, if it is still there."""
    pl_module.__dict__.pop("on_load_checkpoint", None)
    pl_module.__dict__.pop(_REPLAY_HOOKS, None)


def load_structured_checkpoint(
    cls: type[L.LightningModule],
    checkpoint_path: str | Path,
    map_location: Any = "cpu",
    strict: bool = True,
    weights_only: bool = True,
    **kwargs: Any,
) -> L.LightningModule:
    """Load a checkpoint of a structurally pruned model into a fresh instance of ``cls``.

    The counterpart of ``LightningModule.load_from_checkpoint``: it builds ``cls`` from the saved
    hyperparameters (updated with ``kwargs``), replays the pruning steps of every
    ``StructuredPruning`` state in the checkpoint, then loads the weights.

    Args:
        cls: The LightningModule class the checkpoint was trained with.
        checkpoint_path: Path of the ``.ckpt`` file.
        map_location: Passed to ``torch.load``.
        strict: Passed to ``load_state_dict``.
        weights_only: Passed to ``torch.load``. Set it to ``False`` for a checkpoint whose
            hyperparameters are objects other than tensors and plain Python values (this runs
            pickled code: only for checkpoints you trust).
        **kwargs: Constructor arguments that replace the saved hyperparameters.

    Returns:
        The model with the pruned structure and the checkpoint's weights, in training mode as
        constructed (call ``eval()`` for inference).
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=weights_only)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    parameters = inspect.signature(cls.__init__).parameters
    if not any(item.kind is inspect.Parameter.VAR_KEYWORD for item in parameters.values()):
        hparams = {key: value for key, value in hparams.items() if key in parameters}
    hparams.update(kwargs)
    model = cls(**hparams)

    restored = 0
    for state_key, state in checkpoint.get("callbacks", {}).items():
        if isinstance(state, Mapping) and state.get("format") == STATE_FORMAT:
            restored += restore_structure(model, state_key, state)
    log.debug("replayed %d structured pruning steps from %s", restored, checkpoint_path)
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model


@dataclass
class OptimizerSnapshot:
    """Optimizer state by parameter name, hyperparameters of each group, and LR scheduler states."""

    states: list[dict[str, tuple[torch.Tensor, dict[str, Any]]]] = field(default_factory=list)
    hyperparameters: list[list[dict[str, Any]]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)


def snapshot_optimizers(trainer: L.Trainer, pl_module: L.LightningModule) -> OptimizerSnapshot:
    """Record the optimizers and LR schedulers of ``trainer`` before the model changes."""
    names = {id(parameter): name for name, parameter in pl_module.named_parameters()}
    snapshot = OptimizerSnapshot()
    for optimizer in trainer.strategy.optimizers:
        states = {}
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if id(parameter) in names and parameter in optimizer.state:
                    states[names[id(parameter)]] = (parameter, optimizer.state[parameter])
        snapshot.states.append(states)
        snapshot.hyperparameters.append(
            [
                {key: value for key, value in group.items() if key != "params"}
                for group in optimizer.param_groups
            ]
        )
    snapshot.schedulers = [config.scheduler.state_dict() for config in trainer.strategy.lr_scheduler_configs]
    return snapshot


def rebuild_optimizers(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    snapshot: OptimizerSnapshot,
    kept: Mapping[str, torch.Tensor],
) -> None:
    """Rebuild the optimizers and LR schedulers from ``configure_optimizers`` after pruning.

    Each parameter group gets the hyperparameters it had (the current learning rate among them) and
    each LR scheduler its state, so the schedule continues where it was. Optimizer state (Adam
    moments, momentum) carries over: whole for the parameters the pruning step left alone, and cut
    to the kept entries, given by ``kept`` (from ``kept_positions``), for the pruned ones.
    """
    strategy = trainer.strategy
    if not strategy.optimizers:
        return
    strategy.setup_optimizers(trainer)
    _optimizers_to_device(strategy.optimizers, strategy.root_device)
    if len(strategy.optimizers) != len(snapshot.states) or len(strategy.lr_scheduler_configs) != len(
        snapshot.schedulers
    ):
        warnings.warn(
            "StructuredPruning: configure_optimizers returned a different number of optimizers or LR "
            "schedulers after pruning, so they start from their initial state",
            UserWarning,
            stacklevel=2,
        )
        return

    names = {id(parameter): name for name, parameter in pl_module.named_parameters()}
    for optimizer, states, hyperparameters in zip(
        strategy.optimizers, snapshot.states, snapshot.hyperparameters
    ):
        if len(optimizer.param_groups) == len(hyperparameters):
            for group, saved in zip(optimizer.param_groups, hyperparameters):
                group.update(saved)
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                name = names.get(id(parameter), "")
                if name not in states:
                    continue
                old_parameter, state = states[name]
                if old_parameter is parameter:
                    optimizer.state[parameter] = state
                elif name in kept and len(kept[name]) == parameter.numel():
                    optimizer.state[parameter] = {
                        key: _cut(value, old_parameter, kept[name], parameter) for key, value in state.items()
                    }
    for config, state in zip(strategy.lr_scheduler_configs, snapshot.schedulers):
        config.scheduler.load_state_dict(state)


def _cut(value: Any, old_parameter: torch.Tensor, kept: torch.Tensor, parameter: torch.Tensor) -> Any:
    """Cut an optimizer state tensor shaped like ``old_parameter`` to the kept entries."""
    if isinstance(value, torch.Tensor) and value.shape == old_parameter.shape:
        return value.flatten()[kept.to(value.device)].view_as(parameter).clone()
    return value


def rewrap_distributed(trainer: L.Trainer) -> None:
    """Wrap the pruned LightningModule in a new ``DistributedDataParallel`` when the strategy uses one.

    DDP registers the parameters and their shapes when it is built, so after pruning it must be
    built again. Its constructor checks that every rank has the same shapes.
    """
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "configure_ddp"):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def example_from_batch(batch: Any) -> Any:
    """Take the first row of a training batch's input: the batch itself or its first element."""
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0][:1]
    raise ValueError(
        "example input: the LightningModule has no `example_input_array` and the training batch is a "
        f"{type(batch).__name__}, not a tensor or a tuple starting with the input tensor; set "
        "`self.example_input_array` in the LightningModule to an input that `forward` accepts"
    )


def check_gradients(groups: Sequence[ChannelGroup]) -> None:
    """Raise when a layer of ``groups`` has no gradient, which Taylor importance needs."""
    missing = [
        item.root
        for item in groups
        if any(
            dep.target.module.weight.grad is None
            for dep, _ in item.group
            if hasattr(dep.target.module, "weight")
        )
    ]
    if missing:
        raise RuntimeError(
            f"importance='taylor': layers {missing} have no gradients at the pruning step; prune after "
            "at least one optimizer step of automatic optimization"
        )


def average_over_ranks(trainer: L.Trainer, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average channel scores over the processes of a distributed run, in one collective call."""
    if trainer.world_size <= 1 or not scores:
        return scores
    flat = torch.cat(list(scores.values())).to(trainer.strategy.root_device)
    flat = trainer.strategy.reduce(flat, reduce_op="mean").cpu()
    return dict(zip(scores, torch.split(flat, [len(score) for score in scores.values()])))
