"""Conversion of QAT modules to deploy modules: int8 kernels, weight-only, int16x8.

The conversion reuses the exact scales that fake quantization used during training, so the int8
weights are ``clamp(round(w / scale))`` of the same float32 values and zero weights stay zero.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from lightning_weightlight.quantization.deploy import Int16x8, WeightOnlyQuantized
from lightning_weightlight.quantization.modules import QATConv2d, QATConvBn2d, QATEmbedding, qat_layers

log = logging.getLogger(__name__)

SPARSE_CHOICES = ("auto", "always", "never")


def _kernel_layers():
    try:
        from lightning_weightlight.kernels import layers
    except ImportError as err:  # pragma: no cover - only while the deploy layers are missing
        raise ImportError(
            "convert: int8 deploy modules need lightning_weightlight.kernels.layers, which failed to import"
        ) from err
    return layers


def _plain_module(module: nn.Module) -> nn.Module:
    """Return a float module with the weight and bias that the deploy module quantizes."""
    if not isinstance(module, QATConvBn2d):
        return module.to_float()
    weight, bias = module.deploy_weight()
    conv = nn.Conv2d(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=True,
        padding_mode=module.padding_mode,
        device="meta",
    )
    conv.weight = nn.Parameter(weight.clone(), requires_grad=False)
    conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return conv


def _static_input_qparams(name: str, module: nn.Module) -> tuple[float, int]:
    quant = module.input_fake_quant
    if not quant.observer.initialized:
        raise ValueError(
            f"convert: layer {name!r} has static activations but its observer saw no data; "
            "train or calibrate the model before converting"
        )
    scale, zero_point = quant.qparams()
    if quant.signed:
        # int8 codes q in [-128, 127] with zero point z are the uint8 codes q + 128 with zero point
        # z + 128, so the kernels' integer accumulators (q - z) are unchanged.
        zero_point += 128
    return scale, zero_point


def deploy_module(
    name: str, module: nn.Module, *, sparse: str = "auto", sparse_threshold: float = 0.5
) -> nn.Module:
    """Build the deploy module for one QAT module (the QAT module is not changed).

    Int8 weights with uint8 or int8 activations become ``Int8Linear``/``Int8Conv2d`` (or their
    sparse variants when ``sparse="always"``, or with ``"auto"`` when at least ``sparse_threshold``
    of the weights are zero); 4-bit weights and ``activation="none"`` become
    :class:`WeightOnlyQuantized`; 16-bit activations become :class:`Int16x8`.
    """
    config = module.config
    plain = _plain_module(module)
    scale = module.deploy_weight_scale()
    if isinstance(module, QATEmbedding) or config.activation == "none":
        return WeightOnlyQuantized.from_float(plain, bits=config.weight_bits, weight_scale=scale)
    if config.activation_bits == 16:
        input_scale, _ = module.input_fake_quant.qparams()
        return Int16x8.from_float(plain, input_scale=input_scale, weight_scale=scale)

    layers = _kernel_layers()
    zero_fraction = float((plain.weight == 0).float().mean()) if plain.weight.numel() else 0.0
    use_sparse = sparse == "always" or (sparse == "auto" and zero_fraction >= sparse_threshold)
    is_conv = isinstance(module, QATConv2d)
    if is_conv:
        cls = layers.SparseInt8Conv2d if use_sparse else layers.Int8Conv2d
    else:
        cls = layers.SparseInt8Linear if use_sparse else layers.Int8Linear
    if config.activation == "dynamic":
        input_options = {}
    else:
        input_scale, input_zero_point = _static_input_qparams(name, module)
        input_options = {"input_scale": input_scale, "input_zero_point": input_zero_point}
    try:
        return cls.from_float(plain, weight_scale=scale, **input_options)
    except ValueError as err:
        raise ValueError(f"convert: layer {name!r} cannot become {cls.__name__}: {err}") from err


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


@torch.no_grad()
def convert(
    model: nn.Module, *, inplace: bool = False, sparse: str = "auto", sparse_threshold: float = 0.5
) -> nn.Module:
    """Replace every QAT module of ``model`` by its deploy module and return the converted model.

    Folded BatchNorms become ``nn.Identity``. Every deploy module is built before the first one
    is inserted, so an error leaves ``model`` unchanged. With ``inplace=False`` (the default) a
    deep copy is converted and ``model`` keeps its QAT modules.

    Args:
        model: A model prepared by :func:`~lightning_weightlight.quantization.prepare_qat` (and
            trained or calibrated).
        inplace: Convert ``model`` itself instead of a copy.
        sparse: ``"auto"``, ``"always"`` or ``"never"``: when to use the sparse int8 kernels.
        sparse_threshold: Share of zero weights from which ``"auto"`` picks the sparse kernels.

    Raises:
        ValueError: ``model`` has no QAT module, an argument is invalid, or a static layer never
            observed data.
    """
    if sparse not in SPARSE_CHOICES:
        raise ValueError(f"sparse: expected one of {list(SPARSE_CHOICES)}, but got {sparse!r}")
    if not 0.0 <= sparse_threshold <= 1.0:
        raise ValueError(f"sparse_threshold: expected a value in [0, 1], but got {sparse_threshold}")
    if not qat_layers(model):
        raise ValueError(f"convert: expected a model with QAT modules, but {type(model).__name__} has none")
    target = model if inplace else copy.deepcopy(model)

    layers = qat_layers(target)
    names_by_module = {id(module): name for name, module in target.named_modules()}
    replacements: dict[str, nn.Module] = {}
    for name, module in layers.items():
        replacements[name] = deploy_module(name, module, sparse=sparse, sparse_threshold=sparse_threshold)
        if isinstance(module, QATConvBn2d):
            replacements[names_by_module[id(module.bn)]] = nn.Identity()

    was_training = target.training
    for name, module in replacements.items():
        _set_submodule(target, name, module)
    target.train(was_training)
    log.info("convert: replaced %d QAT modules by deploy modules", len(layers))
    return target
