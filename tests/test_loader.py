"""The extension loader: prebuilt module, JIT build, reference fallback, and the CI guard."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

# Runs in a subprocess: make the prebuilt module unimportable, then import the package.
BLOCK_PREBUILT = textwrap.dedent(
    """
    import sys, warnings
    class BlockPrebuilt:
        def find_spec(self, name, path=None, target=None):
            if name == "lightning_weightlight._C":
                raise ImportError("prebuilt module hidden by the test")
    sys.meta_path.insert(0, BlockPrebuilt())
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import lightning_weightlight
        from lightning_weightlight.kernels import ops
        import lightning_weightlight.kernels.ops
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning) and "compiled" in str(w.message)]
    print("HAS_CPP", ops.has_cpp())
    print("WARNINGS", len(runtime))
    import torch
    from lightning_weightlight.kernels import reference
    x = torch.randn(5, 33)
    pairs = zip(ops.quantize_per_row(x), reference.quantize_per_row(x))
    print("MATCH", all(torch.equal(a, b) for a, b in pairs))
    """
)


def run_blocked(python_executable: str, env_overrides: dict[str, str], timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTLIGHT_")}
    env.update(env_overrides)
    return subprocess.run(
        [python_executable, "-c", BLOCK_PREBUILT], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_import_without_extension_warns_once(python_executable):
    result = run_blocked(python_executable, {"WEIGHTLIGHT_NO_JIT": "1"})
    assert result.returncode == 0, result.stderr
    assert "HAS_CPP False" in result.stdout
    assert "WARNINGS 1" in result.stdout
    assert "MATCH True" in result.stdout


def test_require_cpp_fails_clearly(python_executable):
    result = run_blocked(python_executable, {"WEIGHTLIGHT_NO_JIT": "1", "WEIGHTLIGHT_REQUIRE_CPP": "1"})
    assert result.returncode != 0
    assert "ExtensionNotAvailableError" in result.stderr
    assert "WEIGHTLIGHT_REQUIRE_CPP" in result.stderr


@pytest.mark.slow
def test_jit_build_concurrent_and_after_kill(python_executable, tmp_path: Path):
    env = {"WEIGHTLIGHT_CACHE_DIR": str(tmp_path / "cache"), "WEIGHTLIGHT_REQUIRE_CPP": "1"}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTLIGHT_")} | env

    # A build killed part-way leaves its lock files behind; the next build must not wait on them.
    victim = subprocess.Popen(
        [python_executable, "-c", BLOCK_PREBUILT],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "cache").glob("jit-*/build.ninja")):
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    # Two processes that start at once: one builds, the other waits for it, both load.
    procs = [
        subprocess.Popen(
            [python_executable, "-c", BLOCK_PREBUILT],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        assert "HAS_CPP True" in stdout
        assert "WARNINGS 0" in stdout
        assert "MATCH True" in stdout


@pytest.mark.parametrize("value, works", [("bogus", False), ("", True), ("avx2", True)])
def test_weightlight_isa_variable_checked_at_import(python_executable, value, works):
    script = "from lightning_weightlight.kernels import active_isa; print(active_isa())"
    env = {**os.environ, "WEIGHTLIGHT_ISA": value, "WEIGHTLIGHT_REQUIRE_CPP": "1"}
    result = subprocess.run(
        [python_executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if works:
        assert result.returncode == 0, result.stderr
        # An empty value means "auto"; "avx2" is a cap, so a CPU without AVX2 runs scalar code.
        allowed = ("avx2", "scalar") if value == "avx2" else ("amx", "avx512", "avx2", "scalar")
        assert result.stdout.strip() in allowed
    else:
        assert result.returncode != 0
        assert "WEIGHTLIGHT_ISA: expected one of" in result.stderr
        assert "but got 'bogus'; unset it or use one of these" in result.stderr
