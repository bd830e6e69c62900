"""Run every Python and YAML example of README.md and docs/*.md, so that none of them rots.

Python blocks run as scripts in a fresh directory. YAML blocks that configure a Trainer run
through ``weightlight fit`` on a reduced budget. A block right after a line
``<!-- docs-test: skip -->`` is left out (use it only for fragments that cannot run alone).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BLOCK = re.compile(r"(<!-- docs-test: skip -->\s*)?```(python|yaml)\n(.*?)```", re.DOTALL)
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.max_steps=-1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]


def collect_blocks() -> list:
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    params = []
    for page in pages:
        text = page.read_text()
        for number, match in enumerate(BLOCK.finditer(text)):
            skip, language, code = match.groups()
            if skip:
                continue
            if language == "yaml" and "trainer:" not in code:
                continue
            name = f"{page.relative_to(REPO_ROOT)}-{language}-{number}"
            params.append(pytest.param(language, code, id=name))
    return params


@pytest.mark.parametrize(("language", "code"), collect_blocks())
def test_docs_example_runs(language, code, python_executable, tmp_path: Path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), WEIGHTLIGHT_DOCS_TEST="1")
    if language == "python":
        script = tmp_path / "example.py"
        script.write_text(code)
        command = [python_executable, str(script)]
    else:
        config = tmp_path / "config.yaml"
        config.write_text(code)
        command = [
            python_executable,
            "-m",
            "lightning_weightlight.cli",
            "fit",
            "--config",
            str(config),
            *QUICK,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
