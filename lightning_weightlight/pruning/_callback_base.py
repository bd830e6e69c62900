"""Code shared by the pruning callbacks: layer choice, mask state, mask enforcement, logging.

The masks are the callback's state, never buffers or hooks on the model. Pruned weights are zeroed in
place, and their gradients are zeroed before every optimizer step. Momentum and Adam's moments
cannot regrow them. For SGD, Adam and AdamW the callback zeroes the momentum of pruned entries
whenever the masks change, so their step cannot move a pruned weight. For any other optimizer a
step post-hook zeroes the pruned weights again after every step. The post-hooks are removed at
the end of fit.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from tabulate import tabulate
from torch import Tensor, nn
from typing_extensions import override

from lightning_weightlight.distillation.module import compression_target
from lightning_weightlight.kernels import ops
from lightning_weightlight.pruning.masks import (
    apply_masks,
    compute_masks,
    magnitude_scores,
    mask_sparsity,
    parse_pattern,
)
from lightning_weightlight.pruning.schedules import OneShot, SparsitySchedule
from lightning_weightlight.selection import select_layers, validate_patterns, validate_types

log = logging.getLogger(__name__)


def _takes_bool_mask(tensor: Tensor) -> bool:
    """Return whether the compiled ``zero_pruned_`` op can mask ``tensor`` in place."""
    on_cpu = tensor.device.type == "cpu"
    return ops.has_cpp() and on_cpu and tensor.dtype == torch.float32 and tensor.is_contiguous()


def _unfused_cpu_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Return whether ``optimizer`` is Adam or AdamW without ``fused=True`` on CPU parameters."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.defaults.get("fused"):
        return False
    return any(param.device.type == "cpu" for group in optimizer.param_groups for param in group["params"])


# Optimizers whose step leaves a weight at exactly zero when the weight, its gradient and the listed
# state of that entry are zero (weight decay scales a zero weight, Adam divides a zero first moment).
# For these, the callbacks zero that state of pruned entries when the masks change, mask the
# gradients, and skip the pass over the weights after the step. Other optimizers get that pass.
_MOMENTUM_STATE: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg",),
    torch.optim.AdamW: ("exp_avg",),
}


@torch.no_grad()
def _zero_pruned(tensors: list[Tensor], masks: list[Tensor]) -> None:
    """Zero the pruned entries of ``tensors`` in place; each mask is bool or in its tensor's dtype.

    Contiguous float32 CPU tensors with bool masks go to the compiled op. That op only reads a weight
    that is already masked, so it writes nothing back. The other tensors are multiplied by their masks.
    """
    compiled_tensors, compiled_masks, multiplied_tensors, multiplied_masks = [], [], [], []
    for tensor, mask in zip(tensors, masks):
        if mask.dtype == torch.bool and _takes_bool_mask(tensor):
            compiled_tensors.append(tensor)
            compiled_masks.append(mask)
        else:
            multiplied_tensors.append(tensor)
            multiplied_masks.append(mask.to(tensor.dtype))
    if compiled_tensors:
        ops.zero_pruned_(compiled_tensors, compiled_masks)
    if multiplied_tensors:
        torch._foreach_mul_(multiplied_tensors, multiplied_masks)


def _check_choice(argument: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{argument}: expected one of {list(allowed)}, but got {value!r}")
    return value


def _check_int(argument: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument}: expected an integer >= {minimum}, but got {value!r}")
    return value


class _PruningCallback(Callback):
    """Base of :class:`WeightPruning` and :class:`DynamicPruning`; see their docstrings for the arguments."""

    _log_prefix = "pruning"

    def __init__(
        self,
        *,
        sparsity: float | None,
        schedule: SparsitySchedule | None,
        include: str | Sequence[str] | None,
        exclude: str | Sequence[str] | None,
        types: str | Sequence[str],
        exclude_head: bool,
        pattern: str,
        prune_bias: bool,
        strict: bool,
        seed: int,
    ) -> None:
        if (sparsity is None) == (schedule is None):
            raise ValueError(
                "sparsity, schedule: expected exactly one of them, "
                f"but got sparsity={sparsity!r} and schedule={schedule!r}"
            )
        if schedule is None:
            schedule = OneShot(sparsity, step=0)
        if not isinstance(schedule, SparsitySchedule):
            raise TypeError(f"schedule: expected a SparsitySchedule, but got {type(schedule).__name__}")
        self.schedule = schedule
        self.pattern = parse_pattern(pattern)
        if schedule.final_sparsity > self.pattern.max_sparsity:
            raise ValueError(
                f"schedule: pattern {self.pattern} allows a sparsity of at most {self.pattern.max_sparsity}, "
                f"but the schedule reaches {schedule.final_sparsity}"
            )
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        validate_types("types", types)
        self.types = [types] if isinstance(types, str) else list(types)
        self.exclude_head = bool(exclude_head)
        if prune_bias and self.pattern.kind != "unstructured":
            raise ValueError(f"prune_bias: expected False with pattern {self.pattern}, but got True")
        self.prune_bias = bool(prune_bias)
        self.strict = bool(strict)
        self.seed = _check_int("seed", seed, minimum=0)

        self._names: list[str] = []
        self._masks: dict[str, Tensor] = {}
        self._sparsity = 0.0
        self._event_step = -1
        self._generator = torch.Generator().manual_seed(self.seed)
        self._loaded_state: dict[str, Any] | None = None
        self._clean_state: set[int] = set()
        self._grads_masked: set[int] = set()
        self._schedule_in_steps: SparsitySchedule | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._device_masks: dict[str, Tensor] = {}
        self._optimizer_pairs: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self._any_pruned = False
        self._hook_handles: list[Any] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            include=self.include, exclude=self.exclude, types=self.types, pattern=str(self.pattern)
        )

    # Selection and validation against the model.

    def _select_parameters(self, pl_module: nn.Module) -> list[str]:
        layers = select_layers(
            pl_module,
            include=self.include or None,
            exclude=self.exclude or None,
            types=self.types,
            exclude_head=self.exclude_head,
            strict=self.strict,
        )
        attributes = ("weight", "bias") if self.prune_bias else ("weight",)
        owners: dict[int, str] = {}
        names = []
        for layer_name, module in layers.items():
            for attribute in attributes:
                param = getattr(module, attribute, None)
                if not isinstance(param, nn.Parameter):
                    continue
                name = f"{layer_name}.{attribute}"
                if id(param) in owners:
                    warnings.warn(
                        f"{type(self).__name__}: {name} is the same tensor as {owners[id(param)]}; "
                        "it is pruned once, under the first name",
                        UserWarning,
                        stacklevel=2,
                    )
                    continue
                if reason := self.pattern.incompatibility(param.shape):
                    message = f"pattern: layer {layer_name!r} cannot take {self.pattern}: {reason}"
                    if self.strict:
                        raise ValueError(f"{message}; leave it out with exclude or pass strict=False")
                    warnings.warn(f"{type(self).__name__} skips {name}: {message}", UserWarning, stacklevel=2)
                    continue
                owners[id(param)] = name
                names.append(name)
        if not names:
            raise ValueError(f"include: the selection leaves no parameter to prune (layers: {list(layers)})")
        return names

    def _reset_state(self) -> None:
        """Forget masks and schedule position, so that one callback object serves several fits."""
        self._masks = {}
        self._sparsity = 0.0
        self._event_step = -1
        self._generator = torch.Generator().manual_seed(self.seed)
        self._loaded_state = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Layer names are the student's own when pl_module is a DistillationModule.
        self._names = self._select_parameters(compression_target(pl_module))
        self._reset_state()

    # State.

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self._names),
            "masks": {name: mask.clone() for name, mask in self._masks.items()},
            "sparsity": self._sparsity,
            "event_step": self._event_step,
            "generator": self._generator.get_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after `setup` and before the optimizers exist, so the state is
        # kept until `on_train_start`, when the parameters can be resolved.
        self._loaded_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self._names:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint prunes {list(state['names'])}, but the current "
                f"selection is {self._names}; use the same include, exclude, types and pattern to resume"
            )
        for name, mask in state["masks"].items():
            if mask.shape != self._params[name].shape:
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint mask of {name} has shape {tuple(mask.shape)}, "
                    f"but the parameter has shape {tuple(self._params[name].shape)}"
                )
        self._masks = {name: mask.bool().cpu().clone() for name, mask in state["masks"].items()}
        self._sparsity = float(state["sparsity"])
        self._event_step = int(state["event_step"])
        self._generator.set_state(state["generator"])

    # Training hooks.

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps_per_epoch = self._steps_per_epoch(trainer)
        if steps_per_epoch is None and self.schedule.uses_epochs():
            raise ValueError(
                f"schedule: expected step arguments because the training dataloader has no length, "
                f"but got epoch arguments in {self.schedule!r}"
            )
        self._schedule_in_steps = self.schedule.in_steps(steps_per_epoch or 1)
        target = compression_target(pl_module)
        self._params = {name: target.get_parameter(name) for name in self._names}
        if self._loaded_state is not None:
            self._restore(self._loaded_state)
            self._loaded_state = None
        if not self._masks:
            self._masks = {
                name: torch.ones(param.shape, dtype=torch.bool) for name, param in self._params.items()
            }
        self._refresh_device_masks()
        apply_masks(self._params, self._device_masks)
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            if trainer.is_global_zero and _unfused_cpu_adam(optimizer):
                log.info(
                    "%s: %s runs its unfused step on CPU parameters, which slows down on pruned "
                    "weights (torch.sqrt of their zero or vanishing second moments); pass fused=True "
                    "to the optimizer for a faster step",
                    type(self).__name__,
                    type(optimizer).__name__,
                )

        total_steps = self._total_steps(trainer)
        last_event = self._schedule_in_steps.last_event_step
        if total_steps is not None and last_event >= total_steps:
            warnings.warn(
                f"{type(self).__name__}: the last pruning event is at step {last_event}, but training "
                f"stops after {total_steps} optimizer steps; the remaining events are applied at the "
                "end of fit, without fine-tuning",
                UserWarning,
                stacklevel=2,
            )

    @staticmethod
    def _steps_per_epoch(trainer: L.Trainer) -> int | None:
        batches = trainer.num_training_batches
        if math.isinf(batches):
            return None
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    @staticmethod
    def _total_steps(trainer: L.Trainer) -> int | None:
        estimate = trainer.estimated_stepping_batches
        return None if math.isinf(estimate) else int(estimate)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._grads_masked.clear()
        self._follow_schedule(trainer, trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._before_gradient_masking(trainer, optimizer)
        params, masks = self._pairs_of(optimizer)
        if not params:
            return
        pairs = [(param.grad, mask) for param, mask in zip(params, masks) if param.grad is not None]
        if pairs:
            _zero_pruned([grad for grad, _ in pairs], [mask for _, mask in pairs])
        keys = _MOMENTUM_STATE.get(type(optimizer))
        if keys is not None and len(pairs) == len(params):
            if id(optimizer) not in self._clean_state:
                self._zero_pruned_state(optimizer, params, masks, keys)
                self._clean_state.add(id(optimizer))
            self._grads_masked.add(id(optimizer))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # An event at the final step has no batch left to start, so it is applied here.
        self._follow_schedule(trainer, trainer.global_step)
        self._remove_hooks()
        if trainer.is_global_zero:
            log.info(
                "%s at the end of fit (step %d):\n%s",
                type(self).__name__,
                trainer.global_step,
                self.summary(),
            )

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._params = {}
        self._device_masks = {}

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._optimizer_pairs = {}
        self._clean_state = set()
        self._grads_masked = set()

    # Mask enforcement.

    def _refresh_device_masks(self) -> None:
        """Cache each mask in the form that enforces it fastest on its parameter.

        A contiguous float32 CPU parameter keeps the bool mask, which the compiled ``zero_pruned_``
        op takes. Any other parameter gets the mask on its device and in its dtype, so that
        enforcing it is one multiply.
        """
        self._device_masks = {
            name: self._masks[name].contiguous()
            if _takes_bool_mask(param)
            else self._masks[name].to(device=param.device, dtype=param.dtype)
            for name, param in self._params.items()
        }
        self._optimizer_pairs = {}
        self._clean_state = set()
        self._any_pruned = any(not bool(mask.all()) for mask in self._masks.values())

    def _pairs_of(self, optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[Tensor]]:
        """Return the pruned parameters that ``optimizer`` updates, with their device masks."""
        if not self._any_pruned:
            return [], []
        key = id(optimizer)
        if key not in self._optimizer_pairs:
            owned = {id(param) for group in optimizer.param_groups for param in group["params"]}
            names = [name for name, param in self._params.items() if id(param) in owned]
            self._optimizer_pairs[key] = (
                [self._params[name] for name in names],
                [self._device_masks[name] for name in names],
            )
        return self._optimizer_pairs[key]

    @staticmethod
    def _zero_pruned_state(
        optimizer: torch.optim.Optimizer, params: list[Tensor], masks: list[Tensor], keys: tuple[str, ...]
    ) -> None:
        """Zero the momentum-like ``keys`` of ``optimizer``'s state at the pruned entries."""
        tensors, tensor_masks = [], []
        for param, mask in zip(params, masks):
            state = optimizer.state.get(param, {})
            for key in keys:
                value = state.get(key)
                if isinstance(value, Tensor) and value.shape == param.shape:
                    tensors.append(value)
                    tensor_masks.append(mask)
        if tensors:
            _zero_pruned(tensors, tensor_masks)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params, masks = self._pairs_of(optimizer)
        if not params:
            return
        # After a step of a listed optimizer with masked gradients and zeroed state, every pruned
        # weight is still exactly zero, so the pass over the weights is skipped.
        if id(optimizer) in self._grads_masked and id(optimizer) in self._clean_state:
            self._grads_masked.discard(id(optimizer))
            return
        _zero_pruned(params, masks)

    def _set_masks(self, trainer: L.Trainer, masks: dict[str, Tensor]) -> None:
        """Adopt new masks, identical on every rank, and zero the pruned weights."""
        self._masks = self._broadcast_masks(trainer, masks)
        self._refresh_device_masks()
        apply_masks(self._params, self._device_masks)

    def _broadcast_masks(self, trainer: L.Trainer, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Send rank zero's masks to every rank and warn on a rank whose own masks differed."""
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return masks
        device = trainer.strategy.root_device
        received = {}
        differing = []
        for name, mask in masks.items():
            buffer = mask.to(device=device, dtype=torch.uint8)
            dist.broadcast(buffer, src=0)
            received[name] = buffer.cpu().bool()
            if not torch.equal(received[name], mask):
                differing.append(name)
        if differing:
            warnings.warn(
                f"{type(self).__name__}: on rank {trainer.global_rank} the masks of {differing} differed "
                "from rank 0's, so the weights or scores differ between ranks; rank 0's masks are used",
                UserWarning,
                stacklevel=2,
            )
        return received

    # Schedule.

    def _follow_schedule(self, trainer: L.Trainer, step: int) -> None:
        target = self._schedule_in_steps.sparsity(step)
        if target != self._sparsity:
            self._prune_to(trainer, target, step)

    def _scores(self) -> dict[str, Tensor]:
        return {name: magnitude_scores(param) for name, param in self._params.items()}

    def _scope(self) -> str:
        return "layer"

    def _prune_to(self, trainer: L.Trainer, target: float, step: int) -> None:
        masks = compute_masks(self._scores(), target, self.pattern, scope=self._scope(), previous=self._masks)
        self._set_masks(trainer, masks)
        self._sparsity = target
        self._event_step = step
        self._log_sparsity(trainer, step, {"target_sparsity": target})

    def _before_gradient_masking(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Run before the gradients are masked, while they are still dense (a hook for subclasses)."""

    # Reporting.

    def layer_sparsity(self) -> dict[str, float]:
        """Return the share of pruned entries of every pruned tensor, by parameter name."""
        return {name: float((~mask).sum()) / mask.numel() for name, mask in self._masks.items()}

    def global_sparsity(self) -> float:
        """Return pruned entries over all entries of the pruned tensors, each tensor counted once."""
        return mask_sparsity(self._masks)

    def _log_sparsity(self, trainer: L.Trainer, step: int, extra: dict[str, float]) -> None:
        metrics = {f"{self._log_prefix}/{name}": value for name, value in self.layer_sparsity().items()}
        metrics[f"{self._log_prefix}/global_sparsity"] = self.global_sparsity()
        metrics.update({f"{self._log_prefix}/{key}": value for key, value in extra.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            log.info(
                "%s: step %d, global sparsity %.4f (%s)",
                type(self).__name__,
                step,
                metrics[f"{self._log_prefix}/global_sparsity"],
                ", ".join(f"{key} {value:.4f}" for key, value in extra.items()),
            )

    def summary(self) -> str:
        """Return a table of zeros per pruned tensor and in total."""
        rows = []
        for name, mask in self._masks.items():
            zeros = int((~mask).sum())
            rows.append(
                [name, "x".join(map(str, mask.shape)), zeros, mask.numel(), f"{zeros / mask.numel():.4f}"]
            )
        zeros = sum(row[2] for row in rows)
        total = sum(row[3] for row in rows)
        rows.append(["total", "", zeros, total, f"{zeros / total:.4f}" if total else "-"])
        return tabulate(
            rows,
            headers=["parameter", "shape", "zeros", "numel", "sparsity"],
            tablefmt="github",
            disable_numparse=True,
        )
