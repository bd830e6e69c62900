"""Describe leaf modules as JSON and rebuild them from that description, for an allow-list of classes.

A compressed file names each replaced or reshaped module by its class and constructor arguments.
Loading builds modules only from the classes listed here, so a file cannot make the loader
construct anything else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_weightlight._checks import is_int, is_int_list


def _conv_config(module: nn.Module) -> dict[str, Any]:
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": list(module.kernel_size),
        "stride": list(module.stride),
        "padding": padding,
        "dilation": list(module.dilation),
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }


def _batch_norm_config(module: nn.Module) -> dict[str, Any]:
    return {
        "num_features": module.num_features,
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
    }


def _layer_norm_config(module: nn.LayerNorm) -> dict[str, Any]:
    return {
        "normalized_shape": list(module.normalized_shape),
        "eps": module.eps,
        "elementwise_affine": module.elementwise_affine,
        "bias": getattr(module, "bias", None) is not None,
    }


def _embedding_config(module: nn.Embedding) -> dict[str, Any]:
    return {
        "num_embeddings": module.num_embeddings,
        "embedding_dim": module.embedding_dim,
        "padding_idx": module.padding_idx,
        "max_norm": module.max_norm,
        "norm_type": module.norm_type,
        "scale_grad_by_freq": module.scale_grad_by_freq,
        "sparse": module.sparse,
    }


TORCH_LAYERS: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {
    "Linear": (
        nn.Linear,
        lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    ),
    "Conv1d": (nn.Conv1d, _conv_config),
    "Conv2d": (nn.Conv2d, _conv_config),
    "Conv3d": (nn.Conv3d, _conv_config),
    "BatchNorm1d": (nn.BatchNorm1d, _batch_norm_config),
    "BatchNorm2d": (nn.BatchNorm2d, _batch_norm_config),
    "BatchNorm3d": (nn.BatchNorm3d, _batch_norm_config),
    "LayerNorm": (nn.LayerNorm, _layer_norm_config),
    "GroupNorm": (
        nn.GroupNorm,
        lambda m: {
            "num_groups": m.num_groups,
            "num_channels": m.num_channels,
            "eps": m.eps,
            "affine": m.affine,
        },
    ),
    "Embedding": (nn.Embedding, _embedding_config),
    "Identity": (nn.Identity, lambda m: {}),
}
"""Plain torch layers recorded with their shapes, so structurally pruned models rebuild exactly."""

DEPLOY_CLASS_NAMES = {
    "lightning_weightlight.kernels.layers": (
        "Int8Linear",
        "SparseLinear",
        "SparseInt8Linear",
        "Int8Conv2d",
        "SparseConv2d",
        "SparseInt8Conv2d",
    ),
    "lightning_weightlight.quantization.deploy": ("WeightOnlyQuantized", "Float16Weight", "Int16x8"),
}
"""Deploy modules that a file may name, by module. A class takes part once it defines
``extra_config()`` (JSON-serialisable constructor arguments) and ``from_config(config)``."""


def deploy_classes() -> dict[str, type[nn.Module]]:
    """Return the deploy module classes by name, leaving out those that are missing or not serialisable."""
    classes = {}
    for module_name, names in DEPLOY_CLASS_NAMES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            cls = getattr(module, name, None)
            if cls is not None and hasattr(cls, "extra_config") and hasattr(cls, "from_config"):
                classes[name] = cls
    return classes


def is_deploy_module(module: nn.Module) -> bool:
    """Return whether ``module`` is one of the deploy modules on the compiled kernels."""
    return type(module) in deploy_classes().values()


def describe_module(module: nn.Module) -> dict[str, Any] | None:
    """Describe ``module`` as ``{"class": name, "config": constructor arguments}``.

    Returns ``None`` for a module of a class outside the allow-list; the model's own constructor
    must then build it in the right shape.
    """
    cls = type(module)
    for name, deploy_cls in deploy_classes().items():
        if cls is deploy_cls:
            return {"class": name, "config": module.extra_config()}
    for name, (torch_cls, config) in TORCH_LAYERS.items():
        if cls is torch_cls:
            return {"class": name, "config": config(module)}
    return None


def _is_number(value: Any, minimum: float, strict: bool = False) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return value > minimum if strict else value >= minimum


def _ints(minimum: int, count: int | None = None) -> Callable[[Any], bool]:
    return lambda value: is_int_list(value, minimum, count)


def _conv_spec(dims: int) -> dict[str, Callable[[Any], bool]]:
    return {
        "in_channels": lambda value: is_int(value, 1),
        "out_channels": lambda value: is_int(value, 1),
        "kernel_size": _ints(1, dims),
        "stride": _ints(1, dims),
        "padding": lambda value: value in ("same", "valid") or _ints(0, dims)(value),
        "dilation": _ints(1, dims),
        "groups": lambda value: is_int(value, 1),
        "bias": lambda value: isinstance(value, bool),
        "padding_mode": lambda value: value in ("zeros", "reflect", "replicate", "circular"),
    }


_BATCH_NORM_SPEC: dict[str, Callable[[Any], bool]] = {
    "num_features": lambda value: is_int(value, 1),
    "eps": lambda value: _is_number(value, 0.0),
    "momentum": lambda value: value is None or (_is_number(value, 0.0) and value <= 1),
    "affine": lambda value: isinstance(value, bool),
    "track_running_stats": lambda value: isinstance(value, bool),
}

TORCH_CONFIG_SPECS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "Linear": {
        "in_features": lambda value: is_int(value, 0),
        "out_features": lambda value: is_int(value, 0),
        "bias": lambda value: isinstance(value, bool),
    },
    "Conv1d": _conv_spec(1),
    "Conv2d": _conv_spec(2),
    "Conv3d": _conv_spec(3),
    "BatchNorm1d": _BATCH_NORM_SPEC,
    "BatchNorm2d": _BATCH_NORM_SPEC,
    "BatchNorm3d": _BATCH_NORM_SPEC,
    "LayerNorm": {
        "normalized_shape": _ints(1),
        "eps": lambda value: _is_number(value, 0.0),
        "elementwise_affine": lambda value: isinstance(value, bool),
        "bias": lambda value: isinstance(value, bool),
    },
    "GroupNorm": {
        "num_groups": lambda value: is_int(value, 1),
        "num_channels": lambda value: is_int(value, 1),
        "eps": lambda value: _is_number(value, 0.0),
        "affine": lambda value: isinstance(value, bool),
    },
    "Embedding": {
        "num_embeddings": lambda value: is_int(value, 1),
        "embedding_dim": lambda value: is_int(value, 1),
        "padding_idx": lambda value: (
            value is None or (isinstance(value, int) and not isinstance(value, bool))
        ),
        "max_norm": lambda value: value is None or _is_number(value, 0.0, strict=True),
        "norm_type": lambda value: _is_number(value, 0.0, strict=True),
        "scale_grad_by_freq": lambda value: isinstance(value, bool),
        "sparse": lambda value: isinstance(value, bool),
    },
    "Identity": {},
}
"""The arguments a recorded torch layer may have, each with a check of its value.

