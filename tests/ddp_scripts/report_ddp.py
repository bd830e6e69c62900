"""Fit with CompressionReportCallback under DDP (2 CPU processes) and record what each rank did.

Usage: python report_ddp.py OUTPUT_DIR. Each rank writes ``rank<N>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L

from lightning_weightlight.demo import DigitsDataModule, DigitsMLP
from lightning_weightlight.report import CompressionReportCallback


def main(output: Path) -> None:
    L.seed_everything(0, verbose=False)
    callback = CompressionReportCallback(
        batch_sizes=[1],
        output_dir=str(output / "report"),
        save_path=str(output / "model.safetensors"),
        repeats=2,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        limit_val_batches=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=output,
    )
    trainer.fit(DigitsMLP(hidden=(32,)), datamodule=DigitsDataModule(flatten=True))
    record = {"rank": trainer.global_rank, "reported": callback.report is not None}
    (output / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
