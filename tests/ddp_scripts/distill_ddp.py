"""Distill a digits CNN under DDP with 2 CPU processes and save what each rank ends with.

Usage: python tests/ddp_scripts/distill_ddp.py OUTPUT_DIR

Each rank writes ``rank{N}.pt`` with the student's and the projections' state dicts, the
teacher's state dict before and after fit, the parameter count of the DDP wrapper and the logged
metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.distillation import DistillationModule, FeaturePair


class RecordDDP(L.Callback):
    """Record which parameters the DDP wrapper synchronises, once training has started."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrapper = trainer.strategy.model
        self.ddp_type = type(wrapper).__name__
        self.ddp_parameter_count = sum(parameter.numel() for parameter in wrapper.parameters())


def main(output_dir: Path) -> None:
    L.seed_everything(0)
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    teacher_before = {key: value.clone() for key, value in teacher.state_dict().items()}
    module = DistillationModule(
        DigitsCNN(channels=[4, 8, 8], hidden=16),
        teacher,
        features=[FeaturePair(student="features.1", teacher="features.1")],
    )
    record = RecordDDP()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        default_root_dir=output_dir,
    )
    trainer.fit(module, DigitsDataModule(batch_size=32))

    result = {
        "student": {key: value.cpu() for key, value in module.student.state_dict().items()},
        "projections": {key: value.cpu() for key, value in module.projections.state_dict().items()},
        "teacher_before": teacher_before,
        "teacher_after": {key: value.cpu() for key, value in teacher.state_dict().items()},
        "teacher_training": teacher.training,
        "ddp_type": record.ddp_type,
        "ddp_parameter_count": record.ddp_parameter_count,
        "module_parameter_count": sum(parameter.numel() for parameter in module.parameters()),
        "teacher_parameter_count": sum(parameter.numel() for parameter in teacher.parameters()),
        "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
    }
    torch.save(result, output_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
