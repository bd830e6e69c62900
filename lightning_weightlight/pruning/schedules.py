"""Target sparsity as a function of the optimizer step.

Schedules count optimizer steps (``trainer.global_step``), so gradient accumulation does not stretch
them. Arguments in epochs are a convenience: the callback converts them with
:meth:`SparsitySchedule.in_steps` once the number of optimizer steps per epoch is known. Each
schedule is a plain class, so LightningCLI builds it from ``class_path`` and ``init_args``:

.. code-block:: yaml

    schedule:
      class_path: lightning_weightlight.pruning.PolynomialDecay
      init_args: {final_sparsity: 0.9, begin_step: 100, end_step: 1000}

A schedule changes the target only at its pruning events; :meth:`SparsitySchedule.sparsity` returns
the target of the latest event at or before a step, and 0 before the first event.
"""

from __future__ import annotations

import copy
import math
import sys
from abc import ABC, abstractmethod

from lightning_weightlight.pruning.masks import validate_sparsity


def _check_step(argument: str, value: int | None, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument}: expected an integer, but got {value!r}")
    if value < minimum:
        raise ValueError(f"{argument}: expected an integer >= {minimum}, but got {value}")
    return value


class SparsitySchedule(ABC):
    """Base class of the schedules: events in optimizer steps, each with a target total sparsity."""

    @property
    @abstractmethod
    def final_sparsity(self) -> float:
        """Target sparsity after the last event."""

    @abstractmethod
    def event_steps(self) -> list[int]:
        """Optimizer steps at which the target changes, in increasing order."""

    @abstractmethod
    def sparsity_at_event(self, step: int) -> float:
        """Target sparsity set by the event at ``step``, one of :meth:`event_steps`."""

    def _convert_epochs(self, steps_per_epoch: int) -> None:  # noqa: B027 (optional for subclasses)
        """Set the step arguments from the epoch arguments; schedules without epoch arguments keep theirs."""

    def in_steps(self, steps_per_epoch: int) -> SparsitySchedule:
        """Return a copy whose epoch arguments are converted to optimizer steps.

        Epoch ``e`` starts at step ``e * steps_per_epoch``. The schedule itself is left unchanged, so the
        same object can serve several fits.
        """
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: expected a positive integer, but got {steps_per_epoch}")
        converted = copy.copy(self)
        converted._convert_epochs(steps_per_epoch)
        converted._validate_steps()
        return converted

    def _validate_steps(self) -> None:  # noqa: B027 (optional for subclasses)
        """Check the step arguments against each other once epochs are converted."""

    @property
    def last_event_step(self) -> int:
        """Step of the last event, after which the target stays at :attr:`final_sparsity`."""
        return self.latest_event_step(sys.maxsize)

    def uses_epochs(self) -> bool:
        """Return whether an epoch argument is set, so that :meth:`in_steps` needs the epoch length."""
        return any(value is not None for key, value in vars(self).items() if "epoch" in key)

    @abstractmethod
    def latest_event_step(self, step: int) -> int | None:
        """Return the step of the latest event at or before ``step``, or ``None`` before the first event."""

    def sparsity(self, step: int) -> float:
        """Return the target of the latest event at or before ``step`` (0 before the first event)."""
        event = self.latest_event_step(step)
        return 0.0 if event is None else self.sparsity_at_event(event)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({arguments})"


class OneShot(SparsitySchedule):
    """Prune to ``sparsity`` in one event at ``step`` (or at the start of ``epoch``) and keep it there.

    With ``step=0`` this is a constant sparsity from the first optimizer step on.

    Args:
        sparsity: Target total sparsity in [0, 1).
        step: Optimizer step of the event.
        epoch: Epoch at whose start the event happens; replaces ``step`` when given.

    Example:
        >>> schedule = OneShot(0.8, step=10)
        >>> schedule.sparsity(9), schedule.sparsity(10)
        (0.0, 0.8)
    """

    def __init__(self, sparsity: float, step: int = 0, epoch: int | None = None) -> None:
        self.sparsity_value = validate_sparsity("sparsity", sparsity)
        self.step = _check_step("step", step)
        self.epoch = _check_step("epoch", epoch)

    @property
    def final_sparsity(self) -> float:
        return self.sparsity_value

    def event_steps(self) -> list[int]:
        return [self.step]

    def sparsity_at_event(self, step: int) -> float:
        return self.sparsity_value

    def latest_event_step(self, step: int) -> int | None:
        return self.step if step >= self.step else None

    def _convert_epochs(self, steps_per_epoch: int) -> None:
        if self.epoch is not None:
            self.step = self.epoch * steps_per_epoch


