"""Prune the digits CNN to 90% sparsity while it trains, then compress, save, reload and report.

Trains a dense CNN as the baseline, then the same CNN with :class:`WeightPruning`. Over the
first two thirds of training it raises the sparsity of every layer but the first convolution and
the output head from 0 to 90%, in 1x4 blocks because the sparse kernels run those fastest.
The pruned model is compressed to sparse deploy modules, saved to one file, loaded back and
compared with the dense baseline.

    python examples/pruning_example.py            # 15 epochs each, about a minute on 2 cores
    python examples/pruning_example.py --quick    # a few steps, for CI

The YAML equivalent of the pruning run is ``examples/configs/pruning_example.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.export import compress, load_compressed, save_compressed
from lightning_weightlight.pruning import PolynomialDecay, WeightPruning
from lightning_weightlight.report import CompressionReport


def train(
    model: L.LightningModule, data: DigitsDataModule, args: argparse.Namespace, callbacks: list
) -> float:
    """Fit ``model`` and return its test accuracy."""
    limits = {"limit_train_batches": 4, "limit_val_batches": 1} if args.quick else {}
    trainer = L.Trainer(
        max_epochs=args.epochs,
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
    trainer.fit(model, datamodule=data)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"])


def run(argv: list[str] | None = None) -> CompressionReport:
    """Train, prune, compress and report; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="train 1 epoch of 4 batches per model, for CI")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each model")
    parser.add_argument("--sparsity", type=float, default=0.9, help="final sparsity of the pruned layers")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("artifacts/pruning_example"), help="output folder"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1

    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    steps_per_epoch = 4 if args.quick else len(data.train_dataloader())
    end_step = max(1, 2 * args.epochs * steps_per_epoch // 3)
    dense = DigitsCNN()
    dense_accuracy = train(dense, data, args, callbacks=[])

    L.seed_everything(0, verbose=False)
    pruned = DigitsCNN()
    pruning = WeightPruning(
        schedule=PolynomialDecay(args.sparsity, end_step=end_step, every_n_steps=max(1, end_step // 10)),
        pattern="1x4",
        exclude="features.0.conv",  # 9 inputs per output channel: no whole blocks of 4
        exclude_head=True,
    )
    pruned_accuracy = train(pruned, data, args, callbacks=[pruning])
    sparsity = pruning.global_sparsity()
    print(f"test accuracy: dense {dense_accuracy:.2%}, pruned to {sparsity:.0%} {pruned_accuracy:.2%}")

    compressed = compress(pruned, quantize=False)
    path = save_compressed(compressed, args.output_dir / "pruned_cnn.safetensors")
    loaded = load_compressed(path)
    images = next(iter(data.test_dataloader()))[0]
    with torch.inference_mode():
        if not torch.equal(loaded(images), compressed(images)):
            raise RuntimeError("the reloaded model does not give the outputs of the saved one")

    report = CompressionReport(
        dense, loaded, data.test_dataloader(), batch_sizes=[1, 64], repeats=5 if args.quick else 50
    )
    report.save(args.output_dir / "report")
    print(report.to_table())
    print(f"\nSaved {path} and the report in {args.output_dir / 'report'}")
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
