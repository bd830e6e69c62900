"""Train with both pruning callbacks under DDP (2 CPU processes, gloo) and save every rank's masks.

Usage, with the repository root on ``PYTHONPATH``:
``python tests/ddp_scripts/pruning_ddp.py OUTPUT_DIR``. Each rank writes ``OUTPUT_DIR/rank{R}.pt``
with the masks of both callbacks after every optimizer step and the final weights. The ranks train
on different batches, so their local gradients differ, and only the all-reduced gradients give
identical RigL updates.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_weightlight.pruning import DynamicPruning, PolynomialDecay, WeightPruning
from tests.pruning_models import UserRegressor


class MaskRecorder(Callback):
    def __init__(self, callbacks: dict[str, Callback]) -> None:
        self.callbacks = callbacks
        self.history: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history[trainer.global_step] = {
            key: {name: mask.clone() for name, mask in callback.state_dict()["masks"].items()}
            for key, callback in self.callbacks.items()
        }


def main(output_dir: Path) -> None:
    L.seed_everything(0)
    weight = WeightPruning(
        schedule=PolynomialDecay(0.8, begin_step=1, end_step=7, every_n_steps=2),
        criterion="random",
        scope="global",
        include=["encoder.0", "head"],
        seed=7,
    )
    dynamic = DynamicPruning(sparsity=0.6, update_every_n_steps=2, stop_step=9, include="encoder.2")
    recorder = MaskRecorder({"weight": weight, "dynamic": dynamic})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[weight, dynamic, recorder],
    )
    model = UserRegressor(samples=160, batch_size=8)
    trainer.fit(model)
    torch.save(
        {"history": recorder.history, "state_dict": model.state_dict()},
        output_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
