"""The filter-pruning recipe through the `weightlight` command, as a user runs it, on a reduced budget."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
import yaml

from lightning_weightlight.demo import DigitsCNN
from lightning_weightlight.pruning.structured import load_structured_checkpoint
from tests.conftest import CONFIGS, REPO_ROOT

QUICK = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
]


def run_cli(python_executable: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python_executable, "-m", "lightning_weightlight.cli", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )


def quick_config(tmp_path: Path) -> Path:
    """The recipe with pruning after the first of two short epochs instead of the fifteenth."""
    config = yaml.safe_load((CONFIGS / "digits_filter_prune.yaml").read_text())
    (pruning,) = [
        item for item in config["trainer"]["callbacks"] if item["class_path"].endswith("StructuredPruning")
    ]
    assert pruning["init_args"]["amount"] == 0.3
    assert pruning["init_args"]["importance"] == "l1"
    pruning["init_args"]["start_epoch"] = 1
    path = tmp_path / "digits_filter_prune.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_filter_prune_config_fit_and_test(python_executable, tmp_path):
    config = quick_config(tmp_path)
    fitted = run_cli(
        python_executable,
        ["fit", "--config", str(config), *QUICK, f"--trainer.default_root_dir={tmp_path}"],
        tmp_path,
    )
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    (checkpoint,) = list(tmp_path.rglob("last.ckpt"))

    model = load_structured_checkpoint(DigitsCNN, checkpoint)
    # 30% of 16, 32 and 64 filters removed; the Linear layers keep their outputs.
    assert [model.features[index].conv.out_channels for index in range(3)] == [11, 22, 45]
    assert model.classifier[0].in_features == 45 * 2 * 2
    assert model.classifier[0].out_features == 64
    assert model.classifier[3].out_features == 10
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)

    # `test` builds the dense DigitsCNN from the YAML file; the callback rebuilds the pruned one.
    tested = run_cli(
        python_executable,
        [
            "test",
            "--config",
            str(config),
            *QUICK,
            f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={checkpoint}",
        ],
        tmp_path,
    )
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "test_acc" in tested.stdout
