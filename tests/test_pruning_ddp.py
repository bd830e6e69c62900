"""Pruning under DDP: two CPU processes must hold identical masks after every step."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "ddp_scripts" / "pruning_ddp.py"


@pytest.mark.ddp
def test_ranks_hold_identical_masks(python_executable, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [python_executable, str(SCRIPT), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # The callbacks warn when a rank's own masks differ from rank 0's before the broadcast.
    assert "differed from rank 0" not in result.stderr

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert sorted(rank0["history"]) == list(range(1, 11))
    assert rank0["history"].keys() == rank1["history"].keys()
    for step, callbacks in rank0["history"].items():
        for key, masks in callbacks.items():
            for name, mask in masks.items():
                assert torch.equal(rank1["history"][step][key][name], mask), (step, key, name)
    for name, tensor in rank0["state_dict"].items():
        assert torch.equal(rank1["state_dict"][name], tensor), name

    final = rank0["history"][10]
    pruned = sum(int((~mask).sum()) for mask in final["weight"].values())
    total = sum(mask.numel() for mask in final["weight"].values())
    assert pruned == round(0.8 * total)
    assert int((~final["dynamic"]["encoder.2.weight"]).sum()) == round(0.6 * 32 * 32)
    # The dynamic mask moved between its first update (step 2) and its last (step 8).
    assert not torch.equal(
        rank0["history"][2]["dynamic"]["encoder.2.weight"], final["dynamic"]["encoder.2.weight"]
    )
