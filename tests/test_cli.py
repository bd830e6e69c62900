"""The `weightlight` command, run as a user runs it: a subprocess with YAML files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import CONFIGS

QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]


def run_cli(python_executable: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [python_executable, "-m", "lightning_weightlight.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fit_baseline_config(python_executable, tmp_path):
    result = run_cli(
        python_executable,
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_baseline.yaml"),
            *QUICK,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 1

    tested = run_cli(
        python_executable,
        [
            "test",
            "--config",
            str(CONFIGS / "digits_baseline.yaml"),
            *QUICK,
            f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={checkpoints[0]}",
        ],
        cwd=tmp_path,
    )
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "test_acc" in tested.stdout


def test_print_config_round_trip(python_executable, tmp_path):
    printed = run_cli(python_executable, ["fit", "--print_config"], cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-3000:]
    config = yaml.safe_load(printed.stdout)
    assert config["model"]["class_path"] == "lightning_weightlight.demo.DigitsCNN"
    assert config["data"]["class_path"] == "lightning_weightlight.demo.DigitsDataModule"

    path = tmp_path / "printed.yaml"
    path.write_text(printed.stdout)
    result = run_cli(
        python_executable,
        ["fit", "--config", str(path), *QUICK, f"--trainer.default_root_dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_mlp_chosen_by_class_path(python_executable, tmp_path):
    result = run_cli(
        python_executable,
        [
            "fit",
            "--model=lightning_weightlight.demo.DigitsMLP",
            "--model.hidden=[32]",
            "--data.flatten=true",
            *QUICK,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_bad_model_argument_names_it(python_executable, tmp_path):
    result = run_cli(python_executable, ["fit", "--model.init_args.lr=-1", *QUICK], cwd=tmp_path)
    assert result.returncode == 2
    assert "error: lr: expected a positive learning rate, but got -1.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_yaml_value_one_line_error(python_executable, tmp_path):
    # jsonargparse wraps the callback's ValueError in a page of union-type messages. The command
    # prints the callback's own message as a usage error instead.
    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_weightlight.pruning.WeightPruning\n"
        "      init_args:\n"
        "        sparsity: 1.5\n"
    )
    result = run_cli(python_executable, ["fit", f"--config={config}", *QUICK], cwd=tmp_path)
    assert result.returncode == 2
    assert "error: sparsity: expected a sparsity in [0, 1), but got 1.5" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Union subtypes" not in result.stderr


def test_console_script_exits_zero(tmp_path):
    # The installed `weightlight` script passes main's return value to sys.exit.
    script = Path(sys.executable).parent / "weightlight"
    assert script.is_file(), f"the console script is not installed beside {sys.executable}"
    result = subprocess.run(
        [
            str(script),
            "fit",
            "--config",
            str(CONFIGS / "digits_baseline.yaml"),
            *QUICK,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
