"""Logit and feature distillation losses as plain functions over tensors.

Every loss returns a scalar averaged over the batch (and over positions for sequence or spatial
outputs), so that the same ``alpha`` and feature weights mean the same thing at any batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_LOSSES = ("kl", "mse")
"""Names accepted by :func:`logit_distillation_loss` and ``DistillationModule(logit_loss=...)``."""

FEATURE_LOSSES = ("mse", "cosine")
"""Names accepted by :func:`feature_distillation_loss` and ``FeaturePair(loss=...)``."""


def feature_channel_dim(ndim: int) -> int:
    """Return the channel dimension of a feature tensor with ``ndim`` dimensions.

    4-D maps ``(N, C, H, W)`` keep channels in dimension 1; 2-D ``(N, C)`` and 3-D ``(N, L, C)``
    features keep them last, as Linear and attention layers produce them.
    """
    if ndim == 4:
        return 1
    if ndim in (2, 3):
        return -1
    raise ValueError(f"features: expected 2-D, 3-D or 4-D tensors, but got a {ndim}-D tensor")


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, function: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{function}: expected student and teacher tensors of the same shape, but got "
            f"{tuple(student.shape)} for the student and {tuple(teacher.shape)} for the teacher"
        )


def kl_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    class_dim: int = -1,
) -> torch.Tensor:
    """Compute ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al., 2015).

    The KL divergence is summed over ``class_dim`` and averaged over every other position: the
    batch for 2-D logits ``(N, C)``, batch and sequence for 3-D logits ``(N, L, C)``. The factor
    ``T^2`` keeps the gradient scale independent of the temperature.

    Args:
        student_logits: Raw student scores; gradients flow through them.
        teacher_logits: Raw teacher scores of the same shape; treated as constants.
        temperature: Softening temperature ``T``, greater than 0.
        class_dim: Dimension that indexes the classes.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(kl_distillation_loss(logits, logits, temperature=3.0))
        0.0
    """
    _check_same_shape(student_logits, teacher_logits, "kl_distillation_loss")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a value greater than 0, but got {temperature}")
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=class_dim)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=class_dim)
    pointwise = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)
    per_position = pointwise.sum(dim=class_dim)
    return per_position.mean() * temperature**2


def mse_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Compute the mean squared error between student and teacher logits, averaged over every element.

    Example:
        >>> float(mse_logit_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])))
        2.5
    """
    _check_same_shape(student_logits, teacher_logits, "mse_logit_loss")
    return F.mse_loss(student_logits.float(), teacher_logits.detach().float())


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "kl",
    temperature: float = 1.0,
    class_dim: int = -1,
) -> torch.Tensor:
    """Compute the logit distillation loss named by ``loss``: ``"kl"`` or ``"mse"``.

    ``temperature`` and ``class_dim`` apply to ``"kl"`` only; ``"mse"`` compares the raw logits.
    """
    if loss == "kl":
        return kl_distillation_loss(student_logits, teacher_logits, temperature, class_dim)
    if loss == "mse":
        return mse_logit_loss(student_logits, teacher_logits)
    raise ValueError(f"loss: expected one of {LOGIT_LOSSES}, but got {loss!r}")


def feature_distillation_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, loss: str = "mse"
) -> torch.Tensor:
    """Compare intermediate features of the same shape with ``"mse"`` or ``"cosine"``.

    ``"mse"`` averages the squared error over every element. ``"cosine"`` is ``1 - cosine
    similarity`` along the channel dimension (see :func:`feature_channel_dim`), averaged over the
    batch and the remaining positions.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> float(feature_distillation_loss(x, 3 * x, loss="cosine"))
        0.0
    """
    _check_same_shape(student_features, teacher_features, "feature_distillation_loss")
    student = student_features.float()
    teacher = teacher_features.detach().float()
    if loss == "mse":
        return F.mse_loss(student, teacher)
    if loss == "cosine":
        dim = feature_channel_dim(student.dim())
        return (1.0 - F.cosine_similarity(student, teacher, dim=dim)).mean()
    raise ValueError(f"loss: expected one of {FEATURE_LOSSES}, but got {loss!r}")


def agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, class_dim: int = -1
) -> torch.Tensor:
    """Return the share of positions where the student's and the teacher's top class agree.

    Example:
        >>> float(agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0], [3.0, 1.0]])))
        0.5
    """
    _check_same_shape(student_logits, teacher_logits, "agreement")
    same = student_logits.argmax(dim=class_dim) == teacher_logits.argmax(dim=class_dim)
    return same.float().mean()
