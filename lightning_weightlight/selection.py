"""Layer selection for callbacks: name patterns, module types and exclusions.

Callbacks take plain strings so that LightningCLI can build them from YAML. A pattern is a
shell-style glob over the qualified module name (``"features.*.conv"``, ``"classifier.*"``) or,
with the prefix ``re:``, a regular expression that must match the whole name
(``"re:encoder\\.layer\\.\\d+\\.attention.*"``).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from collections.abc import Iterable, Sequence

from torch import nn

log = logging.getLogger(__name__)

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Embedding": nn.Embedding,
}
"""Module types that callbacks can select, by the names used in arguments and YAML files."""


class NoLayerMatchedError(ValueError):
    """A pattern or a selection matched no layer of the model."""


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def validate_patterns(argument: str, patterns: str | Sequence[str] | None) -> list[str]:
    """Check that every pattern is a string and every ``re:`` pattern compiles; return them as a list."""
    result = _as_list(patterns)
    for pattern in result:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{argument}: expected non-empty strings, but got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"{argument}: invalid regular expression {pattern!r}: {err}") from err
    return result


def validate_types(argument: str, types: str | Sequence[str] | None) -> tuple[type[nn.Module], ...]:
    """Map type names such as ``"Linear"`` to module classes, rejecting unknown names."""
    names = _as_list(types)
    if not names:
        raise ValueError(f"{argument}: expected at least one of {sorted(LAYER_TYPES)}, but got {types!r}")
    unknown = [name for name in names if name not in LAYER_TYPES]
    if unknown:
        raise ValueError(f"{argument}: expected names from {sorted(LAYER_TYPES)}, but got unknown {unknown}")
    return tuple(LAYER_TYPES[name] for name in names)


def matches(name: str, pattern: str) -> bool:
    """Return whether the qualified module name ``name`` matches one glob or ``re:`` pattern."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Return whether ``name`` matches at least one of ``patterns``."""
    return any(matches(name, pattern) for pattern in patterns)


def last_layer_name(model: nn.Module, types: Sequence[type[nn.Module]] = (nn.Linear,)) -> str | None:
    """Return the name of the last module of ``types`` in registration order (usually the output head)."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, tuple(types)):
            name = module_name
    return name


def select_layers(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: str | Sequence[str] = ("Linear", "Conv2d"),
    exclude_head: bool = False,
    strict: bool = True,
    argument: str = "include",
) -> dict[str, nn.Module]:
    """Select the layers of ``model`` that a compression method should touch.

    Args:
        model: The model to search.
        include: Patterns of layer names to select; ``None`` selects every layer of ``types``.
        exclude: Patterns of layer names to leave alone, applied after ``include``.
        types: Names of the module types to select, from :data:`LAYER_TYPES`.
        exclude_head: Leave out the last Linear layer of the model (the usual output head).
        strict: Raise :class:`NoLayerMatchedError` when a pattern of ``include`` or ``exclude``
            matches no layer of the right type; otherwise warn and name the pattern.
        argument: Name of the caller's argument that contains ``include``, used in messages.

    Returns:
        The selected modules by qualified name, in registration order.

    Raises:
        NoLayerMatchedError: Nothing is selected, or (with ``strict``) a pattern matches nothing.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(select_layers(model, exclude_head=True))
        ['0']
        >>> list(select_layers(model, include="re:[02]", types="Linear"))
        ['0', '2']
    """
    include_patterns = validate_patterns(argument, include)
    exclude_patterns = validate_patterns("exclude", exclude)
    classes = validate_types("types", types)
    candidates = {
        name: module for name, module in model.named_modules() if name and isinstance(module, classes)
    }

    unmatched = [
        (arg, pattern)
        for arg, patterns in ((argument, include_patterns), ("exclude", exclude_patterns))
        for pattern in patterns
        if not any(matches(name, pattern) for name in candidates)
    ]
    for arg, pattern in unmatched:
        message = (
            f"{arg}: pattern {pattern!r} matches no layer of types {list(_as_list(types))}; "
            f"the candidates are {list(candidates)}"
        )
        if strict:
            raise NoLayerMatchedError(message)
        warnings.warn(message, UserWarning, stacklevel=2)

    head = last_layer_name(model) if exclude_head else None
    selected = {
        name: module
        for name, module in candidates.items()
        if (not include_patterns or matches_any(name, include_patterns))
        and not matches_any(name, exclude_patterns)
        and name != head
    }
    if not selected:
        raise NoLayerMatchedError(
            f"{argument}: the selection (include={include_patterns}, exclude={exclude_patterns}, "
            f"types={list(_as_list(types))}, exclude_head={exclude_head}) matches no layer; "
            f"the candidates are {list(candidates)}"
        )
    return selected
