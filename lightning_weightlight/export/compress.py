"""``compress``: turn a trained float model into the deploy model on the compiled kernels.

Each selected Linear and Conv2d layer becomes the deploy module that
:func:`lightning_weightlight.kernels.layers.choose_kernel` picks from its weight: the zeros that
pruning left choose a sparse kernel, ``quantize`` an int8 one. Models trained with
quantization-aware training are converted with the scales that training learned.
"""

from __future__ import annotations

import copy
import importlib
import logging
import warnings
from collections.abc import Sequence

from torch import nn

from lightning_weightlight.export.modules import deploy_classes, is_deploy_module
from lightning_weightlight.selection import NoLayerMatchedError, select_layers

log = logging.getLogger(__name__)

KERNEL_CLASSES = {
    nn.Linear: {"int8": "Int8Linear", "sparse": "SparseLinear", "sparse_int8": "SparseInt8Linear"},
    nn.Conv2d: {"int8": "Int8Conv2d", "sparse": "SparseConv2d", "sparse_int8": "SparseInt8Conv2d"},
}
"""Deploy class for each float layer type and kernel choice."""


class CompressionError(ValueError):
    """A layer could not be converted and ``strict=True`` was given."""


def _kernels_layers():
    try:
        return importlib.import_module("lightning_weightlight.kernels.layers")
    except ImportError as err:
        raise RuntimeError(
            f"compress: the deploy modules (lightning_weightlight.kernels.layers) are missing: {err}"
        ) from err


def _compression_target(model: nn.Module) -> nn.Module:
    """Return the student of a DistillationModule, the model itself otherwise."""
    try:
        module = importlib.import_module("lightning_weightlight.distillation.module")
    except ImportError:
        return model
    return module.compression_target(model)


def _convert_qat(model: nn.Module) -> nn.Module:
    """Swap quantization-aware training modules for deploy modules, when the model has any."""
    try:
        modules = importlib.import_module("lightning_weightlight.quantization.modules")
        conversion = importlib.import_module("lightning_weightlight.quantization.convert")
    except ImportError:
        return model
    if not modules.qat_layers(model):
        return model
    return conversion.convert(model, inplace=True)


def _to_deploy(layer: nn.Module, kernel: str) -> nn.Module:
    name = KERNEL_CLASSES[type(layer)][kernel]
    cls = deploy_classes().get(name)
    if cls is None:
        raise NotImplementedError(f"this installation has no deploy module {name}")
    if kernel == "sparse":
        return cls.from_dense(layer)
    return cls.from_float(layer)


def _kernel_chooser(layers):
    """Return ``choose_kernel`` of the kernels package (in ``kernels.choice`` or ``kernels.layers``)."""
    try:
        return importlib.import_module("lightning_weightlight.kernels.choice").choose_kernel
    except (ImportError, AttributeError):
        return layers.choose_kernel


def compress(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    quantize: bool = True,
    batch_rows: int = 1,
    measure: bool = False,
    strict: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Convert the Linear and Conv2d layers of a trained model to deploy modules on our kernels.

    QAT modules are converted first with their learned scales. Every other selected layer gets the
    kernel that ``choose_kernel`` picks from the zeros of its weight and from ``quantize``. These
    int8 layers use per-channel weight scales and quantize their input per row at run time.

    Args:
        model: The trained model. It is copied unless ``inplace``. For a ``DistillationModule``
            its student is compressed and returned.
        include: Name patterns (globs or ``re:`` regexes) of the layers to convert; all by default.
        exclude: Name patterns of layers to leave in float.
        quantize: Allow int8 kernels. Without it only sparse float kernels are chosen.
        batch_rows: Typical rows per call (batch size times tokens) that the kernel choice assumes.
        measure: Time the candidate kernels on each layer instead of using the static rule.
        strict: Raise :class:`CompressionError` for a layer that cannot be converted instead of
            leaving it in float with a warning.
        inplace: Modify ``model`` instead of a copy.

    Returns:
        The compressed model in eval mode.

    Raises:
        CompressionError: With ``strict``, a selected layer could not be converted.
        NoLayerMatchedError: A pattern of ``include`` or ``exclude`` matches no layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: expected an nn.Module, but got {type(model).__name__}")
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows: expected a positive integer, but got {batch_rows!r}")
    choose_kernel = _kernel_chooser(_kernels_layers())
    model = _compression_target(model)
    if not inplace:
        model = copy.deepcopy(model)
    model = _convert_qat(model)

    skipped: list[tuple[str, str]] = []
    try:
        candidates = select_layers(
            model, include=include, exclude=exclude, types=("Linear", "Conv2d"), strict=True
        )
    except NoLayerMatchedError:
        if include is not None or exclude is not None:
            raise
        candidates = {}  # a model whose layers QAT conversion already replaced, or one without any
    kept_dense = 0
    for name, layer in candidates.items():
        if type(layer) not in KERNEL_CLASSES:
            skipped.append(
                (name, f"{type(layer).__name__} is a subclass of a float layer with no deploy module")
            )
            continue
        try:
            kernel = choose_kernel(
                layer.weight.detach(), batch_rows=batch_rows, quantized=quantize, measure=measure
            )
            if kernel == "dense":
                log.info("compress: %s stays dense: the dense float kernel is fastest for its weight", name)
                kept_dense += 1
                continue
            deploy = _to_deploy(layer, kernel)
        except (ValueError, TypeError, NotImplementedError, RuntimeError, KeyError) as err:
            skipped.append((name, f"{type(err).__name__}: {err}"))
            continue
        model.set_submodule(name, deploy)
        log.info("compress: %s -> %s (%s kernel)", name, type(deploy).__name__, kernel)

    for name, reason in skipped:
        message = f"compress: layer {name!r} stays in float: {reason}"
        if strict:
            raise CompressionError(message)
        warnings.warn(message, UserWarning, stacklevel=2)

    converted = sum(1 for module in model.modules() if is_deploy_module(module))
    log.info(
        "compress: %d deploy layers, %d kept dense in float by choice, %d left in float because they "
        "could not be converted",
        converted,
        kept_dense,
        len(skipped),
    )
    return model.eval()
