"""Type and range checks of plain values, shared by the constructors and loaders that validate arguments."""

from __future__ import annotations

from typing import Any


def is_int(value: Any, minimum: int) -> bool:
    """Return whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_int_list(value: Any, minimum: int, count: int | None = None) -> bool:
    """Return whether ``value`` is a non-empty list or tuple of ints of at least ``minimum``.

    With ``count``, it must have exactly that many.
    """
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        return False
    if count is not None and len(value) != count:
        return False
    return all(is_int(item, minimum) for item in value)
