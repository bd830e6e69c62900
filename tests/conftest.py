"""Shared fixtures: quiet, deterministic Trainers on tiny budgets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "examples" / "configs"

# Keep the two cores of the test machine for the Trainer and the kernels' own threads.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def make_trainer(tmp_path: Path):
    """Build a CPU Trainer that logs to ``tmp_path`` and prints nothing but errors."""

    def build(**overrides) -> L.Trainer:
        options = dict(
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
            deterministic=True,
        )
        options.update(overrides)
        return L.Trainer(**options)

    return build


@pytest.fixture
def python_executable() -> str:
    """The interpreter running the tests, for subprocesses that must see the same packages."""
    return sys.executable


# The DDP scripts run as their own processes; doctest collection must not import them.
collect_ignore_glob = ["ddp_scripts/*"]
