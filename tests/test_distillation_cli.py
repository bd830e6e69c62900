"""DistillationModule from YAML through the ``weightlight`` command, in a subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lightning as L
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.distillation import student_state_dict
from tests.conftest import CONFIGS, REPO_ROOT

QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]

FEATURES_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
model:
  class_path: lightning_weightlight.distillation.DistillationModule
  init_args:
    student:
      class_path: lightning_weightlight.demo.DigitsCNN
      init_args: {channels: [4, 8, 8], hidden: 16}
    teacher:
      - class_path: lightning_weightlight.demo.DigitsCNN
        init_args: {channels: [8, 16, 16], hidden: 32}
      - class_path: lightning_weightlight.demo.DigitsCNN
        init_args: {channels: [8, 16, 32], hidden: 32}
    teacher_weights: [2.0, 1.0]
    alpha: 0.5
    temperature: 2.0
    features:
      - {student: features.1, teacher: features.1, weight: 0.5}
      - {student: features.2, teacher: features.2, loss: cosine, teacher_index: 1}
"""


def run_cli(python_executable: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python_executable, "-m", "lightning_weightlight.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_digits_distill_config_with_teacher_checkpoint(python_executable, tmp_path):
    teacher = DigitsCNN()
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(teacher, DigitsDataModule())
    teacher_path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(teacher_path)

    result = run_cli(
        python_executable,
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_distill.yaml"),
            *QUICK,
            f"--model.init_args.teacher_checkpoint={teacher_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert all(key.startswith("student.") for key in saved["state_dict"])

    student = DigitsCNN(channels=[8, 16, 16], hidden=32)
    student.load_state_dict(student_state_dict(checkpoint), strict=True)
    parameters = sum(parameter.numel() for parameter in student.parameters())
    assert sum(parameter.numel() for parameter in teacher.parameters()) >= 4 * parameters


def test_features_and_two_teachers_from_yaml(python_executable, tmp_path):
    config = tmp_path / "input.yaml"
    config.write_text(FEATURES_CONFIG)
    result = run_cli(
        python_executable,
        ["fit", "--config", str(config), *QUICK, f"--trainer.default_root_dir={tmp_path}"],
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher_index: 1" in (tmp_path / "config.yaml").read_text()
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    # features.1 has 8 channels in the student and 16 in the first teacher: a 1x1 projection.
    assert tuple(state["projections.0.weight"].shape) == (16, 8, 1, 1)
    assert tuple(state["projections.1.weight"].shape) == (32, 8, 1, 1)