torch's constructors accept values that fail only at the first forward (a stride of 0, an eps
given as a string), so a file is checked against this before a layer is built from it.
"""


def _check_torch_config(name: str, config: dict[str, Any]) -> None:
    spec = TORCH_CONFIG_SPECS[name]
    if unknown := sorted(config.keys() - spec.keys()):
        raise ValueError(
            f"module description: unexpected arguments {unknown} for {name}; expected some of {sorted(spec)}"
        )
    for key, value in config.items():
        if not spec[key](value):
            raise ValueError(f"module description: invalid value {value!r} for {key} of {name}")


def build_module(description: dict[str, Any]) -> nn.Module:
    """Build an empty module of the right class and shapes from :func:`describe_module`'s output.

    Raises:
        ValueError: The class is not in the allow-list or the arguments do not fit it.
    """
    name = description.get("class")
    config = description.get("config")
    if not isinstance(name, str):
        raise ValueError(f"module description: expected a class name, but got {name!r}")
    if not isinstance(config, dict):
        raise ValueError(f"module description: expected a JSON object 'config', but got {config!r}")
    if name in TORCH_LAYERS:
        _check_torch_config(name, config)
    deploy = deploy_classes()
    try:
        if name in deploy:
            return deploy[name].from_config(config)
        if name in TORCH_LAYERS:
            return TORCH_LAYERS[name][0](**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"module description: invalid arguments for {name}: {config!r}: {err}") from err
    allowed = sorted([*deploy, *TORCH_LAYERS])
    raise ValueError(f"module description: expected a class from {allowed}, but got {name!r}")
