"""The pruning callbacks from YAML, through the ``weightlight`` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
import yaml

from tests.conftest import CONFIGS, REPO_ROOT

# Two batches per epoch, so the config's epochs 2 to 12 of pruning become steps 4 to 24.
QUICK = [
    "--trainer.max_epochs=13",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
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


def test_digits_prune_config_reaches_target(python_executable, tmp_path):
    result = run_cli(
        python_executable,
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_prune.yaml"),
            *QUICK,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (checkpoint,) = tmp_path.rglob("last.ckpt")
    state = torch.load(checkpoint, weights_only=False)
    pruned = [
        "features.0.conv.weight",
        "features.1.conv.weight",
        "features.2.conv.weight",
        "classifier.0.weight",
    ]
    for name in pruned:
        weight = state["state_dict"][name]
        assert int((weight == 0).sum()) == round(0.9 * weight.numel()), name
    assert int((state["state_dict"]["classifier.3.weight"] == 0).sum()) == 0
    (key,) = [key for key in state["callbacks"] if key.startswith("WeightPruning")]
    assert list(state["callbacks"][key]["masks"]) == pruned


def test_dynamic_pruning_from_yaml(python_executable, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 12,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "limit_val_batches": 1,
            "callbacks": [
                {
                    "class_path": "lightning_weightlight.pruning.DynamicPruning",
                    "init_args": {
                        "schedule": {
                            "class_path": "lightning_weightlight.pruning.Iterative",
                            "init_args": {"final_sparsity": 0.8, "num_events": 2, "every_n_steps": 3},
                        },
                        "update_every_n_steps": 4,
                        "stop_step": 10,
                        "regrowth": "random",
                        "pattern": "1x4",
                        "include": ["re:classifier\\.0", "features.2.conv"],
                    },
                }
            ],
        },
    }
    path = tmp_path / "dynamic.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli(
        python_executable,
        ["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_bad_sparsity_in_yaml_names_argument(python_executable, tmp_path):
    result = run_cli(
        python_executable,
        [
            "fit",
            "--trainer.callbacks+=lightning_weightlight.pruning.WeightPruning",
            "--trainer.callbacks.sparsity=1.5",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "sparsity: expected a sparsity in [0, 1), but got 1.5" in result.stderr
