"""Measure distillation on the digits data: teacher, student alone and distilled students, over seeds.

For each seed the script trains the teacher (``DigitsCNN()``, the baseline of
``examples/configs/digits_baseline.yaml``), the student (``DigitsCNN(channels=[8, 16, 16],
hidden=32)``) alone, and the same student distilled from that teacher with each (alpha, T)
setting, all for the same number of epochs. It reports the test accuracy of the weights after the
last epoch and each student's agreement with the teacher on the test set (share of test digits
whose predicted class is the teacher's).

    python benchmarks/distillation_digits.py                      # 3 seeds, 15 epochs
    python benchmarks/distillation_digits.py --seeds 0 --epochs 3 --settings 0.1:3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.distillation import DistillationModule

STUDENT = {"channels": [8, 16, 16], "hidden": 32}


def parse_setting(text: str) -> tuple[float, float]:
    alpha, temperature = text.split(":")
    return float(alpha), float(temperature)


def fit(module: L.LightningModule, datamodule: DigitsDataModule, epochs: int, root: Path) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule)


@torch.no_grad()
def predict(model: torch.nn.Module, datamodule: DigitsDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    predictions, labels = [], []
    for images, targets in datamodule.test_dataloader():
        predictions.append(model(images).argmax(dim=1))
        labels.append(targets)
    return torch.cat(predictions), torch.cat(labels)


def run(seeds: list[int], epochs: int, settings: list[tuple[float, float]], root: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        datamodule = DigitsDataModule(batch_size=64, seed=0)
        datamodule.setup("fit")

        L.seed_everything(seed, verbose=False)
        teacher = DigitsCNN()
        fit(teacher, datamodule, epochs, root)
        teacher_predictions, labels = predict(teacher, datamodule)
        rows.append(
            {
                "seed": seed,
                "model": "teacher",
                "accuracy": (teacher_predictions == labels).float().mean().item(),
            }
        )

        runs = [("student alone", None)] + [(f"distilled alpha={a} T={t}", (a, t)) for a, t in settings]
        for name, setting in runs:
            L.seed_everything(seed, verbose=False)
            student = DigitsCNN(**STUDENT)
            if setting is None:
                fit(student, datamodule, epochs, root)
            else:
                alpha, temperature = setting
                fit(
                    DistillationModule(student, teacher, alpha=alpha, temperature=temperature),
                    datamodule,
                    epochs,
                    root,
                )
            predictions, _ = predict(student, datamodule)
            rows.append(
                {
                    "seed": seed,
                    "model": name,
                    "accuracy": (predictions == labels).float().mean().item(),
                    "agreement": (predictions == teacher_predictions).float().mean().item(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    lines = [
        "| model | test accuracy (mean ± std) | agreement with teacher | per seed |",
        "|---|---|---|---|",
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        selected = [row for row in rows if row["model"] == model]
        accuracies = [row["accuracy"] for row in selected]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        agreement = (
            f"{statistics.mean(row['agreement'] for row in selected):.2%}"
            if "agreement" in selected[0]
            else "—"
        )
        per_seed = ", ".join(f"{value:.2%}" for value in accuracies)
        lines.append(
            f"| {model} | {statistics.mean(accuracies):.2%} ± {spread:.2%} | {agreement} | {per_seed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of every run")
    parser.add_argument(
        "--settings",
        type=parse_setting,
        nargs="+",
        default=[(0.1, 3.0), (0.5, 3.0), (0.5, 1.0)],
        help="distillation settings as alpha:temperature",
    )
    parser.add_argument("--output", type=Path, default=Path("artifacts/distillation_digits.json"))
    args = parser.parse_args()

    start = time.perf_counter()
    rows = run(args.seeds, args.epochs, args.settings, args.output.parent)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2))
    print(summarise(rows))
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f} s; results in {args.output}")


if __name__ == "__main__":
    main()
