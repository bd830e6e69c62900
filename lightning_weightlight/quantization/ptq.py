"""Post-training quantization: a plain function on any ``nn.Module`` and the Lightning callback.

Modes:

* ``static``: int8 weights per channel, uint8 inputs per tensor with ranges calibrated on data.
* ``dynamic``: int8 weights, inputs quantized per row at run time (no calibration).
* ``weight_only``: int8 or int4 weights, float activations.
* ``float16``: weights stored in float16.
* ``int16x8``: int8 weights, int16 symmetric inputs calibrated on data (TensorFlow Lite's 16x8).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_weightlight.quantization.convert import _set_submodule, convert
from lightning_weightlight.quantization.deploy import Float16Weight, WeightOnlyQuantized
from lightning_weightlight.quantization.fake_quant import WEIGHT_BITS, CalibrationError, check_choice
from lightning_weightlight.quantization.modules import QATConfig, fold_conv_bn, qat_layers
from lightning_weightlight.quantization.qat import _conv_bn_pairs, prepare_qat
from lightning_weightlight.selection import select_layers, validate_patterns, validate_types

log = logging.getLogger(__name__)

MODES = ("static", "dynamic", "weight_only", "float16", "int16x8")
CALIBRATED_MODES = ("static", "int16x8")
RUN_ON = ("fit_end", "validate_start", "test_start")
SPLITS = ("train", "val", "test")


@dataclass
class QuantizationResult:
    """The quantized model and its per-layer signal-to-quantization-noise ratios in dB.

    ``sqnr_db`` maps each quantized layer (and ``"output"``, the model's output) to
    ``10 * log10(sum(float**2) / sum((float - quantized)**2))`` over the calibration batches;
    it is empty when no data was given.
    """

    model: nn.Module
    mode: str
    sqnr_db: dict[str, float] = field(default_factory=dict)
    low_sqnr_layers: list[str] = field(default_factory=list)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: the first element of a tuple or list, a dict as keyword arguments."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _batches(dataloader: Iterable, num_batches: int, progress: bool, description: str):
    iterator = iter(dataloader)
    for index in tqdm(range(num_batches), desc=description, disable=not progress, leave=False):
        try:
            yield next(iterator)
        except StopIteration:
            if index == 0:
                raise CalibrationError(
                    f"dataloader: expected at least one batch for {description}, but the dataloader is empty"
                ) from None
            return


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    if isinstance(value, dict) and value:
        return _first_tensor(next(iter(value.values())))
    return None


class _SqnrMeter:
    """Accumulate signal and noise energies per layer from forward hooks on two models."""

    def __init__(self, float_model: nn.Module, quantized: nn.Module, probes: dict[str, str]) -> None:
        self.signal = dict.fromkeys(probes, 0.0)
        self.noise = dict.fromkeys(probes, 0.0)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for layer, probe in probes.items():
            self._handles.append(float_model.get_submodule(probe).register_forward_hook(self._store(layer)))
            self._handles.append(quantized.get_submodule(probe).register_forward_hook(self._compare(layer)))

    def _store(self, layer: str):
        def hook(module, args, output):
            self._outputs[layer] = output.detach().float()

        return hook

    def _compare(self, layer: str):
        def hook(module, args, output):
            self.add(layer, self._outputs.pop(layer), output.detach().float())

        return hook

    def add(self, layer: str, reference: torch.Tensor, quantized: torch.Tensor) -> None:
        self.signal[layer] = self.signal.get(layer, 0.0) + float(reference.double().pow(2).sum())
        self.noise[layer] = self.noise.get(layer, 0.0) + float(
            (reference.double() - quantized.double()).pow(2).sum()
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def result(self) -> dict[str, float]:
        return {layer: _sqnr_db(self.signal[layer], self.noise[layer]) for layer in self.signal}


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _direct_deploy(
    model: nn.Module,
    selected: dict[str, nn.Module],
    mode: str,
    weight_bits: int,
    per_channel: bool,
    fold_bn: bool,
) -> dict[str, nn.Module]:
    """Build deploy modules for the modes that need no calibration; return them by name."""
    replacements: dict[str, nn.Module] = {}
    pairs = _conv_bn_pairs(model) if fold_bn and mode == "dynamic" else {}
    for name, module in selected.items():
        if mode == "float16":
            replacements[name] = Float16Weight.from_float(module)
        elif mode == "weight_only":
            replacements[name] = WeightOnlyQuantized.from_float(
                module, bits=weight_bits, per_channel=per_channel
            )
        else:
            from lightning_weightlight.kernels import layers

            if isinstance(module, nn.Embedding):
                replacements[name] = WeightOnlyQuantized.from_float(module, bits=8, per_channel=per_channel)
                continue
            plain = module
            if name in pairs:
                weight, bias = fold_conv_bn(module.weight, module.bias, model.get_submodule(pairs[name]))
                plain = copy.deepcopy(module)
                plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                plain.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
                replacements[pairs[name]] = nn.Identity()
            cls = layers.Int8Conv2d if isinstance(module, nn.Conv2d) else layers.Int8Linear
            replacements[name] = cls.from_float(plain)
    return replacements


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    mode: str = "static",
    dataloader: Iterable | None = None,
    *,
    num_batches: int = 32,
    include: str | Sequence[str] | None = None,
    skip_layers: str | Sequence[str] | None = None,
    types: str | Sequence[str] = ("Linear", "Conv2d"),
    exclude_head: bool = False,
    weight_bits: int = 8,
    per_channel: bool = True,
    observer: str = "minmax",
    percentile: float = 99.99,
    fold_bn: bool = True,
    sparse: str = "auto",
    sqnr_threshold_db: float = 20.0,
    strict: bool = True,
    progress: bool = True,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
) -> QuantizationResult:
    """Quantize a copy of ``model`` after training; ``model`` itself is never changed.

    Args:
        model: Any ``nn.Module``; it is put in eval mode for calibration and comparison.
        mode: One of ``static``, ``dynamic``, ``weight_only``, ``float16``, ``int16x8``.
        dataloader: Calibration batches; required by ``static`` and ``int16x8``, optional
            otherwise (then it only feeds the SQNR report).
        num_batches: Batches to calibrate on and to measure SQNR on.
        include: Patterns of layer names to quantize (every layer of ``types`` when ``None``).
        skip_layers: Patterns of layer names to keep in float.
        types: Module types to quantize: ``"Linear"``, ``"Conv2d"``, ``"Embedding"``.
        exclude_head: Keep the last Linear layer in float.
        weight_bits: 8, or 4 (``weight_only`` only).
        per_channel: One weight scale per output channel; otherwise one per tensor.
        observer: ``"minmax"``, ``"moving_average"`` or ``"percentile"`` for calibrated modes.
        percentile: Upper percentile of the percentile observer.
        fold_bn: Fold a BatchNorm2d that directly follows a quantized Conv2d into it.
        sparse: When to use the sparse int8 kernels: ``"auto"``, ``"always"``, ``"never"``.
        sqnr_threshold_db: Layers whose SQNR falls below this are named in a warning.
        strict: Raise when a pattern matches no layer, instead of warning.
        progress: Show a progress bar while calibrating.
        forward_fn: Runs the model on one batch; the default takes the first element of a tuple.

    Raises:
        ValueError: An argument is invalid; :class:`CalibrationError` (a ``ValueError``) when the
            calibration dataloader is empty or the activations contain NaN or inf.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> data = [(torch.randn(32, 8), None) for _ in range(4)]
        >>> result = quantize_model(model, "weight_only", data, progress=False)
        >>> result.sqnr_db["output"] > 30
        True
    """
    check_choice("mode", mode, MODES)
    check_choice("weight_bits", weight_bits, WEIGHT_BITS)
    if weight_bits == 4 and mode != "weight_only":
        raise ValueError(f"weight_bits: 4-bit weights need mode='weight_only', but got mode={mode!r}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches: expected a positive integer, but got {num_batches!r}")
    if mode in CALIBRATED_MODES and dataloader is None:
        raise ValueError(
            f"dataloader: mode {mode!r} calibrates activation ranges and needs data, but got None"
        )
    float_model = model
    was_training = model.training
    model.eval()
    work = copy.deepcopy(model)

    try:
        if mode in CALIBRATED_MODES:
            config = QATConfig(
                activation="static",
                activation_bits=16 if mode == "int16x8" else 8,
                observer=observer,
                percentile=percentile,
                per_channel=per_channel,
            )
            prepare_qat(
                work,
                config,
                include=include,
                exclude=skip_layers,
                types=types,
                exclude_head=exclude_head,
                fold_bn=fold_bn,
                strict=strict,
            )
            _calibrate(work, dataloader, num_batches, progress, forward_fn)
            probes = _probe_names(work)
            convert(work, inplace=True, sparse=sparse)
        else:
            selected = select_layers(
                work,
                include=include,
                exclude=skip_layers,
                types=types,
                exclude_head=exclude_head,
                strict=strict,
            )
            replacements = _direct_deploy(work, selected, mode, weight_bits, per_channel, fold_bn)
            probes = {name: name for name in selected}
            probes.update({name: bn for name, bn in _conv_bn_pairs(work).items() if bn in replacements})
            for name, module in replacements.items():
                _set_submodule(work, name, module)
    finally:
        model.train(was_training)

    result = QuantizationResult(model=work, mode=mode)
    if dataloader is not None:
        float_model.eval()
        try:
            result.sqnr_db = _measure_sqnr(float_model, work, probes, dataloader, num_batches, forward_fn)
        finally:
            float_model.train(was_training)
    result.low_sqnr_layers = [name for name, value in result.sqnr_db.items() if value < sqnr_threshold_db]
    if result.low_sqnr_layers:
        listed = ", ".join(f"{name} ({result.sqnr_db[name]:.1f} dB)" for name in result.low_sqnr_layers)
        warnings.warn(
            f"quantize_model: SQNR below {sqnr_threshold_db} dB in {listed}; consider skip_layers for them",
            UserWarning,
            stacklevel=2,
        )
    work.train(was_training)
    return result


def _probe_names(model: nn.Module) -> dict[str, str]:
    """Map each QAT layer to the module whose output the SQNR compares (the BatchNorm after a folded conv)."""
    names_by_module = {id(module): name for name, module in model.named_modules()}
    probes = {}
    for name, module in qat_layers(model).items():
        bn = getattr(module, "bn", None)
        probes[name] = names_by_module[id(bn)] if bn is not None else name
    return probes


def _calibrate(model: nn.Module, dataloader: Iterable, num_batches: int, progress: bool, forward_fn) -> None:
    layers = qat_layers(model)
    for module in layers.values():
        quant = module.input_fake_quant
        quant.calibrating, quant.fake_quant_enabled = True, False
    for batch in _batches(dataloader, num_batches, progress, "calibration"):
        forward_fn(model, batch)
    for module in layers.values():
        quant = module.input_fake_quant
        quant.calibrating, quant.fake_quant_enabled = False, True


def _measure_sqnr(float_model, quantized, probes, dataloader, num_batches, forward_fn) -> dict[str, float]:
    meter = _SqnrMeter(float_model, quantized, probes)
    try:
        for batch in _batches(dataloader, num_batches, False, "SQNR measurement"):
            reference = _first_tensor(forward_fn(float_model, batch))
            output = _first_tensor(forward_fn(quantized, batch))
            if reference is not None and output is not None:
                meter.add("output", reference.float(), output.float())
    finally:
        meter.remove()
    return meter.result()


class PostTrainingQuantization(Callback):
    """Quantize the trained model at the end of fit, or when validate or test starts.

    The LightningModule's layers are replaced by deploy modules only after the whole
    quantization succeeded; on error the model is unchanged. Per-layer SQNR goes to the logger
    (``ptq/<layer>/sqnr_db``) and a summary table to the log; layers below
    ``sqnr_threshold_db`` are named in a warning.

    Args:
        mode: ``"static"``, ``"dynamic"``, ``"weight_only"``, ``"float16"`` or ``"int16x8"``.
        num_batches: Calibration (and SQNR) batches.
        dataloader: Split that provides them: ``"train"``, ``"val"`` or ``"test"``.
        run_on: When to quantize: ``"fit_end"``, ``"validate_start"``, ``"test_start"`` or a list.
        include: Patterns of layer names to quantize (every layer of ``types`` when ``None``).
        skip_layers: Patterns of layer names to keep in float.
        types: Module types to quantize: ``"Linear"``, ``"Conv2d"``, ``"Embedding"``.
        exclude_head: Keep the last Linear layer in float.
        weight_bits: 8, or 4 for ``weight_only``.
        per_channel: One weight scale per output channel; otherwise one per tensor.
        observer: ``"minmax"``, ``"moving_average"`` or ``"percentile"``.
        percentile: Upper percentile of the percentile observer.
        fold_bn: Fold BatchNorm2d layers into the preceding quantized Conv2d.
        sparse: When to use the sparse int8 kernels: ``"auto"``, ``"always"``, ``"never"``.
        sqnr_threshold_db: SQNR in dB below which a layer is named in a warning.
        strict: Raise when a pattern matches no layer, instead of warning.

    Example:
        >>> callback = PostTrainingQuantization(mode="static", num_batches=8, skip_layers="classifier.2")
    """

    def __init__(
        self,
        mode: str = "static",
        num_batches: int = 32,
        dataloader: str = "train",
        run_on: str | list[str] = "fit_end",
        include: str | list[str] | None = None,
        skip_layers: str | list[str] | None = None,
        types: str | list[str] = ("Linear", "Conv2d"),
        exclude_head: bool = False,
        weight_bits: int = 8,
        per_channel: bool = True,
        observer: str = "minmax",
        percentile: float = 99.99,
        fold_bn: bool = True,
        sparse: str = "auto",
        sqnr_threshold_db: float = 20.0,
        strict: bool = True,
    ) -> None:
        check_choice("mode", mode, MODES)
        check_choice("dataloader", dataloader, SPLITS)
        check_choice("weight_bits", weight_bits, WEIGHT_BITS)
        QATConfig(observer=observer, percentile=percentile)
        if weight_bits == 4 and mode != "weight_only":
            raise ValueError(f"weight_bits: 4-bit weights need mode='weight_only', but got mode={mode!r}")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches: expected a positive integer, but got {num_batches!r}")
        self.run_on = [run_on] if isinstance(run_on, str) else list(run_on)
        for value in self.run_on:
            check_choice("run_on", value, RUN_ON)
        self.mode = mode
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.include = validate_patterns("include", include)
        self.skip_layers = validate_patterns("skip_layers", skip_layers)
        self.types = [cls.__name__ for cls in validate_types("types", types)]
        self.exclude_head = exclude_head
        self.weight_bits = weight_bits
        self.per_channel = per_channel
        self.observer = observer
        self.percentile = percentile
        self.fold_bn = fold_bn
        self.sparse = sparse
        self.sqnr_threshold_db = sqnr_threshold_db
        self.strict = strict
        self.result: QuantizationResult | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, include=self.include, skip_layers=self.skip_layers)

    def _dataloader(self, trainer: L.Trainer, pl_module: L.LightningModule):
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        return getattr(source, f"{self.dataloader}_dataloader")()

    def quantize(self, trainer: L.Trainer, pl_module: L.LightningModule) -> QuantizationResult:
        """Quantize ``pl_module`` in place (its layers are swapped only after success) and log the SQNR."""
        dataloader = self._dataloader(trainer, pl_module)
        result = quantize_model(
            pl_module,
            self.mode,
            dataloader,
            num_batches=self.num_batches,
            include=self.include or None,
            skip_layers=self.skip_layers or None,
            types=self.types,
            exclude_head=self.exclude_head,
            weight_bits=self.weight_bits,
            per_channel=self.per_channel,
            observer=self.observer,
            percentile=self.percentile,
            fold_bn=self.fold_bn,
            sparse=self.sparse,
            sqnr_threshold_db=self.sqnr_threshold_db,
            strict=self.strict,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            forward_fn=default_forward,
        )
        for name, child in list(result.model.named_children()):
            setattr(pl_module, name, child)
        self.result = result
        if trainer.logger is not None and trainer.is_global_zero:
            finite = {
                f"ptq/{name}/sqnr_db": value for name, value in result.sqnr_db.items() if math.isfinite(value)
            }
            trainer.logger.log_metrics(finite, step=trainer.global_step)
        rank_zero_info(f"PostTrainingQuantization ({self.mode}) summary\n" + _format_sqnr(result.sqnr_db))
        return result

    def _already_quantized(self) -> bool:
        return self.result is not None

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "fit_end" in self.run_on and not self._already_quantized():
            self.quantize(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "validate_start" in self.run_on and trainer.validating and not trainer.sanity_checking:
            if trainer.state.fn == "validate" and not self._already_quantized():
                self.quantize(trainer, pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test_start" in self.run_on and not self._already_quantized():
            self.quantize(trainer, pl_module)


def _format_sqnr(sqnr_db: dict[str, float]) -> str:
    from tabulate import tabulate

    if not sqnr_db:
        return "(no calibration data, no SQNR measured)"
    return tabulate(
        [(name, f"{value:.1f}") for name, value in sqnr_db.items()], headers=["layer", "SQNR (dB)"]
    )
