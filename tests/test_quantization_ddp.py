"""QuantizationAwareTraining under DDP: two CPU processes (gloo) in a subprocess, compared rank by rank."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.mark.ddp
def test_ddp_ranks_hold_identical_scales(python_executable, tmp_path):
    script = REPO_ROOT / "tests" / "ddp_scripts" / "quantization_ddp.py"
    result = subprocess.run(
        [python_executable, str(script), str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert list(ranks[0]) == list(ranks[1])
    assert len([key for key in ranks[0] if key.endswith(".min_val")]) == 4
    for key, value in ranks[0].items():
        if key == "global_step":
            continue
        assert torch.equal(ranks[1][key], value), key
    # The ranks saw different batches, so equal ranges come from the all-reduce, not from equal data.
    assert bool(ranks[0]["features.0.conv.min_val"] < 0)
