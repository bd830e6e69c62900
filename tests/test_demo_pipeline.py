"""`python -m lightning_weightlight.demo`, the main job of `make demo`, on a reduced budget."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import CONFIGS


def test_full_job_quick(python_executable, tmp_path):
    result = subprocess.run(
        [python_executable, "-m", "lightning_weightlight.demo", "--quick", "--output-dir", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("1/4", "2/4", "3/4", "4/4"):
        assert f">>> {stage}" in result.stdout
    assert "the reloaded model gives identical outputs" in result.stdout
    assert (tmp_path / "student.safetensors").is_file()

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["dense"]["parameters"] == 40506
    layers = {layer["name"]: layer for layer in report["layers"]}
    # The quick run reaches the final 90% sparsity on every pruned layer: round(0.9 * blocks)
    # of its 1x4 blocks are zero, four weights each.
    for name, numel in (
        ("features.1.conv", 32 * 16 * 9),
        ("features.2.conv", 32 * 32 * 9),
        ("classifier.0", 64 * 128),
    ):
        assert layers[name]["kernel"] == "sparse_int8"
        assert layers[name]["sparsity"] == round(0.9 * numel / 4) * 4 / numel
    assert (tmp_path / "report" / "report.png").stat().st_size > 0


def test_config_mode_trains_and_tests(python_executable, tmp_path):
    config = tmp_path / "quick.yaml"
    text = (CONFIGS / "digits_baseline.yaml").read_text()
    text = text.replace("max_epochs: 15", "max_epochs: 1")
    text = text.replace("default_root_dir: artifacts/digits_baseline", f"default_root_dir: {tmp_path}")
    config.write_text(text)
    result = subprocess.run(
        [python_executable, "-m", "lightning_weightlight.demo", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Test accuracy of the best checkpoint:" in result.stdout


def test_missing_config_names_it(python_executable, tmp_path):
    result = subprocess.run(
        [python_executable, "-m", "lightning_weightlight.demo", "--config", str(tmp_path / "nope.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--config: file not found" in result.stderr
