"""Quantize the digits CNN to int8 after training (PTQ) and while training (QAT), then compress and report.

Trains a dense CNN as the baseline, quantizes a copy with static post-training quantization
calibrated on training batches, and fine-tunes another copy with :class:`QuantizationAwareTraining`
(int8 weights per channel, uint8 activations per tensor, BatchNorm folded into the convolutions).
The QAT model is compressed with the scales it learned, saved to one file, loaded back and
compared with the dense baseline.

    python examples/quantization_example.py            # about a minute on 2 cores
    python examples/quantization_example.py --quick    # a few steps, for CI

The YAML equivalent of the QAT run is ``examples/configs/quantization_example.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.export import compress, load_compressed, save_compressed
from lightning_weightlight.quantization import QuantizationAwareTraining
from lightning_weightlight.quantization.ptq import quantize_model
from lightning_weightlight.report import CompressionReport


def make_trainer(args: argparse.Namespace, epochs: int, callbacks: list) -> L.Trainer:
    limits = {"limit_train_batches": 4, "limit_val_batches": 1} if args.quick else {}
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.output_dir,
        **limits,
    )


def accuracy(model: torch.nn.Module, data: DigitsDataModule) -> float:
    correct = total = 0
    with torch.inference_mode():
        for images, labels in data.test_dataloader():
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += labels.numel()
    return correct / total


def run(argv: list[str] | None = None) -> CompressionReport:
    """Train, quantize, compress and report; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="train 1 epoch of 4 batches per stage, for CI")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the dense baseline")
    parser.add_argument("--qat-epochs", type=int, default=5, help="QAT fine-tuning epochs")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("artifacts/quantization_example"), help="output folder"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = args.qat_epochs = 1

    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    dense = DigitsCNN()
    make_trainer(args, args.epochs, []).fit(dense, datamodule=data)
    dense.eval()

    data.setup("fit")
    ptq = quantize_model(
        dense, "static", data.train_dataloader(), num_batches=4 if args.quick else 16, progress=False
    )

    qat_model = copy.deepcopy(dense).train()  # Lightning 2.6 keeps the mode a module is in
    qat_model.lr = dense.lr / 10  # fine-tune gently from the trained weights
    qat = QuantizationAwareTraining(freeze_observer_step=None if args.quick else 40)
    make_trainer(args, args.qat_epochs, [qat]).fit(qat_model, datamodule=data)

    compressed = compress(qat_model)
    path = save_compressed(compressed, args.output_dir / "qat_cnn.safetensors")
    loaded = load_compressed(path)
    images = next(iter(data.test_dataloader()))[0]
    with torch.inference_mode():
        if not torch.equal(loaded(images), compressed(images)):
            raise RuntimeError("the reloaded model does not give the outputs of the saved one")

    print(
        f"test accuracy: dense {accuracy(dense, data):.2%}, static PTQ {accuracy(ptq.model, data):.2%}, "
        f"QAT {accuracy(loaded, data):.2%}"
    )
    report = CompressionReport(
        dense, loaded, data.test_dataloader(), batch_sizes=[1, 64], repeats=5 if args.quick else 50
    )
    report.save(args.output_dir / "report")
    print(report.to_table())
    print(f"\nSaved {path} and the report in {args.output_dir / 'report'}")
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
