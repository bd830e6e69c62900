"""Knowledge distillation: a frozen teacher trains a smaller student inside Lightning."""

from lightning_weightlight.distillation.losses import (
    agreement,
    feature_distillation_loss,
    kl_distillation_loss,
    logit_distillation_loss,
    mse_logit_loss,
)
from lightning_weightlight.distillation.module import DistillationModule, FeaturePair, compression_target
from lightning_weightlight.distillation.teachers import IndexedDataset, student_state_dict

__all__ = [
    "DistillationModule",
    "FeaturePair",
    "IndexedDataset",
    "agreement",
    "compression_target",
    "feature_distillation_loss",
    "kl_distillation_loss",
    "logit_distillation_loss",
    "mse_logit_loss",
    "student_state_dict",
]
