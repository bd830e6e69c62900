"""The quantization YAML configs through the real ``weightlight`` LightningCLI, on a small budget."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import CONFIGS, REPO_ROOT

QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "digits_qat.yaml",
            r"fake quantized from step 190.*QuantizationAwareTraining summary.*classifier\.3\s+QATLinear\s+8",
        ),
        ("digits_ptq.yaml", r"PostTrainingQuantization \(static\) summary.*features\.0\.conv\s+\d+\.\d"),
    ],
)
def test_config_fits_from_yaml(python_executable, tmp_path, config, expected):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    command = [
        python_executable,
        "-m",
        "lightning_weightlight.cli",
        "fit",
        "--config",
        str(CONFIGS / config),
        *QUICK,
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(expected, result.stdout + result.stderr, re.DOTALL), (result.stdout + result.stderr)[
        -3000:
    ]
