"""DistillationModule under DDP: two CPU processes (gloo) in a subprocess, compared rank by rank."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.mark.ddp
def test_ddp_ranks_agree_and_teacher_unwrapped(python_executable, tmp_path):
    script = REPO_ROOT / "tests" / "ddp_scripts" / "distill_ddp.py"
    result = subprocess.run(
        [python_executable, str(script), str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    for rank in ranks:
        assert rank["ddp_type"] == "DistributedDataParallel"
        assert rank["global_step"] == 4
        # DDP synchronises the student and the projection only, never the teacher.
        assert rank["ddp_parameter_count"] == rank["module_parameter_count"]
        assert rank["teacher_parameter_count"] > 0
        assert not rank["teacher_training"]
        for key, value in rank["teacher_before"].items():
            assert torch.equal(rank["teacher_after"][key], value), key
        assert "distill/kl_loss" in rank["metrics"]

    for part in ("student", "projections"):
        assert list(ranks[0][part]) == list(ranks[1][part])
        for key, value in ranks[0][part].items():
            assert torch.equal(ranks[1][part][key], value), f"{part}: {key}"
