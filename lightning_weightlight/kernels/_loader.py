"""Load the compiled ``torch.ops.weightlight`` operators.

Order of attempts: the module built at install time (``lightning_weightlight._C``), then a JIT
build of ``csrc/`` cached per torch version and source hash, then nothing: the Python wrappers
fall back to the pure-PyTorch reference, and one warning reports it. ``WEIGHTLIGHT_REQUIRE_CPP=1``
turns a missing extension into an ``ImportError``; ``WEIGHTLIGHT_NO_JIT=1`` skips the JIT build.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_TRUE = {"1", "true", "yes", "on"}

HAS_CPP = False
"""Whether the compiled operators are registered in this process."""

LOAD_ERROR: str | None = None
"""Reason the compiled operators could not be loaded, or ``None`` when they were."""


class ExtensionNotAvailableError(ImportError):
    """The compiled extension is required (``WEIGHTLIGHT_REQUIRE_CPP=1``) but could not be loaded."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _sources() -> list[Path]:
    return sorted(_CSRC.glob("*.cpp"))


def _jit_build_dir() -> Path:
    digest = hashlib.sha256()
    digest.update(torch.__version__.encode())
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    root = os.environ.get("WEIGHTLIGHT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lightning-weightlight"
    )
    return Path(root) / f"jit-{digest.hexdigest()[:16]}"


def _load_jit() -> None:
    from torch.utils import cpp_extension

    build_dir = _jit_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file that a killed build leaves behind, and every
    # later build then waits on it forever. An flock is released by the kernel when its
    # holder dies, so this process holds one for the whole build and removes a stale file
    # lock first. A second process blocks here until the first has finished, then loads
    # the library that the first one built.
    with open(build_dir / "build.flock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name="weightlight_jit",
            sources=[str(path) for path in _sources()],
            extra_cflags=["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off"],  # as in setup.py
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )


def load() -> bool:
    """Register the compiled operators once; return whether they are available."""
    global HAS_CPP, LOAD_ERROR
    if HAS_CPP:
        return True

    errors = []
    try:
        # Without this check a missing file reads as Python's "partially initialized module ...
        # (most likely due to a circular import)", because the package is still being imported.
        if importlib.util.find_spec("lightning_weightlight._C") is None:
            raise ImportError("lightning_weightlight._C is not installed (no compiled file)")
        from lightning_weightlight import _C  # noqa: F401

        HAS_CPP = True
    except ImportError as err:
        errors.append(f"prebuilt module: {err}")

    if not HAS_CPP and not _env_flag("WEIGHTLIGHT_NO_JIT"):
        try:
            _load_jit()
            HAS_CPP = True
            log.info("Loaded the JIT-built weightlight extension from %s", _jit_build_dir())
        except Exception as err:  # a failed compiler run raises RuntimeError or OSError
            errors.append(f"JIT build: {type(err).__name__}: {err}")

    if HAS_CPP:
        LOAD_ERROR = None
        return True

    LOAD_ERROR = "; ".join(errors)
    if _env_flag("WEIGHTLIGHT_REQUIRE_CPP"):
        raise ExtensionNotAvailableError(
            "WEIGHTLIGHT_REQUIRE_CPP is set but the compiled extension could not be loaded "
            f"({LOAD_ERROR}). Reinstall with `pip install --no-build-isolation .` after "
            "installing torch==2.13.0, or unset WEIGHTLIGHT_REQUIRE_CPP to use the slower "
            "pure-PyTorch reference."
        )
    warnings.warn(
        "lightning_weightlight: the compiled extension is not available, so the kernels run the "
        f"slower pure-PyTorch reference ({LOAD_ERROR}).",
        RuntimeWarning,
        stacklevel=2,
    )
    return False
