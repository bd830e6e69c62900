"""Distillation losses against values computed by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_weightlight.distillation import (
    agreement,
    feature_distillation_loss,
    kl_distillation_loss,
    logit_distillation_loss,
    mse_logit_loss,
)


def softmax_row(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(value / temperature) for value in row]
    total = sum(exps)
    return [value / total for value in exps]


def kl_by_hand(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """T^2 * mean over rows of sum_c p_t * (log p_t - log p_s), in Python floats."""
    total = 0.0
    for student_row, teacher_row in zip(student, teacher):
        p_student = softmax_row(student_row, temperature)
        p_teacher = softmax_row(teacher_row, temperature)
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_student, p_teacher))
    return temperature**2 * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
def test_kl_2d_matches_hand_value(temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=generator)
    teacher = torch.randn(5, 4, generator=generator)
    expected = kl_by_hand(student.tolist(), teacher.tolist(), temperature)
    result = kl_distillation_loss(student, teacher, temperature)
    assert result.dtype == torch.float32
    assert abs(result.item() - expected) < 1e-6


def test_kl_3d_averages_over_positions():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 6, generator=generator)
    teacher = torch.randn(2, 3, 6, generator=generator)
    expected = kl_by_hand(student.reshape(6, 6).tolist(), teacher.reshape(6, 6).tolist(), 2.0)
    assert abs(kl_distillation_loss(student, teacher, 2.0).item() - expected) < 1e-6


def test_kl_class_dim_one_for_maps():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, 3, 3, generator=generator)
    teacher = torch.randn(2, 5, 3, 3, generator=generator)
    rows_student = student.permute(0, 2, 3, 1).reshape(-1, 5).tolist()
    rows_teacher = teacher.permute(0, 2, 3, 1).reshape(-1, 5).tolist()
    expected = kl_by_hand(rows_student, rows_teacher, 1.5)
    result = kl_distillation_loss(student, teacher, 1.5, class_dim=1)
    assert abs(result.item() - expected) < 1e-6


def test_kl_zero_for_identical_logits_and_gradient_only_to_student():
    student = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    assert kl_distillation_loss(student.detach(), student.detach(), 3.0).item() == 0.0
    kl_distillation_loss(student, teacher, 3.0).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_mse_logits_matches_hand_value():
    student = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # squared errors 1, 4, 1, 4 -> mean 2.5
    assert mse_logit_loss(student, teacher).item() == 2.5
    assert logit_distillation_loss(student, teacher, "mse", temperature=9.0).item() == 2.5


def test_feature_losses_match_hand_values():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # mse: (1 + 1 + 1 + 4) / 4
    assert feature_distillation_loss(student, teacher, "mse").item() == 1.75
    # cosine: row 0 = 24 / 25, row 1 = 0; loss = mean(1 - cos) = (0.04 + 1) / 2
    assert abs(feature_distillation_loss(student, teacher, "cosine").item() - 0.52) < 1e-6


def test_cosine_uses_channels_of_4d_maps():
    student = torch.zeros(1, 2, 1, 2)
    student[0, 0, 0, 0] = 1.0  # position 0 points along channel 0
    student[0, 1, 0, 1] = 1.0  # position 1 points along channel 1
    teacher = torch.zeros(1, 2, 1, 2)
    teacher[0, 0, 0, :] = 1.0  # both positions along channel 0
    # cosines 1 and 0 -> mean(1 - cos) = 0.5
    assert abs(feature_distillation_loss(student, teacher, "cosine").item() - 0.5) < 1e-6


def test_agreement_counts_matching_top_classes():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    assert agreement(student, teacher).item() == 0.75


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kl_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4)), r"\(2, 3\).*\(2, 4\)"),
        (lambda: kl_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature.*0.0"),
        (lambda: logit_distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), "l1"), "'l1'"),
        (lambda: feature_distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), "l2"), "'l2'"),
    ],
)
def test_losses_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
