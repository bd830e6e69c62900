"""``WeightPruning``: magnitude or random pruning to a scheduled total sparsity, with clean checkpoints."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_weightlight.pruning._callback_base import _check_choice, _check_int, _PruningCallback
from lightning_weightlight.pruning.masks import SCOPES, magnitude_scores, random_scores
from lightning_weightlight.pruning.schedules import SparsitySchedule

CRITERIA = ("magnitude", "random")
"""Scores :class:`WeightPruning` ranks entries by: ``|w|`` (L1 magnitude), or uniform random as a baseline."""


class WeightPruning(_PruningCallback):
    """Prune weights to a scheduled total sparsity and keep them pruned through training.

    At each event of ``schedule`` the lowest-scoring units of the selected weights are pruned until the
    target total sparsity is reached. Units pruned at earlier events stay pruned. Pruned weights are zeroed in
    place, their gradients are zeroed before every optimizer step, and they are zeroed again after
    every step, so momentum and Adam cannot regrow them. The masks live in this callback's state (in
    the checkpoint under :attr:`state_key`); the model keeps its parameter names and has no hooks, so
    a checkpoint loads strictly into a fresh instance of the model class.

    After fit each pruned tensor of ``U`` pruning units has ``round(target * U)`` pruned units with the
    layer scope, and all of them together have ``round(target * total_units)`` with the global scope
    (Python's ``round``; a unit is an entry, or a block for block patterns). The logged global sparsity
    is pruned entries over all entries of the pruned tensors.

    Args:
        sparsity: One-shot target at step 0; a shortcut for ``schedule=OneShot(sparsity)``.
        schedule: Target sparsity by optimizer step (:class:`OneShot`, :class:`Iterative`,
            :class:`PolynomialDecay`). Give exactly one of ``sparsity`` and ``schedule``.
        criterion: ``"magnitude"`` (prune the smallest ``|w|``) or ``"random"``.
        scope: ``"layer"`` (every tensor reaches the target) or ``"global"`` (one ranking across
            the selected tensors, so layers end with different sparsities).
        pattern: ``"unstructured"``, ``"N:M"`` along the input dimension (such as ``"2:4"``) or
            blocks ``"RxC"`` of R output rows by C consecutive inputs (such as ``"1x4"``).
        include: Name patterns of the layers to prune (globs, or regular expressions after ``re:``);
            ``None`` prunes every layer of ``types``.
        exclude: Name patterns of layers to leave dense.
        types: Module types to prune: ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``,
            ``"Embedding"``.
        exclude_head: Leave the last Linear layer (the usual classifier head) dense.
        prune_bias: Prune biases too, with the same criterion (unstructured pattern only).
        rewind_step: Lottery-ticket rewinding: record the pruned tensors at this optimizer step and,
            at the schedule's last event, reset the surviving weights to the recorded values. Other
            parameters keep their trained values. ``None`` turns rewinding off.
        strict: Raise when a pattern matches no layer or a layer cannot take ``pattern``; with
            ``False`` such layers are skipped with a warning that names them.
        seed: Seed of the random criterion's generator; its state is saved in the checkpoint.

    Raises:
        ValueError: An argument is out of range, here or against the model in ``setup``.

    Example:
        >>> import lightning as L
        >>> from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
        >>> from lightning_weightlight.pruning import PolynomialDecay, WeightPruning
        >>> schedule = PolynomialDecay(0.5, end_step=4, every_n_steps=2)
        >>> pruning = WeightPruning(schedule=schedule, exclude_head=True)
        >>> trainer = L.Trainer(max_steps=6, callbacks=[pruning], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(DigitsCNN(), DigitsDataModule())
        >>> round(pruning.global_sparsity(), 3)
        0.5
    """

    _log_prefix = "weight_pruning"

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: SparsitySchedule | None = None,
        criterion: str = "magnitude",
        scope: str = "layer",
        pattern: str = "unstructured",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: str | Sequence[str] = ("Linear", "Conv2d"),
        exclude_head: bool = False,
        prune_bias: bool = False,
        rewind_step: int | None = None,
        strict: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            sparsity=sparsity,
            schedule=schedule,
            include=include,
            exclude=exclude,
            types=types,
            exclude_head=exclude_head,
            pattern=pattern,
            prune_bias=prune_bias,
            strict=strict,
            seed=seed,
        )
        self.criterion = _check_choice("criterion", criterion, CRITERIA)
        self.scope = _check_choice("scope", scope, SCOPES)
        self.rewind_step = None if rewind_step is None else _check_int("rewind_step", rewind_step, minimum=0)
        self._rewind_weights: dict[str, Tensor] | None = None
        self._rewound = False

    @override
    def _reset_state(self) -> None:
        super()._reset_state()
        self._rewind_weights = None
        self._rewound = False

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rewind_weights"] = None if self._rewind_weights is None else dict(self._rewind_weights)
        state["rewound"] = self._rewound
        return state

    @override
    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        self._rewind_weights = state.get("rewind_weights")
        self._rewound = bool(state.get("rewound", False))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.rewind_step is None:
            return
        last_event = self._schedule_in_steps.last_event_step
        if self.rewind_step >= last_event:
            raise ValueError(
                f"rewind_step: expected a step before the last pruning event at step {last_event}, "
                f"but got {self.rewind_step}"
            )
        if self._rewind_weights is None and trainer.global_step > self.rewind_step and not self._rewound:
            warnings.warn(
                f"WeightPruning: training starts at step {trainer.global_step}, after rewind_step="
                f"{self.rewind_step}, and no recorded weights were restored; rewinding is skipped",
                UserWarning,
                stacklevel=2,
            )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.rewind_step is not None
            and trainer.global_step == self.rewind_step
            and self._rewind_weights is None
        ):
            self._rewind_weights = {
                name: param.detach().cpu().clone() for name, param in self._params.items()
            }
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def _scores(self) -> dict[str, Tensor]:
        if self.criterion == "random":
            return {name: random_scores(param, self._generator) for name, param in self._params.items()}
        return {name: magnitude_scores(param) for name, param in self._params.items()}

    @override
    def _scope(self) -> str:
        return self.scope

    @override
    def _prune_to(self, trainer: L.Trainer, target: float, step: int) -> None:
        super()._prune_to(trainer, target, step)
        finished = step >= self._schedule_in_steps.last_event_step
        if finished and self._rewind_weights is not None and not self._rewound:
            with torch.no_grad():
                for name, param in self._params.items():
                    param.copy_(self._rewind_weights[name].to(param.device) * self._device_masks[name])
            self._rewound = True
            self._rewind_weights = None
