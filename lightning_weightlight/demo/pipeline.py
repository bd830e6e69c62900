"""The full compression job on the digits data, which ``make demo`` runs.

1. Train the dense digits CNN (the teacher) and test its best checkpoint.
2. Distill it into a smaller student CNN while ``WeightPruning`` prunes the student gradually to
   90% sparsity in 1x4 blocks and ``QuantizationAwareTraining`` fine-tunes it for int8.
3. ``compress`` the student onto the sparse int8 kernels, save it, load it back and check that
   the loaded model gives the same outputs.
4. Print the ``CompressionReport``: the dense teacher against the compressed student.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_weightlight.demo.data import DigitsDataModule
from lightning_weightlight.demo.models import DigitsCNN
from lightning_weightlight.distillation import DistillationModule
from lightning_weightlight.export import compress, load_compressed, save_compressed
from lightning_weightlight.pruning import PolynomialDecay, WeightPruning
from lightning_weightlight.quantization import QuantizationAwareTraining
from lightning_weightlight.report import CompressionReport

log = logging.getLogger(__name__)


@dataclass
class PipelineSettings:
    """Budgets and sizes of the demo job. ``quick()`` shrinks them for tests."""

    teacher_epochs: int = 15
    student_epochs: int = 30
    student_channels: tuple[int, ...] = (16, 32, 32)
    student_hidden: int = 64
    sparsity: float = 0.9
    pattern: str = "1x4"
    prune_begin_epoch: int = 1
    prune_end_epoch: int = 16
    qat_start_epoch: int = 20
    alpha: float = 0.5
    temperature: float = 1.0
    limit_batches: int | None = None
    seed: int = 0
    output_dir: Path = Path("artifacts/demo")

    @classmethod
    def quick(cls, output_dir: Path) -> PipelineSettings:
        return cls(
            teacher_epochs=1,
            student_epochs=4,
            prune_begin_epoch=0,
            prune_end_epoch=2,
            qat_start_epoch=3,
            limit_batches=4,
            output_dir=output_dir,
        )


def _trainer(settings: PipelineSettings, epochs: int, callbacks: list, name: str) -> L.Trainer:
    limits = {}
    if settings.limit_batches is not None:
        limits = {
            "limit_train_batches": settings.limit_batches,
            "limit_val_batches": 1,
            "limit_test_batches": settings.limit_batches,
        }
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(settings.output_dir, name=name),
        default_root_dir=settings.output_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        **limits,
    )


def train_teacher(settings: PipelineSettings, data: DigitsDataModule) -> tuple[DigitsCNN, float]:
    """Train the dense CNN and return it, loaded from its best checkpoint, with its test accuracy."""
    teacher = DigitsCNN()
    # Beside the CSV logs in teacher/version_N, not above them, because ModelCheckpoint warns when its
    # folder is not empty at the start of fit.
    checkpoint = ModelCheckpoint(
        monitor="val_acc", mode="max", dirpath=settings.output_dir / "teacher" / "checkpoints"
    )
    trainer = _trainer(settings, settings.teacher_epochs, [checkpoint], "teacher")
    trainer.fit(teacher, datamodule=data)
    accuracy = trainer.test(teacher, datamodule=data, ckpt_path="best", verbose=False)[0]["test_acc"]
    return teacher, float(accuracy)


def train_student(
    settings: PipelineSettings, data: DigitsDataModule, teacher: DigitsCNN
) -> tuple[DistillationModule, float]:
    """Distill, prune and quantization-aware train the student; return it with its float test accuracy."""
    student = DigitsCNN(channels=settings.student_channels, hidden=settings.student_hidden)
    module = DistillationModule(student, teacher, alpha=settings.alpha, temperature=settings.temperature)
    pruning = WeightPruning(
        schedule=PolynomialDecay(
            final_sparsity=settings.sparsity,
            begin_epoch=settings.prune_begin_epoch,
            end_epoch=settings.prune_end_epoch,
            every_n_steps=5,
            power=3,
        ),
        pattern=settings.pattern,
        # The first convolution has 9 inputs per channel, which 1x4 blocks do not divide.
        exclude=["features.0.conv"],
        exclude_head=True,
    )
    qat = QuantizationAwareTraining(
        exclude=["features.0.conv"],
        start_epoch=settings.qat_start_epoch,
        freeze_bn_step=None,
        freeze_observer_step=None,
    )
    trainer = _trainer(settings, settings.student_epochs, [pruning, qat], "student")
    trainer.fit(module, datamodule=data)
    accuracy = trainer.test(module, datamodule=data, verbose=False)[0]["test_acc"]
    return module, float(accuracy)


def run(settings: PipelineSettings) -> CompressionReport:
    """Run the whole job and return the report of the dense teacher against the compressed student."""
    started = time.perf_counter()
    L.seed_everything(settings.seed, verbose=False)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    data = DigitsDataModule(batch_size=64, seed=settings.seed)

    print(">>> 1/4 training the dense teacher CNN", flush=True)
    teacher, teacher_accuracy = train_teacher(settings, data)
    print(f"    teacher test accuracy: {teacher_accuracy:.2%}", flush=True)

    print(
        f">>> 2/4 distilling into a student CNN {list(settings.student_channels)}, pruning it to "
        f"{settings.sparsity:.0%} in {settings.pattern} blocks and training it for int8",
        flush=True,
    )
    module, student_accuracy = train_student(settings, data, teacher)
    print(f"    student test accuracy (fake-quantized): {student_accuracy:.2%}", flush=True)

    print(">>> 3/4 compressing the student, saving it and loading it back", flush=True)
    compressed = compress(module)
    path = save_compressed(compressed, settings.output_dir / "student.safetensors")
    loaded = load_compressed(path)
    images = next(iter(data.test_dataloader()))[0]
    with torch.inference_mode():
        if not torch.equal(loaded(images), compressed(images)):
            raise RuntimeError(f"the model loaded from {path} does not give the outputs of the saved one")
    print(f"    saved {path} ({path.stat().st_size:,} bytes); the reloaded model gives identical outputs")

    print(">>> 4/4 comparing the dense teacher with the compressed student", flush=True)
    teacher.eval()
    report = CompressionReport(
        teacher,
        loaded,
        data.test_dataloader(),
        batch_sizes=[1, 64],
        repeats=5 if settings.limit_batches else 50,
    )
    files = report.save(settings.output_dir / "report")
    print(report.to_table())
    ratios = report.ratios()
    print(
        f"\nTeacher {report.dense.metric:.2%} -> compressed student {report.compressed.metric:.2%} "
        f"({ratios['metric_change'] * 100:+.2f} points), {ratios['size']:.1f}x smaller on disk "
        f"({ratios['zipped_size']:.1f}x zipped), {ratios['speedup_batch_1']:.2f}x the speed at batch 1."
    )
    print(f"Report files: {', '.join(str(p) for p in files.values())}")
    print(f"Finished in {time.perf_counter() - started:.0f} s.")
    return report


def train_config(config: Path) -> float:
    """Train a ``weightlight fit`` YAML file, test its best checkpoint and return the test accuracy."""
    from lightning_weightlight.cli import main as cli_main

    cli = cli_main(["fit", "--config", str(config)])
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    accuracy = float(results[0]["test_acc"])
    print(f"\nTest accuracy of the best checkpoint: {accuracy:.2%} ({config})")
    return accuracy


def main(argv: list[str] | None = None) -> CompressionReport | float:
    """Parse the command line of ``python -m lightning_weightlight.demo`` and run the job."""
    parser = argparse.ArgumentParser(prog="python -m lightning_weightlight.demo", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few batches per stage, for tests")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("artifacts/demo"),
        help="folder for checkpoints, logs and report",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the training")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="instead of the full job, train this `weightlight fit` YAML file and test its best checkpoint",
    )
    args = parser.parse_args(argv)
    if args.config is not None:
        if not args.config.is_file():
            parser.error(f"--config: file not found: {args.config}")
        return train_config(args.config)
    settings = (
        PipelineSettings.quick(args.output_dir)
        if args.quick
        else PipelineSettings(output_dir=args.output_dir)
    )
    settings.seed = args.seed
    return run(settings)
