"""``weightlight compress`` and ``weightlight report`` on a checkpoint, and the report callback from YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_weightlight.export import load_compressed, read_metadata
from lightning_weightlight.kernels import layers
from tests.conftest import CONFIGS, REPO_ROOT

QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
]


def run_cli(python_executable: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [python_executable, "-m", "lightning_weightlight.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """Fit the QAT example config briefly; its report callback runs at the end of fit."""
    root = tmp_path_factory.mktemp("qat")
    config = CONFIGS / "quantization_example.yaml"
    result = run_cli(
        sys.executable,
        ["fit", "--config", str(config), *QUICK, f"--trainer.default_root_dir={root}"],
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root, config, result


def test_report_callback_from_yaml(qat_run):
    root, _, result = qat_run
    report_dir = next(root.rglob("compression_report"))

    data = json.loads((report_dir / "report.json").read_text())
    assert data["metric_name"] == "accuracy"
    assert [layer["module"] for layer in data["layers"]].count("Int8Conv2d") == 3
    assert (report_dir / "report.png").is_file()
    assert "Compression report" in result.stderr + result.stdout
    metrics = (next(root.rglob("metrics.csv"))).read_text()
    assert "compression/size_bytes_compressed" in metrics
    assert (root / "artifacts" / "quantization_example_cli" / "qat_cnn.safetensors").is_file()


def test_compress_command_restores_qat_checkpoint(qat_run, python_executable, tmp_path):
    root, config, _ = qat_run
    checkpoint = next(root.rglob("last.ckpt"))
    output = tmp_path / "cli" / "model.safetensors"

    result = run_cli(
        python_executable,
        ["compress", "--config", str(config), f"--ckpt_path={checkpoint}", f"--output={output}", *QUICK],
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert "Saved the compressed model" in result.stdout
    # No warnings about Lightning internals, and only the output file: the validation that
    # restores the checkpoint writes no logs.
    assert "args parameter is intended" not in result.stderr
    assert "dirpath has changed" not in result.stderr
    assert [path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file()] == [
        Path("cli/model.safetensors")
    ]
    assert read_metadata(output)["user"] == {"checkpoint": str(checkpoint)}
    model = load_compressed(output)
    assert type(model.classifier[0]) is layers.Int8Linear
    assert model.classifier[0].static_input  # the scales that QAT learned, not dynamic ones
    with torch.inference_mode():
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_report_command_writes_files(qat_run, python_executable):
    root, config, _ = qat_run
    checkpoint = next(root.rglob("last.ckpt"))
    output_dir = root / "cli_report"

    result = run_cli(
        python_executable,
        [
            "report",
            "--config",
            str(config),
            f"--ckpt_path={checkpoint}",
            f"--output_dir={output_dir}",
            "--batch_sizes=1,16",
            "--repeats=3",
            *QUICK,
        ],
        cwd=root,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert "latency batch 16 (ms)" in result.stdout
    assert sorted(path.name for path in output_dir.iterdir()) == ["report.json", "report.md", "report.png"]


def test_compress_command_requires_checkpoint(python_executable, tmp_path):
    result = run_cli(python_executable, ["compress", "--output=x.safetensors"], cwd=tmp_path)

    assert result.returncode == 2
    assert "--ckpt_path" in result.stderr

    arguments = ["compress", "--ckpt_path=missing.ckpt", "--output=x.safetensors"]
    result = run_cli(python_executable, arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert "error: argument --ckpt_path: no such file: 'missing.ckpt'" in result.stderr


def test_compression_commands_report_bad_values_briefly(qat_run, python_executable, tmp_path):
    root, config, _ = qat_run
    checkpoint = next(root.rglob("last.ckpt"))

    result = run_cli(python_executable, ["report", f"--ckpt_path={checkpoint}", "--repeats=0"], cwd=tmp_path)
    assert result.returncode == 2
    assert "error: argument --repeats: expected a positive integer, but got '0'" in result.stderr

    # A bad value for one of the package's classes in the YAML file: the command's short usage and
    # the package's message, no traceback.
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text(config.read_text().replace("freeze_observer_step: 200", "freeze_observer_step: -5"))
    assert bad_config.read_text() != config.read_text()
    result = run_cli(
        python_executable,
        ["compress", "--config", str(bad_config), f"--ckpt_path={checkpoint}", "--output=x.safetensors"],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "usage: weightlight compress" in result.stderr
    assert "error: freeze_observer_step: expected None or an integer >= 0, but got -5" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 6

    # A damaged --compressed file is reported before the checkpoint is loaded.
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a model")
    result = run_cli(
        python_executable, ["report", f"--ckpt_path={checkpoint}", f"--compressed={damaged}"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert f"error: --compressed: {damaged}: not a lightning-weightlight compressed file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.ddp
def test_report_callback_rank_zero_only_under_ddp(python_executable, tmp_path):
    script = REPO_ROOT / "tests" / "ddp_scripts" / "report_ddp.py"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))

    result = subprocess.run(
        [python_executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )

    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["reported"] for record in ranks] == [True, False]
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == [
        "report.json",
        "report.md",
        "report.png",
    ]
    assert type(load_compressed(tmp_path / "model.safetensors").classifier) is layers.Int8Linear
