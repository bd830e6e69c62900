"""Typed wrappers and fake kernels for the ``torch.ops.weightlight`` operators.

Each wrapper calls the compiled operator when the extension is loaded and the reference in
:mod:`lightning_weightlight.kernels.reference` otherwise.
"""

from __future__ import annotations

import torch

from lightning_weightlight.kernels import _loader, reference

_loader.load()


def has_cpp() -> bool:
    """Return whether the compiled operators are loaded in this process."""
    return _loader.HAS_CPP


def active_isa() -> str:
    """Return the instruction set that the kernels use: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    if not _loader.HAS_CPP:
        return "reference"
    return torch.ops.weightlight.isa()


def set_isa(name: str) -> str:
    """Cap the instruction set that the kernels use and return the one in effect.

    ``name`` is ``"auto"``, ``"avx512"``, ``"avx2"`` or ``"scalar"``.

    A request above what this CPU supports gives the best supported set. The environment
    variable ``WEIGHTLIGHT_ISA`` sets the same cap at start-up.
    """
    allowed = ("auto", "avx512", "avx2", "scalar")
    if name not in allowed:
        raise ValueError(f"set_isa: expected one of {allowed}, but got {name!r}")
    if not _loader.HAS_CPP:
        return "reference"
    return torch.ops.weightlight.set_isa(name)


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D float32 tensor to uint8: ``(q, scale, zero_point)``.

    Bit-identical to :func:`lightning_weightlight.kernels.reference.quantize_per_row`.
    """
    if _loader.HAS_CPP:
        return torch.ops.weightlight.quantize_per_row(x)
    return reference.quantize_per_row(x)


if _loader.HAS_CPP:

    @torch.library.register_fake("weightlight::quantize_per_row")
    def _quantize_per_row_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check(x.dim() == 2, lambda: f"quantize_per_row: expected a 2-D tensor, got {x.dim()}-D")
        rows = x.shape[0]
        return (
            x.new_empty(x.shape, dtype=torch.uint8),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.int32),
        )