class Iterative(SparsitySchedule):
    """Prune every ``every_n_steps`` steps, in ``num_events`` equal increments of total sparsity.

    Event ``j`` (counting from 1) happens at step ``begin_step + (j - 1) * every_n_steps`` and sets the
    target to ``final_sparsity * j / num_events``.

    Args:
        final_sparsity: Target total sparsity after the last event, in [0, 1).
        num_events: Number of pruning events.
        every_n_steps: Optimizer steps between events.
        begin_step: Optimizer step of the first event.
        every_n_epochs: Epochs between events; replaces ``every_n_steps`` when given.
        begin_epoch: Epoch at whose start the first event happens; replaces ``begin_step`` when given.

    Example:
        >>> schedule = Iterative(0.9, num_events=3, every_n_steps=100)
        >>> [round(schedule.sparsity(step), 2) for step in (0, 99, 100, 200, 1000)]
        [0.3, 0.3, 0.6, 0.9, 0.9]
    """

    def __init__(
        self,
        final_sparsity: float,
        num_events: int,
        every_n_steps: int | None = None,
        begin_step: int = 0,
        every_n_epochs: int | None = None,
        begin_epoch: int | None = None,
    ) -> None:
        self.final_sparsity_value = validate_sparsity("final_sparsity", final_sparsity)
        self.num_events = _check_step("num_events", num_events, minimum=1)
        self.every_n_steps = _check_step("every_n_steps", every_n_steps, minimum=1)
        self.begin_step = _check_step("begin_step", begin_step)
        self.every_n_epochs = _check_step("every_n_epochs", every_n_epochs, minimum=1)
        self.begin_epoch = _check_step("begin_epoch", begin_epoch)
        if self.every_n_steps is None and self.every_n_epochs is None:
            raise ValueError("every_n_steps: expected a positive integer (or every_n_epochs), but got None")

    @property
    def final_sparsity(self) -> float:
        return self.final_sparsity_value

    def event_steps(self) -> list[int]:
        if self.every_n_steps is None:
            raise RuntimeError("Iterative: convert every_n_epochs with in_steps() before asking for steps")
        return [self.begin_step + index * self.every_n_steps for index in range(self.num_events)]

    def sparsity_at_event(self, step: int) -> float:
        index = (step - self.begin_step) // self.every_n_steps
        return self.final_sparsity_value * (index + 1) / self.num_events

    def latest_event_step(self, step: int) -> int | None:
        if step < self.begin_step:
            return None
        index = min((step - self.begin_step) // self.every_n_steps, self.num_events - 1)
        return self.begin_step + index * self.every_n_steps

    def _convert_epochs(self, steps_per_epoch: int) -> None:
        if self.every_n_epochs is not None:
            self.every_n_steps = self.every_n_epochs * steps_per_epoch
        if self.begin_epoch is not None:
            self.begin_step = self.begin_epoch * steps_per_epoch


class PolynomialDecay(SparsitySchedule):
    """Raise the sparsity from ``initial_sparsity`` to ``final_sparsity`` along a polynomial curve.

    Events happen at ``begin_step``, every ``every_n_steps`` steps after it, and at ``end_step``. The
    event at step ``t`` sets
    ``final + (initial - final) * (1 - (t - begin_step) / (end_step - begin_step)) ** power``.
    Power 3 is the gradual pruning schedule of Zhu and Gupta, "To prune, or not to prune" (2017):
    fast at first while many redundant weights remain, slow near the end.

    Args:
        final_sparsity: Target total sparsity at ``end_step``, in [0, 1).
        initial_sparsity: Target total sparsity at ``begin_step``, in [0, ``final_sparsity``].
        begin_step: Optimizer step of the first event.
        end_step: Optimizer step of the last event; must be after ``begin_step``.
        every_n_steps: Optimizer steps between events.
        power: Exponent of the curve; 1 is linear.
        begin_epoch: Epoch at whose start the first event happens; replaces ``begin_step`` when given.
        end_epoch: Epoch at whose start the last event happens; replaces ``end_step`` when given.

    Example:
        >>> schedule = PolynomialDecay(0.8, initial_sparsity=0.5, end_step=100, every_n_steps=50)
        >>> [round(schedule.sparsity(step), 4) for step in (0, 49, 50, 100)]
        [0.5, 0.5, 0.7625, 0.8]
    """

    def __init__(
        self,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        begin_step: int = 0,
        end_step: int | None = None,
        every_n_steps: int = 100,
        power: float = 3.0,
        begin_epoch: int | None = None,
        end_epoch: int | None = None,
    ) -> None:
        self.final_sparsity_value = validate_sparsity("final_sparsity", final_sparsity)
        self.initial_sparsity = validate_sparsity("initial_sparsity", initial_sparsity)
        if self.initial_sparsity > self.final_sparsity_value:
            raise ValueError(
                f"initial_sparsity: expected at most final_sparsity={self.final_sparsity_value}, "
                f"but got {initial_sparsity}"
            )
        self.begin_step = _check_step("begin_step", begin_step)
        self.end_step = _check_step("end_step", end_step)
        self.every_n_steps = _check_step("every_n_steps", every_n_steps, minimum=1)
        if isinstance(power, bool) or not isinstance(power, int | float) or power <= 0:
            raise ValueError(f"power: expected a positive number, but got {power!r}")
        self.power = float(power)
        self.begin_epoch = _check_step("begin_epoch", begin_epoch)
        self.end_epoch = _check_step("end_epoch", end_epoch)
        if self.end_step is None and self.end_epoch is None:
            raise ValueError("end_step: expected an integer (or end_epoch), but got None")
        if self.begin_epoch is None and self.end_epoch is None:
            self._validate_steps()
        elif (
            self.begin_epoch is not None and self.end_epoch is not None and self.end_epoch <= self.begin_epoch
        ):
            raise ValueError(
                f"end_epoch: expected an epoch after begin_epoch={begin_epoch}, but got {end_epoch}"
            )

    def _validate_steps(self) -> None:
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ValueError(
                f"end_step: expected a step after begin_step={self.begin_step}, but got {self.end_step}"
            )

    @property
    def final_sparsity(self) -> float:
        return self.final_sparsity_value

    def event_steps(self) -> list[int]:
        if self.end_step is None:
            raise RuntimeError("PolynomialDecay: convert end_epoch with in_steps() before asking for steps")
        steps = list(range(self.begin_step, self.end_step, self.every_n_steps))
        return [*steps, self.end_step]

    def sparsity_at_event(self, step: int) -> float:
        progress = min(1.0, (step - self.begin_step) / (self.end_step - self.begin_step))
        remaining = (1.0 - progress) ** self.power
        return self.final_sparsity_value + (self.initial_sparsity - self.final_sparsity_value) * remaining

    def latest_event_step(self, step: int) -> int | None:
        if step < self.begin_step:
            return None
        if step >= self.end_step:
            return self.end_step
        return self.begin_step + (step - self.begin_step) // self.every_n_steps * self.every_n_steps

    def _convert_epochs(self, steps_per_epoch: int) -> None:
        if self.begin_epoch is not None:
            self.begin_step = self.begin_epoch * steps_per_epoch
        if self.end_epoch is not None:
            self.end_step = self.end_epoch * steps_per_epoch


def cosine_decay(value: float, step: int, end_step: int) -> float:
    """Return ``value * (1 + cos(pi * step / end_step)) / 2``: ``value`` at step 0, 0 at ``end_step``."""
    if step >= end_step:
        return 0.0
    return value * (1.0 + math.cos(math.pi * step / end_step)) / 2.0
