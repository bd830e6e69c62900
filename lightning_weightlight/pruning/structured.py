"""``StructuredPruning``: remove whole channels and neurons during ``fit`` with torch-pruning.

torch-pruning's dependency graph finds the channels that must go together (residual additions,
concatenations, normalisation layers). This callback decides when to prune, rebuilds the
optimizers and LR schedulers afterwards, keeps checkpoints loadable into a fresh model and reports
what changed. The algorithm itself lives in :mod:`lightning_weightlight.pruning.structured_core`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from tabulate import tabulate
from torch import nn
from typing_extensions import override

from lightning_weightlight.distillation.module import compression_target
from lightning_weightlight.pruning import structured_core as core
from lightning_weightlight.pruning.structured_lightning import (
    STATE_FORMAT,
    applied_plans,
    average_over_ranks,
    check_gradients,
    example_from_batch,
    install_replay_hook,
    load_structured_checkpoint,
    rebuild_optimizers,
    remove_replay_hook,
    restore_structure,
    rewrap_distributed,
    snapshot_optimizers,
)
from lightning_weightlight.selection import (
    NoLayerMatchedError,
    last_layer_name,
    matches_any,
    validate_patterns,
)

__all__ = ["StructuredPruning", "load_structured_checkpoint"]

log = logging.getLogger(__name__)

TARGETS = ("channels", "params", "macs")


class StructuredPruning(Callback):
    """Remove the least important channels of a model in ``num_steps`` steps, fine-tuning in between.

    Each step traces the LightningModule's ``forward`` into a torch-pruning dependency graph, scores
    every group of coupled channels, removes the lowest-scoring ones, and rebuilds the optimizers
    and LR schedulers from ``configure_optimizers``. Optimizer state carries over, cut to the kept
    channels of pruned parameters, and the LR schedulers keep their position. Under DDP every rank applies
    rank zero's decision, taken from scores averaged over all ranks, and the model is wrapped again.

    The removed channels are the callback's state, saved in every checkpoint. In ``setup`` the
    callback replays them on a fresh model before Lightning loads the weights, so
    ``trainer.fit(ckpt_path=...)`` and ``trainer.test(ckpt_path=...)`` work with a fresh instance of
    the model class; :func:`load_structured_checkpoint` does the same without a Trainer.

    The example input for tracing is ``pl_module.example_input_array``. Without one, the callback
    takes the first row of the first training batch: of the batch itself when it is a tensor, of its
    first element when it is a tuple or list. A checkpoint stores the shapes and dtypes, so
    replaying needs no data.

    Args:
        amount: Fraction to remove by the last step, in [0, 1): of the channels of every pruned
            group (``target="channels"``), or of the model's parameters or MACs.
        target: ``"channels"``, ``"params"`` or ``"macs"``. For parameters and MACs each step
            searches the channel ratio that reaches its share of the reduction.
        importance: ``"l1"`` or ``"l2"`` (channel weight norm), ``"taylor"`` (weight times
            gradient, from the gradients of the last optimizer step), ``"bn_scale"`` (BatchNorm
            scale) or ``"lamp"``.
        group_reduction: How the scores of coupled layers combine: ``"mean"``, ``"sum"``,
            ``"max"``, ``"prod"`` or ``"first"`` (the group's root layer only: the classic filter
            pruning with ``importance="l1"``).
        global_ranking: Rank the channels of all groups together, so that layers lose different
            fractions; otherwise every group loses the same fraction.
        num_steps: Pruning steps, spread evenly from the start to the end of the schedule; step
            ``k`` reaches ``k / num_steps`` of ``amount``.
        start_step: Optimizer step of the first pruning step (default 0: before training).
        end_step: Optimizer step of the last pruning step; needed when ``num_steps > 1``.
        start_epoch: Like ``start_step``, counted in epochs (the first step of that epoch).
        end_epoch: Like ``end_step``, counted in epochs.
        round_to: Keep a multiple of this many channels in every layer.
        max_layer_ratio: No layer loses more than this fraction of its channels, in (0, 1].
        layer_types: Types of the layers whose output channels may be removed: ``"Linear"``,
            ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``.
        ignore: Name patterns (globs, or regular expressions after ``re:``) of layers whose output
            channels must stay; channels coupled to them stay too.
        ignore_head: Keep the output channels of the last Linear layer (the usual output head), or
            of the last layer of ``layer_types`` when there is no Linear layer.
        strict: Raise on an ``ignore`` pattern that matches no layer and on a layer of
            ``layer_types`` that cannot be pruned; otherwise warn and name them.
        name: Tells two instances apart in a checkpoint (part of ``state_key``).

    Example:
        >>> from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
        >>> model = DigitsCNN(channels=(8, 16, 16), hidden=16)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...     callbacks=[StructuredPruning(amount=0.5, importance="l1")])
        >>> trainer.fit(model, DigitsDataModule())
        >>> model.features[0].conv.out_channels, model.classifier[3].out_features
        (4, 10)
    """

    def __init__(
        self,
        amount: float = 0.5,
        target: str = "channels",
        importance: str = "l2",
        group_reduction: str = "mean",
        global_ranking: bool = False,
        num_steps: int = 1,
        start_step: int | None = None,
        end_step: int | None = None,
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        round_to: int | None = None,
        max_layer_ratio: float = 1.0,
        layer_types: Sequence[str] = ("Linear", "Conv1d", "Conv2d", "Conv3d"),
        ignore: str | Sequence[str] | None = None,
        ignore_head: bool = True,
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
            raise ValueError(f"amount: expected a fraction in [0, 1), but got {amount!r}")
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {list(TARGETS)}, but got {target!r}")
        core.build_importance(importance, group_reduction)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected a positive integer, but got {num_steps!r}")
        for argument, value in (
            ("start_step", start_step),
            ("end_step", end_step),
            ("start_epoch", start_epoch),
            ("end_epoch", end_epoch),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{argument}: expected an integer of 0 or more, but got {value!r}")
        if (start_step is not None or end_step is not None) and (
            start_epoch is not None or end_epoch is not None
        ):
            raise ValueError(
                "start_step/end_step and start_epoch/end_epoch: expected one of the two forms, but got "
                f"start_step={start_step}, end_step={end_step}, "
                f"start_epoch={start_epoch}, end_epoch={end_epoch}"
            )
        start = start_step if start_epoch is None else start_epoch
        end = end_step if end_epoch is None else end_epoch
        unit = "epoch" if start_epoch is not None or end_epoch is not None else "step"
        if num_steps > 1 and end is None:
            raise ValueError(f"end_{unit}: expected a value when num_steps > 1, but got None")
        if end is not None and end < (start or 0):
            raise ValueError(f"end_{unit}: expected at least start_{unit}={start or 0}, but got {end}")
        if importance == "taylor" and (start or 0) == 0:
            raise ValueError(
                f"start_{unit}: importance='taylor' needs gradients of a training step, so expected "
                f"start_{unit} >= 1, but got {start or 0}"
            )
        if round_to is not None and (
            isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
        ):
            raise ValueError(f"round_to: expected None or a positive integer, but got {round_to!r}")
        if not 0.0 < max_layer_ratio <= 1.0:
            raise ValueError(f"max_layer_ratio: expected a fraction in (0, 1], but got {max_layer_ratio!r}")
        names = [layer_types] if isinstance(layer_types, str) else list(layer_types)
        unknown = [item for item in names if item not in core.ROOT_LAYER_TYPES]
        if not names or unknown:
            raise ValueError(
                f"layer_types: expected names from {list(core.ROOT_LAYER_TYPES)}, but got {names!r}"
            )

        self.amount = float(amount)
        self.target = target
        self.importance = importance
        self.group_reduction = group_reduction
        self.global_ranking = global_ranking
        self.num_steps = num_steps
        self.schedule_unit = unit
        self.schedule_start = start or 0
        self.schedule_end = end if end is not None else self.schedule_start
        self.round_to = round_to
        self.max_layer_ratio = float(max_layer_ratio)
        self.layer_types = tuple(core.ROOT_LAYER_TYPES[item] for item in names)
        self.ignore = validate_patterns("ignore", ignore)
        self.ignore_head = ignore_head
        self.strict = strict
        self.name = name

        self.history: list[dict[str, Any]] = []
        self.example_input: Any = None
        self.initial_channels: dict[str, int] = {}
        self.initial_counts: dict[str, int] = {}
        self._step_schedule: list[int] | None = None
        self._warned_skipped = False

    @property
    @override
    def state_key(self) -> str:
        return "StructuredPruning" if self.name is None else f"StructuredPruning[{self.name}]"

    def schedule(self, steps_per_epoch: int | None = None) -> list[int]:
        """Return the optimizer steps at which the pruning steps run, in order."""
        start, end = self.schedule_start, self.schedule_end
        if self.schedule_unit == "epoch":
            if steps_per_epoch is None:
                raise ValueError("start_epoch/end_epoch: the number of optimizer steps per epoch is unknown")
            start, end = start * steps_per_epoch, end * steps_per_epoch
        if self.num_steps == 1:
            return [start]
        return [start + round((end - start) * k / (self.num_steps - 1)) for k in range(self.num_steps)]

    def ignored_layers(self, model: nn.Module, warn: bool = True) -> set[str]:
        """Return the names of the layers whose output channels stay; check ``ignore`` against ``model``.

        An ``ignore`` pattern that matches no layer raises with ``strict``, and otherwise warns
        when ``warn`` is true (on rank zero only, in the callback).
        """
        # Patterns use the student's own layer names when model is a DistillationModule; the
        # returned names are qualified in model, where the dependency graph is built.
        target = compression_target(model)
        prefix = next(name for name, module in model.named_modules() if module is target)
        names = [name for name, _ in target.named_modules() if name]
        for pattern in self.ignore:
            if not any(matches_any(name, [pattern]) for name in names):
                message = f"ignore: pattern {pattern!r} matches no layer of {type(target).__name__}"
                if self.strict:
                    raise NoLayerMatchedError(message)
                if warn:
                    warnings.warn(message, UserWarning, stacklevel=2)
        ignored = {name for name in names if matches_any(name, self.ignore)}
        if self.ignore_head:
            head = last_layer_name(target) or last_layer_name(target, self.layer_types)
            if head is not None:
                ignored.add(head)
        return {f"{prefix}.{name}" if prefix else name for name in ignored}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.ignored_layers(pl_module, warn=trainer.is_global_zero)
        if self.example_input is None and pl_module.example_input_array is not None:
            self.example_input = core.describe_example_input(pl_module.example_input_array)

        # NOTE: Lightning 2.6 reads the checkpoint file only after the callbacks' ``setup`` and gives
        # callbacks no hook before the weights load. The LightningModule's ``on_load_checkpoint`` runs
        # just before, so ``setup`` wraps that hook on this instance for one call. The wrapper
        # replays the recorded pruning steps, removes itself and calls the original hook.
        install_replay_hook(pl_module, self._replay_from_checkpoint)

    def _replay_from_checkpoint(self, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        self.load_state_dict(state)
        restored = restore_structure(pl_module, self.state_key, state)
        log.debug("%s replayed %d pruning steps before loading the weights", self.state_key, restored)

    # Lightning has restored any checkpoint before a loop starts, so the one-call wrapper can go.
    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        remove_replay_hook(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        remove_replay_hook(pl_module)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        remove_replay_hook(pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        remove_replay_hook(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        remove_replay_hook(pl_module)
        steps_per_epoch = None
        if self.schedule_unit == "epoch":
            if not math.isfinite(trainer.num_training_batches):
                raise ValueError(
                    "start_epoch/end_epoch: the training dataloader has no length, so epochs cannot be "
                    "converted to optimizer steps; use start_step/end_step"
                )
            steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        self._step_schedule = self.schedule(steps_per_epoch)
        total = trainer.estimated_stepping_batches
        pending = self._step_schedule[len(self.history) :]
        if pending and math.isfinite(total) and pending[-1] >= total and trainer.is_global_zero:
            # A warning, not an error: a run may stop early on purpose and resume from its checkpoint.
            warnings.warn(
                f"end_{self.schedule_unit}: the last pruning step runs at optimizer step {pending[-1]}, "
                f"but this fit stops after {int(total)} steps, so the steps from {pending[-1]} on run only "
                "in a resumed fit; end the schedule earlier to fine-tune after the last step",
                UserWarning,
                stacklevel=2,
            )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.example_input is None:
            self.example_input = core.describe_example_input(example_from_batch(batch))
        if batch_idx % trainer.accumulate_grad_batches != 0 or self._step_schedule is None:
            return
        while (
            len(self.history) < self.num_steps
            and trainer.global_step >= self._step_schedule[len(self.history)]
        ):
            self.prune_step(trainer, pl_module)

    def prune_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Run the next pruning step on ``pl_module`` now, rebuild the optimizers and record it."""
        step_index = len(self.history)
        device = next(pl_module.parameters()).device
        example = core.make_example_input(self.example_input, device)
        graph = core.build_dependency_graph(pl_module, example)
        groups, skipped = core.prunable_groups(
            graph, pl_module, self.ignored_layers(pl_module, warn=False), self.layer_types
        )
        breaking = core.find_breaking_groups(pl_module, example, [item.root for item in groups])
        for name, error in breaking.items():
            skipped[name] = f"removing its channels breaks the forward pass ({error})"
        groups = [item for item in groups if item.root not in breaking]
        params_before, macs_before = core.count_params_and_macs(pl_module, example)
        if not self.initial_channels:
            self.initial_channels = {item.root: item.channels for item in groups}
            self.initial_counts = {"params": params_before, "macs": macs_before}

        if self.importance == "taylor":
            check_gradients(groups)
        scores = core.score_groups(groups, core.build_importance(self.importance, self.group_reduction))
        for item in groups:
            if item.root not in scores:
                skipped[item.root] = f"importance={self.importance!r} gives its group no score"
        self._report_skipped(skipped, warn=trainer.is_global_zero)
        scores = average_over_ranks(trainer, scores)
        options = dict(
            global_ranking=self.global_ranking, max_layer_ratio=self.max_layer_ratio, round_to=self.round_to
        )
        share = self.amount * (step_index + 1) / self.num_steps
        if self.target == "channels":
            ratio = share
            plan = core.plan_removal(scores, self.initial_channels, ratio, **options)
        else:
            ratio, plan = core.ratio_for_reduction(
                pl_module, example, scores, self.initial_channels, share, self.initial_counts[self.target],
                self.target, **options,
            )  # fmt: skip
        plan = trainer.strategy.broadcast(plan, src=0)

        snapshot = snapshot_optimizers(trainer, pl_module)
        kept_entries = core.kept_positions(pl_module, plan, example) if any(snapshot.states) else {}
        core.apply_plan(graph, pl_module, plan)
        applied_plans(pl_module, self.state_key).append(plan)
        rewrap_distributed(trainer)
        rebuild_optimizers(trainer, pl_module, snapshot, kept_entries)

        params_after, macs_after = core.count_params_and_macs(pl_module, example)
        record = {
            "global_step": trainer.global_step,
            "ratio": ratio,
            "plan": plan,
            "params_before": params_before,
            "params_after": params_after,
            "macs_before": macs_before,
            "macs_after": macs_after,
            "channels": core.channels_by_layer(pl_module, list(self.initial_channels)),
        }
        self.history.append(record)
        self._log_step(trainer, record)
        return record

    def _report_skipped(self, skipped: dict[str, str], warn: bool) -> None:
        if not skipped or self._warned_skipped:
            return
        self._warned_skipped = True
        lines = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        message = (
            f"StructuredPruning cannot remove output channels of these layers and leaves them whole: {lines}"
        )
        if self.strict:
            raise ValueError(f"strict: {message}; add them to `ignore` or set strict=False")
        if warn:
            warnings.warn(message, UserWarning, stacklevel=3)

    def _log_step(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        prefix = f"{self.state_key}/"
        metrics = {
            f"{prefix}params": float(record["params_after"]),
            f"{prefix}macs": float(record["macs_after"]),
            f"{prefix}channel_ratio": float(record["ratio"]),
            **{f"{prefix}channels/{name}": float(count) for name, count in record["channels"].items()},
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info(
            "%s step %d/%d at optimizer step %d: parameters %d -> %d, MACs %d -> %d",
            self.state_key,
            len(self.history),
            self.num_steps,
            record["global_step"],
            record["params_before"],
            record["params_after"],
            record["macs_before"],
            record["macs_after"],
        )

    def summary(self) -> str:
        """Return a table of the pruning steps so far: parameters and MACs before and after each."""
        rows = [
            [
                index + 1,
                record["global_step"],
                f"{record['ratio']:.3f}",
                record["params_before"],
                record["params_after"],
                record["macs_before"],
                record["macs_after"],
            ]
            for index, record in enumerate(self.history)
        ]
        if self.history:
            first, last = self.history[0], self.history[-1]
            rows.append(
                [
                    "total",
                    "",
                    "",
                    first["params_before"],
                    last["params_after"],
                    first["macs_before"],
                    last["macs_after"],
                ]
            )
        headers = [
            "step",
            "optimizer step",
            "channel ratio",
            "params before",
            "params after",
            "MACs before",
            "MACs after",
        ]
        return tabulate(rows, headers=headers)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            log.info("%s summary:\n%s", self.state_key, self.summary())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "history": self.history,
            "example_input": self.example_input,
            "initial_channels": self.initial_channels,
            "initial_counts": self.initial_counts,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{self.state_key}: expected checkpoint state of format {STATE_FORMAT!r}, "
                f"but got {state_dict.get('format')!r}"
            )
        self.history = list(state_dict["history"])
        self.example_input = state_dict["example_input"]
        self.initial_channels = dict(state_dict["initial_channels"])
        self.initial_counts = dict(state_dict["initial_counts"])
