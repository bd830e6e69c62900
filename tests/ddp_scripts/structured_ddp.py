"""Prune a user-written CNN with StructuredPruning under DDP (2 CPU processes) and save each rank's result.

Usage: python tests/ddp_scripts/structured_ddp.py OUTPUT_DIR

Each rank writes ``rank{N}.pt`` with the pruning plans it applied, its final state dict, the number
of parameters that the DDP wrapper synchronises and the optimizer step it reached.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsDataModule
from lightning_weightlight.pruning.structured import StructuredPruning
from tests.structured_models import ResidualCNN


class RecordWrapper(L.Callback):
    """Record what the DDP wrapper synchronises at the end of training, after the pruning steps."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrapper = trainer.strategy.model
        self.wrapper_type = type(wrapper).__name__
        self.wrapper_parameter_count = sum(parameter.numel() for parameter in wrapper.parameters())
        self.optimizer_parameter_count = sum(
            parameter.numel() for group in trainer.optimizers[0].param_groups for parameter in group["params"]
        )


def main(output_dir: Path) -> None:
    L.seed_everything(0)
    model = ResidualCNN(width=16)
    # Taylor scores come from each rank's gradients; the callback averages them over the ranks.
    pruning = StructuredPruning(amount=0.5, importance="taylor", num_steps=2, start_step=2, end_step=4)
    record = RecordWrapper()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, record],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    torch.save(
        {
            "plans": [entry["plan"] for entry in pruning.history],
            "state_dict": model.state_dict(),
            "global_step": trainer.global_step,
            "wrapper_type": record.wrapper_type,
            "wrapper_parameter_count": record.wrapper_parameter_count,
            "optimizer_parameter_count": record.optimizer_parameter_count,
            "module_parameter_count": sum(parameter.numel() for parameter in model.parameters()),
        },
        output_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
