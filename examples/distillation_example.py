"""Distill the digits CNN into a student with a quarter of its channels, then compress and report.

Trains the dense CNN as the teacher, then a small CNN (channels 8, 16, 16 and a hidden layer of
32) wrapped in :class:`DistillationModule`, which adds the KL divergence to the teacher's softened
logits to the student's own cross-entropy. The trained student is compressed to int8 deploy
modules, saved to one file, loaded back and compared with the teacher.

    python examples/distillation_example.py            # about a minute on 2 cores
    python examples/distillation_example.py --quick    # a few steps, for CI

The YAML equivalent of the distillation run is ``examples/configs/digits_distill.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.distillation.module import DistillationModule
from lightning_weightlight.export import compress, load_compressed, save_compressed
from lightning_weightlight.report import CompressionReport


def make_trainer(args: argparse.Namespace) -> L.Trainer:
    limits = {"limit_train_batches": 4, "limit_val_batches": 1, "limit_test_batches": 2} if args.quick else {}
    return L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.output_dir,
        **limits,
    )


def run(argv: list[str] | None = None) -> CompressionReport:
    """Train the teacher, distill the student, compress and report; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="train 1 epoch of 4 batches per model, for CI")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of teacher and student")
    parser.add_argument("--temperature", type=float, default=3.0, help="softening temperature of the KL loss")
    parser.add_argument("--alpha", type=float, default=0.1, help="weight of the student's own loss")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("artifacts/distillation_example"), help="output folder"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1

    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    teacher = DigitsCNN()
    trainer = make_trainer(args)
    trainer.fit(teacher, datamodule=data)
    teacher_accuracy = trainer.test(teacher, datamodule=data, verbose=False)[0]["test_acc"]

    student = DigitsCNN(channels=(8, 16, 16), hidden=32)
    module = DistillationModule(student, teacher, alpha=args.alpha, temperature=args.temperature)
    trainer = make_trainer(args)
    trainer.fit(module, datamodule=data)
    student_accuracy = trainer.test(module, datamodule=data, verbose=False)[0]["test_acc"]
    # With --quick, the Trainer tests on 2 batches only; the report below uses the whole test split.
    scope = " (first 2 test batches)" if args.quick else ""
    print(f"test accuracy{scope}: teacher {teacher_accuracy:.2%}, distilled student {student_accuracy:.2%}")

    compressed = compress(module)  # compresses the student
    path = save_compressed(compressed, args.output_dir / "student_cnn.safetensors")
    loaded = load_compressed(path)
    images = next(iter(data.test_dataloader()))[0]
    with torch.inference_mode():
        if not torch.equal(loaded(images), compressed(images)):
            raise RuntimeError("the reloaded model does not give the outputs of the saved one")

    report = CompressionReport(
        teacher, loaded, data.test_dataloader(), batch_sizes=[1, 64], repeats=5 if args.quick else 50
    )
    report.save(args.output_dir / "report")
    print(report.to_table())
    print(
        f"\nSaved {path} and the report (teacher against compressed student) in {args.output_dir / 'report'}"
    )
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
