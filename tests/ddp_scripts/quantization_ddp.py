"""Train a digits CNN with QuantizationAwareTraining under DDP (2 CPU processes) and save each rank's scales.

Usage: python tests/ddp_scripts/quantization_ddp.py OUTPUT_DIR

Each rank writes ``rank{N}.pt`` with its observer statistics, activation scales and zero points,
the weight scales that the conversion would use, and the global step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.quantization import QuantizationAwareTraining
from lightning_weightlight.quantization.modules import qat_layers


def main(output_dir: Path) -> None:
    L.seed_everything(0)
    model = DigitsCNN(channels=[4, 8], hidden=16)
    # QAT starts at step 2 of 6, so the ranks must also agree on the delayed start and the scaled rate.
    callback = QuantizationAwareTraining(
        observer="moving_average", momentum=0.5, start_step=2, start_lr_scale=0.5, freeze_bn_step=3
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=output_dir,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))

    result = {"global_step": trainer.global_step}
    for name, module in qat_layers(model).items():
        quant = module.input_fake_quant
        result[f"{name}.min_val"] = quant.observer.min_val.clone()
        result[f"{name}.max_val"] = quant.observer.max_val.clone()
        result[f"{name}.input_scale"] = quant.scale.clone()
        result[f"{name}.input_zero_point"] = quant.zero_point.clone()
        result[f"{name}.weight_scale"] = module.deploy_weight_scale().clone()
    torch.save(result, output_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
