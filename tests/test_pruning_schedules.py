"""Sparsity schedules: values by optimizer step, epoch conversion and argument checks."""

from __future__ import annotations

import pytest

from lightning_weightlight.pruning import Iterative, OneShot, PolynomialDecay
from lightning_weightlight.pruning.schedules import cosine_decay


def test_one_shot_steps_and_epochs():
    schedule = OneShot(0.7, step=5)
    assert [schedule.sparsity(step) for step in (0, 4, 5, 100)] == [0.0, 0.0, 0.7, 0.7]
    by_epoch = OneShot(0.7, epoch=2).in_steps(steps_per_epoch=10)
    assert by_epoch.step == 20
    assert by_epoch.last_event_step == 20


def test_iterative_equal_increments():
    schedule = Iterative(0.8, num_events=4, every_n_steps=10, begin_step=5)
    assert schedule.event_steps() == [5, 15, 25, 35]
    expected = [0.0, 0.2, 0.2, 0.4, 0.6, 0.8, 0.8]
    actual = [schedule.sparsity(step) for step in (4, 5, 14, 15, 25, 35, 1000)]
    assert actual == pytest.approx(expected)


def test_iterative_in_epochs():
    schedule = Iterative(0.5, num_events=2, every_n_epochs=1, begin_epoch=1).in_steps(steps_per_epoch=7)
    assert schedule.event_steps() == [7, 14]


def test_polynomial_decay_matches_formula():
    schedule = PolynomialDecay(0.8, initial_sparsity=0.5, begin_step=100, end_step=400, every_n_steps=100)
    assert schedule.event_steps() == [100, 200, 300, 400]
    for step in (100, 200, 300, 400):
        progress = (step - 100) / 300
        assert schedule.sparsity(step) == pytest.approx(0.8 + (0.5 - 0.8) * (1 - progress) ** 3)
    assert schedule.sparsity(99) == 0.0
    assert schedule.sparsity(250) == schedule.sparsity(200)
    assert schedule.sparsity(10_000) == pytest.approx(0.8)


def test_polynomial_decay_end_off_grid_is_an_event():
    schedule = PolynomialDecay(0.9, begin_step=0, end_step=250, every_n_steps=100)
    assert schedule.event_steps() == [0, 100, 200, 250]
    assert schedule.last_event_step == 250
    assert schedule.sparsity(249) < 0.9
    assert schedule.sparsity(250) == pytest.approx(0.9)


def test_polynomial_decay_in_epochs():
    schedule = PolynomialDecay(0.9, begin_epoch=1, end_epoch=3, every_n_steps=4).in_steps(steps_per_epoch=10)
    assert (schedule.begin_step, schedule.end_step) == (10, 30)
    assert schedule.uses_epochs()


def test_in_steps_leaves_original_unchanged():
    schedule = PolynomialDecay(0.9, begin_epoch=1, end_epoch=3)
    schedule.in_steps(steps_per_epoch=10)
    assert schedule.end_step is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: OneShot(1.0), r"sparsity: expected a sparsity in \[0, 1\), but got 1.0"),
        (lambda: OneShot(-0.1), r"sparsity: expected a sparsity in \[0, 1\), but got -0.1"),
        (lambda: OneShot(0.5, step=-1), r"step: expected an integer >= 0, but got -1"),
        (
            lambda: Iterative(0.5, num_events=0, every_n_steps=1),
            r"num_events: expected an integer >= 1, but got 0",
        ),
        (lambda: Iterative(0.5, num_events=2), r"every_n_steps: expected a positive integer"),
        (
            lambda: PolynomialDecay(0.9, begin_step=100, end_step=50),
            r"end_step: expected a step after begin_step=100, but got 50",
        ),
        (lambda: PolynomialDecay(0.9, begin_step=10, end_step=10), r"end_step: .* but got 10"),
        (lambda: PolynomialDecay(0.9), r"end_step: expected an integer \(or end_epoch\), but got None"),
        (
            lambda: PolynomialDecay(0.5, initial_sparsity=0.6, end_step=10),
            r"initial_sparsity: .* but got 0.6",
        ),
        (lambda: PolynomialDecay(0.5, end_step=10, power=0), r"power: expected a positive number, but got 0"),
        (lambda: PolynomialDecay(1.5, end_step=10), r"final_sparsity: .* but got 1.5"),
        (
            lambda: PolynomialDecay(0.9, begin_epoch=3, end_epoch=2),
            r"end_epoch: expected an epoch after begin_epoch=3, but got 2",
        ),
    ],
)
def test_bad_schedule_arguments_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_end_step_before_begin_after_epoch_conversion_raises():
    schedule = PolynomialDecay(0.9, begin_epoch=2, end_step=5)
    with pytest.raises(ValueError, match=r"end_step: expected a step after begin_step=20, but got 5"):
        schedule.in_steps(steps_per_epoch=10)


def test_cosine_decay_ends_at_zero():
    assert cosine_decay(0.3, 0, 100) == pytest.approx(0.3)
    assert cosine_decay(0.3, 50, 100) == pytest.approx(0.15)
    assert cosine_decay(0.3, 100, 100) == 0.0
