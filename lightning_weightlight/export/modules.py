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
    if name in TORCH_LAYERS and {"device", "dtype"} & config.keys():
        # save_compressed never records these keys: layers are rebuilt on the CPU with the default dtype.
        raise ValueError(
            f"module description: unexpected 'device' or 'dtype' in the config of {name}: {config!r}"
        )
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
