"""``DynamicPruning``: sparse training that moves the mask (RigL with gradients, SET at random)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_weightlight.pruning._callback_base import _check_choice, _check_int, _PruningCallback
from lightning_weightlight.pruning.masks import drop_and_grow, magnitude_scores, random_scores
from lightning_weightlight.pruning.schedules import SparsitySchedule, cosine_decay

REGROWTH = ("gradient", "random")
"""Ways :class:`DynamicPruning` picks units to regrow: largest gradient magnitude (RigL) or random (SET)."""


class DynamicPruning(_PruningCallback):
    """Keep a scheduled sparsity while moving the mask during training.

    The sparsity follows ``schedule`` exactly as in :class:`WeightPruning` (layer-wise magnitude
    pruning at its events). In addition, every ``update_every_n_steps`` optimizer steps before
    ``stop_step``, each pruned tensor drops the ``round(f * kept_units)`` kept units of smallest
    magnitude and regrows as many pruned units, so its sparsity does not change. The drop fraction
    ``f`` decays from ``drop_fraction`` at step 0 to 0 at ``stop_step`` along a cosine. Regrowth picks
    the largest gradient magnitudes (RigL, Evci et al. 2020) or random units (SET, Mocanu et al. 2018).
    Regrown weights start at zero. The update reads the gradients in ``on_before_optimizer_step``,
    after gradient accumulation and after DDP has averaged them across ranks.

    Masks, the schedule position and the random generator are this callback's state, saved in the
    checkpoint, so a resumed run continues exactly.

    Args:
        sparsity: Constant target from step 0; a shortcut for ``schedule=OneShot(sparsity)``.
        schedule: Target sparsity by optimizer step. Give exactly one of ``sparsity`` and ``schedule``.
        update_every_n_steps: Optimizer steps between mask updates.
        drop_fraction: Share of the kept units moved at step 0, in (0, 1].
        stop_step: Optimizer step after which the mask stays fixed; ``None`` takes 75% of the
            steps the Trainer estimates for the fit.
        regrowth: ``"gradient"`` (RigL) or ``"random"`` (SET).
        pattern: ``"unstructured"`` or blocks ``"RxC"`` (N:M is not supported here).
        include: Name patterns of the layers to prune; ``None`` prunes every layer of ``types``.
        exclude: Name patterns of layers to leave dense.
        types: Module types to prune.
        exclude_head: Leave the last Linear layer dense.
        prune_bias: Prune biases too (unstructured pattern only).
        strict: Raise when a pattern matches no layer or a layer cannot take ``pattern``.
        seed: Seed of the generator for random regrowth, identical on every rank.

    Example:
        >>> import lightning as L
        >>> from lightning_weightlight.demo import DigitsMLP, DigitsDataModule
        >>> from lightning_weightlight.pruning import DynamicPruning
        >>> pruning = DynamicPruning(sparsity=0.8, update_every_n_steps=2, stop_step=6, exclude_head=True)
        >>> trainer = L.Trainer(max_steps=8, callbacks=[pruning], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(DigitsMLP(), DigitsDataModule(flatten=True))
        >>> round(pruning.global_sparsity(), 3)
        0.8
    """

    _log_prefix = "dynamic_pruning"

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: SparsitySchedule | None = None,
        update_every_n_steps: int = 100,
        drop_fraction: float = 0.3,
        stop_step: int | None = None,
        regrowth: str = "gradient",
        pattern: str = "unstructured",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: str | Sequence[str] = ("Linear", "Conv2d"),
        exclude_head: bool = False,
        prune_bias: bool = False,
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
        if self.pattern.kind == "n:m":
            raise ValueError(
                f"pattern: expected 'unstructured' or a block such as '1x4', but got {pattern!r}"
            )
        self.update_every_n_steps = _check_int("update_every_n_steps", update_every_n_steps, minimum=1)
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, int | float):
            raise TypeError(f"drop_fraction: expected a number in (0, 1], but got {drop_fraction!r}")
        if not 0.0 < drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction: expected a value in (0, 1], but got {drop_fraction}")
        self.drop_fraction = float(drop_fraction)
        self.stop_step = None if stop_step is None else _check_int("stop_step", stop_step, minimum=1)
        self.regrowth = _check_choice("regrowth", regrowth, REGROWTH)
        self._stop_step: int | None = None
        self._update_step = -1

    @override
    def _reset_state(self) -> None:
        super()._reset_state()
        self._stop_step = None
        self._update_step = -1

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["stop_step"] = self._stop_step
        state["update_step"] = self._update_step
        return state

    @override
    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        self._stop_step = state["stop_step"]
        self._update_step = int(state["update_step"])

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._stop_step is not None:
            return
        if self.stop_step is not None:
            self._stop_step = self.stop_step
            return
        total_steps = self._total_steps(trainer)
        if total_steps is None:
            raise ValueError(
                "stop_step: expected an integer because the Trainer cannot estimate the number of steps, "
                "but got None"
            )
        self._stop_step = max(1, math.floor(0.75 * total_steps))

    @override
    def _before_gradient_masking(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        due = step > 0 and step % self.update_every_n_steps == 0 and step < self._stop_step
        if not due or step == self._update_step or not self._any_pruned:
            return
        self._update_step = step
        fraction = cosine_decay(self.drop_fraction, step, self._stop_step)

        masks = {}
        for name, param in self._params.items():
            if param.grad is None and self.regrowth == "gradient":
                warnings.warn(
                    f"DynamicPruning: {name} has no gradient at step {step}; its mask is not updated",
                    UserWarning,
                    stacklevel=2,
                )
                masks[name] = self._masks[name]
                continue
            if self.regrowth == "gradient":
                grow_scores = magnitude_scores(param.grad)
            else:
                grow_scores = random_scores(param, self._generator)
            masks[name] = drop_and_grow(
                self._masks[name], magnitude_scores(param), grow_scores, fraction, self.pattern
            )

        moved = sum(int((masks[name] & ~self._masks[name]).sum()) for name in masks)
        self._set_masks(trainer, masks)
        self._log_sparsity(trainer, step, {"drop_fraction": fraction, "regrown": float(moved)})
