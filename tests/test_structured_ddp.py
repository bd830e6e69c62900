"""StructuredPruning under DDP: two CPU processes (gloo) in a subprocess, compared rank by rank."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.mark.ddp
def test_ddp_ranks_prune_same_channels(python_executable, tmp_path):
    script = REPO_ROOT / "tests" / "ddp_scripts" / "structured_ddp.py"
    result = subprocess.run(
        [python_executable, str(script), str(tmp_path)],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    assert len(ranks[0]["plans"]) == 2
    assert ranks[0]["plans"] == ranks[1]["plans"]
    for rank in ranks:
        # Training went on after both pruning steps, through a wrapper built around the pruned model.
        assert rank["global_step"] == 6
        assert rank["wrapper_type"] == "DistributedDataParallel"
        assert rank["wrapper_parameter_count"] == rank["module_parameter_count"]
        assert rank["optimizer_parameter_count"] == rank["module_parameter_count"]
        assert rank["state_dict"]["stem.weight"].shape == (8, 1, 3, 3)
        assert rank["state_dict"]["head.weight"].shape == (10, 16)

    assert list(ranks[0]["state_dict"]) == list(ranks[1]["state_dict"])
    for key, value in ranks[0]["state_dict"].items():
        assert ranks[1]["state_dict"][key].shape == value.shape, key
        # BatchNorm statistics differ by the last batch of each rank: DDP broadcasts rank 0's
        # buffers at the start of every forward pass, not after it.
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(ranks[1]["state_dict"][key], value), key
