"""Quantization-aware training: the module swap as plain functions, and the Lightning callback.

:func:`prepare_qat` swaps selected layers for the QAT modules of
:mod:`lightning_weightlight.quantization.modules` and returns a record of the swap.
:func:`apply_qat_record` replays that record on a fresh model, so a checkpoint of a QAT model
loads strictly into a new instance of the user's class (see :func:`load_qat_checkpoint`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_weightlight.distillation.module import compression_target
from lightning_weightlight.quantization.modules import (
    QATConfig,
    QATConv2d,
    QATConvBn2d,
    QATEmbedding,
    QATLinear,
    qat_layers,
)
from lightning_weightlight.selection import select_layers, validate_patterns, validate_types

log = logging.getLogger(__name__)

RECORD_KEY = "qat_record"
STARTED_KEY = "fake_quant_started"
START_STEP_KEY = "start_step"
QAT_TYPES = ("Linear", "Conv2d", "Embedding")


def _conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Map each Conv2d that a BatchNorm2d directly follows inside an ``nn.Sequential`` to that BatchNorm.

    Only ``nn.Sequential`` parents are searched, because there the registration order is the order
    of execution. Elsewhere a BatchNorm registered after a convolution may not consume its output.
    """
    pairs = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, child), (next_name, following) in itertools.pairwise(children):
            if (
                isinstance(child, nn.Conv2d)
                and isinstance(following, nn.BatchNorm2d)
                and following.num_features == child.out_channels
                and following.track_running_stats
            ):
                prefix = f"{parent_name}." if parent_name else ""
                pairs[prefix + name] = prefix + next_name
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def _build_qat_module(model: nn.Module, name: str, entry: dict, config: QATConfig) -> nn.Module:
    module = model.get_submodule(name)
    kind = entry["kind"]
    if kind == "conv_bn":
        return QATConvBn2d.from_float(module, config, name, bn=model.get_submodule(entry["bn"]))
    builders = {"linear": QATLinear, "conv": QATConv2d, "embedding": QATEmbedding}
    if kind not in builders:
        raise ValueError(
            f"QAT record of layer {name!r}: expected a kind in {sorted(builders)}, but got {kind!r}"
        )
    return builders[kind].from_float(module, config, name)


def apply_qat_record(model: nn.Module, record: dict) -> dict[str, nn.Module]:
    """Swap the layers named in ``record`` (from :func:`prepare_qat`) for QAT modules.

    Layers that are already QAT modules are left as they are. All new modules are built before
    the first one is inserted, so an error leaves ``model`` unchanged.

    Returns:
        The QAT modules that are now in ``model``, by name.
    """
    config = QATConfig(**record["config"])
    pending = {}
    for name, entry in record["layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"QAT record: layer {name!r} is not in the model ({err})") from err
        if isinstance(current, (QATLinear, QATConv2d, QATEmbedding)):
            continue
        pending[name] = _build_qat_module(model, name, entry, config)
    for name, module in pending.items():
        _set_submodule(model, name, module)
    return {name: model.get_submodule(name) for name in record["layers"]}


def prepare_qat(
    model: nn.Module,
    config: QATConfig | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: str | Sequence[str] = ("Linear", "Conv2d"),
    exclude_head: bool = False,
    fold_bn: bool = True,
    strict: bool = True,
) -> dict:
    """Swap the selected layers of ``model`` in place for QAT modules and return the swap record.

    Parameters keep their names and identity, so an optimizer built before the swap stays valid;
    the state dict gains only the quantizers' buffers (and LSQ scales). Running it again on a
    prepared model changes nothing.

    Args:
        model: Any ``nn.Module``.
        config: How to quantize; the default is int8 weights per channel and uint8 static inputs.
        include: Patterns of layer names to quantize (all layers of ``types`` when ``None``).
        exclude: Patterns of layer names to leave in float.
        types: Module types to quantize, from ``"Linear"``, ``"Conv2d"`` and ``"Embedding"``.
        exclude_head: Leave the last Linear layer in float.
        fold_bn: Fold a BatchNorm2d that directly follows a selected Conv2d in an ``nn.Sequential``.
        strict: Raise when a pattern matches no layer, instead of warning.

    Returns:
        A plain dict ``{"config": ..., "layers": {name: {"kind": ..., "bn": ...}}}`` that
        :func:`apply_qat_record` replays on a fresh model.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
        >>> record = prepare_qat(model)
        >>> {name: entry["kind"] for name, entry in record["layers"].items()}
        {'0': 'conv_bn', '3': 'linear'}
        >>> for key in model.state_dict():
        ...     if key.startswith("3."):
        ...         print(key)
        3.weight
        3.bias
        3.input_fake_quant.zero_point
        3.input_fake_quant.scale
        3.input_fake_quant.observer.min_val
        3.input_fake_quant.observer.max_val
    """
    config = config or QATConfig()
    classes = validate_types("types", types)
    unsupported = [cls.__name__ for cls in classes if cls.__name__ not in QAT_TYPES]
    if unsupported:
        raise ValueError(f"types: expected names from {list(QAT_TYPES)}, but got unsupported {unsupported}")
    selected = select_layers(
        model, include=include, exclude=exclude, types=types, exclude_head=exclude_head, strict=strict
    )
    if config.activation == "dynamic":
        convolutions = [name for name, module in selected.items() if isinstance(module, nn.Conv2d)]
        if convolutions:
            raise ValueError(
                f"activation='dynamic': per-row dynamic activations apply to Linear layers, but the "
                f"selection contains Conv2d layers {convolutions}; use types='Linear' or activation='static'"
            )
    pairs = _conv_bn_pairs(model) if fold_bn else {}
    layers = {}
    for name, module in selected.items():
        if isinstance(module, nn.Embedding):
            layers[name] = {"kind": "embedding", "bn": None}
        elif isinstance(module, nn.Conv2d) and name in pairs:
            layers[name] = {"kind": "conv_bn", "bn": pairs[name]}
        elif isinstance(module, nn.Conv2d):
            layers[name] = {"kind": "conv", "bn": None}
        else:
            layers[name] = {"kind": "linear", "bn": None}
    record = {"config": config.to_dict(), "layers": layers}
    apply_qat_record(model, record)
    return record


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Turn the activation observers of every QAT module of ``model`` on or off."""
    for module in qat_layers(model).values():
        if module.input_fake_quant is not None:
            module.input_fake_quant.observer_enabled = enabled


def set_fake_quantization(modules: dict[str, nn.Module], enabled: bool) -> None:
    """Turn the weight and input fake quantization of the given QAT modules on or off.

    With it off (and the observers off), a QAT module computes exactly what its float layer computes.
    """
    for module in modules.values():
        module.weight_fake_quant.fake_quant_enabled = enabled
        if module.input_fake_quant is not None:
            module.input_fake_quant.fake_quant_enabled = enabled


def _find_qat_states(checkpoint: dict) -> list[dict]:
    states = checkpoint.get("callbacks", {}) or {}
    return [state for state in states.values() if isinstance(state, dict) and RECORD_KEY in state]


def find_qat_records(checkpoint: dict) -> list[dict]:
    """Return the QAT swap records stored in a Lightning checkpoint by :class:`QuantizationAwareTraining`."""
    return [state[RECORD_KEY] for state in _find_qat_states(checkpoint)]


def restore_qat_layers(model: nn.Module, checkpoint: dict) -> None:
    """Replay the QAT swaps recorded in ``checkpoint`` on ``model`` before its weights load.

    A checkpoint written before the callback's ``start_step`` restores its layers with fake
    quantization off, as they were trained. Call it from a LightningModule's ``on_load_checkpoint``
    so that ``YourModule.load_from_checkpoint(path)`` rebuilds the QAT modules first.
    """
    for state in _find_qat_states(checkpoint):
        modules = apply_qat_record(model, state[RECORD_KEY])
        # Checkpoints without the key come from versions without a delayed start, so fake quantization was on.
        set_fake_quantization(modules, state.get(STARTED_KEY, True))


def load_qat_checkpoint(
    cls: type[L.LightningModule], checkpoint_path: str | Path, map_location: Any = "cpu", **kwargs: Any
) -> L.LightningModule:
    """Load a checkpoint written during QAT into a fresh instance of ``cls``, QAT modules included.

    The model is built from the checkpoint's saved hyperparameters, updated by ``kwargs``; the
    recorded swaps are replayed and the state dict is loaded strictly.

    Example:
        ``model = load_qat_checkpoint(DigitsCNN, "last.ckpt")``
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    hyperparameters = dict(checkpoint.get("hyper_parameters", {}))
    hyperparameters.pop("_instantiator", None)
    hyperparameters.pop("_class_path", None)
    model = cls(**{**hyperparameters, **kwargs})
    restore_qat_layers(model, checkpoint)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model


class QuantizationAwareTraining(Callback):
    """Train with fake-quantized weights and activations, ready for conversion to int8.

    In ``setup`` the selected layers are swapped for QAT modules (parameter names unchanged), so
    the swap precedes the restore of a checkpoint by ``fit``/``validate``/``test`` with
    ``ckpt_path``. The swap record is saved in the callback's state; :func:`load_qat_checkpoint`
    uses it to load such a checkpoint into a fresh model.

    Before ``start_step`` the QAT modules compute exactly what the float layers compute: fake
    quantization and observers are both off, so a float model can train first and be fine-tuned
    with QAT in the same fit. From ``start_step`` fake quantization is on, and observers update on
    training batches only, until ``freeze_observer_step``. BatchNorm layers folded into
    convolutions switch to their running statistics from ``freeze_bn_step``. All three count
    ``trainer.global_step``, the same on every DDP rank. Whether fake quantization is on is saved in
    the callback's state, so a resume on either side of the start step continues exactly.

    Args:
        include: Patterns of layer names to quantize (all layers of ``types`` when ``None``).
        exclude: Patterns of layer names to keep in float.
        types: Module types to quantize: ``"Linear"``, ``"Conv2d"``, ``"Embedding"``.
        exclude_head: Keep the last Linear layer (the output head) in float.
        weight_bits: 8, or 4 with ``activation="none"``.
        per_channel: One weight scale per output channel; otherwise one per tensor.
        activation: ``"static"``, ``"dynamic"`` (Linear layers) or ``"none"``.
        activation_bits: 8, or 16 (int16 activations).
        activation_signed: int8 activations instead of uint8.
        observer: ``"minmax"``, ``"moving_average"`` or ``"percentile"``.
        momentum: Weight of the newest batch in the moving averages.
        percentile: Upper percentile of the percentile observer.
        learn_scale: Train the scales by LSQ (learned step size).
        fold_bn: Fold BatchNorm2d layers that directly follow a quantized Conv2d.
        start_step: Optimizer step from which fake quantization and observers are on.
        start_epoch: Epoch from which they are on, instead of ``start_step``. It is converted to
            ``start_epoch`` times the optimizer steps per epoch when training starts.
        start_lr_scale: Factor that multiplies every optimizer's learning rates (and the
            ``base_lrs`` of their schedulers) once, at the start step, to fine-tune with QAT at a
            lower rate than the float phase. ``1.0`` leaves them alone.
        freeze_bn_step: Optimizer step from which folded BatchNorms use running statistics; not
            before the start step.
        freeze_observer_step: Optimizer step from which the activation ranges stay fixed; not before
            the start step.
        convert_on_fit_end: Replace the QAT modules by int8 deploy modules when fit ends.
        strict: Raise when a pattern matches no layer, instead of warning.

    Example:
        >>> callback = QuantizationAwareTraining(freeze_observer_step=200, exclude_head=True)
        >>> finetune = QuantizationAwareTraining(start_step=190, freeze_bn_step=237, freeze_observer_step=261)
    """

    def __init__(
        self,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: str | list[str] = ("Linear", "Conv2d"),
        exclude_head: bool = False,
        weight_bits: int = 8,
        per_channel: bool = True,
        activation: str = "static",
        activation_bits: int = 8,
        activation_signed: bool = False,
        observer: str = "moving_average",
        momentum: float = 0.01,
        percentile: float = 99.99,
        learn_scale: bool = False,
        fold_bn: bool = True,
        start_step: int = 0,
        start_epoch: int | None = None,
        start_lr_scale: float = 1.0,
        freeze_bn_step: int | None = None,
        freeze_observer_step: int | None = None,
        convert_on_fit_end: bool = False,
        strict: bool = True,
    ) -> None:
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        classes = validate_types("types", types)
        self.types = [cls.__name__ for cls in classes]
        unsupported = [name for name in self.types if name not in QAT_TYPES]
        if unsupported:
            raise ValueError(
                f"types: expected names from {list(QAT_TYPES)}, but got unsupported {unsupported}"
            )
        self.config = QATConfig(
            weight_bits=weight_bits,
            per_channel=per_channel,
            activation=activation,
            activation_bits=activation_bits,
            activation_signed=activation_signed,
            observer=observer,
            momentum=momentum,
            percentile=percentile,
            learn_scale=learn_scale,
        )

        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step: expected an integer >= 0, but got {start_step!r}")
        for argument, value in (
            ("start_epoch", start_epoch),
            ("freeze_bn_step", freeze_bn_step),
            ("freeze_observer_step", freeze_observer_step),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{argument}: expected None or an integer >= 0, but got {value!r}")
        if (
            isinstance(start_lr_scale, bool)
            or not isinstance(start_lr_scale, (int, float))
            or start_lr_scale <= 0
        ):
            raise ValueError(f"start_lr_scale: expected a number > 0, but got {start_lr_scale!r}")
        if start_epoch is not None and start_step != 0:
            raise ValueError(
                f"start_epoch: expected start_step=0 when start_epoch is set, but got "
                f"start_step={start_step} and start_epoch={start_epoch}; set only one of them"
            )

        self.exclude_head = exclude_head
        self.fold_bn = fold_bn
        self.start_step = start_step
        self.start_epoch = start_epoch
        self.start_lr_scale = float(start_lr_scale)
        self.freeze_bn_step = freeze_bn_step
        self.freeze_observer_step = freeze_observer_step
        self._check_freeze_steps(start_step)
        self.convert_on_fit_end = convert_on_fit_end
        self.strict = strict
        self.record: dict | None = None
        self._restored_record: dict | None = None
        # The start as an optimizer step; start_epoch is converted when training starts.
        self._start_step: int | None = start_step if start_epoch is None else None
        self._started = self._start_step == 0 or start_epoch == 0

    def _check_freeze_steps(self, start_step: int) -> None:
        for argument, value in (
            ("freeze_bn_step", self.freeze_bn_step),
            ("freeze_observer_step", self.freeze_observer_step),
        ):
            if value is not None and value < start_step:
                raise ValueError(
                    f"{argument}: expected a step >= the start step {start_step}, because nothing can "
                    f"freeze before fake quantization starts, but got {value}"
                )

    def _set_started(self, pl_module: L.LightningModule, started: bool) -> None:
        self._started = started
        set_fake_quantization(qat_layers(pl_module), started)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            include=self.include, exclude=self.exclude, types=self.types, config=self.config.to_dict()
        )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Layer names are the student's own when pl_module is a DistillationModule.
        model = compression_target(pl_module)
        if self.record is not None and qat_layers(model):
            # A second fit with the same callback: the model was swapped already.
            apply_qat_record(model, self.record)
        else:
            self.record = prepare_qat(
                model,
                self.config,
                include=self.include or None,
                exclude=self.exclude or None,
                types=self.types,
                exclude_head=self.exclude_head,
                fold_bn=self.fold_bn,
                strict=self.strict,
            )
        set_observers(pl_module, False)
        self._set_started(pl_module, self._started)
        layers = [f"{name} [{entry['kind']}]" for name, entry in self.record["layers"].items()]
        start = f"step {self._start_step}" if self.start_epoch is None else f"epoch {self.start_epoch}"
        rank_zero_info(
            f"QuantizationAwareTraining: {len(layers)} layers fake quantized from {start}: "
            + ", ".join(layers)
        )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A checkpoint's state is loaded after setup, so apply it to the modules here.
        self._set_started(pl_module, self._started)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_started(pl_module, self._started)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_started(pl_module, self._started)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_started(pl_module, self._started)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start_epoch is None or self._start_step is not None:
            return
        batches = trainer.num_training_batches
        if math.isinf(batches):
            raise ValueError(
                f"start_epoch={self.start_epoch}: expected a train dataloader with a length, to convert "
                "epochs to optimizer steps, but got one without; use start_step instead"
            )
        # NOTE: this assumes automatic optimization, where each epoch ends with an optimizer step.
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        self._start_step = self.start_epoch * steps_per_epoch
        self._check_freeze_steps(self._start_step)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        started = step >= self._start_step
        if started and not self._started:
            rank_zero_info(f"QuantizationAwareTraining: fake quantization and observers start at step {step}")
            if self.start_lr_scale != 1.0:
                _scale_learning_rates(trainer, self.start_lr_scale)
        self._set_started(pl_module, started)
        observing = started and (self.freeze_observer_step is None or step < self.freeze_observer_step)
        set_observers(pl_module, observing)
        if self.freeze_bn_step is not None and step >= self.freeze_bn_step:
            for module in qat_layers(pl_module).values():
                if isinstance(module, QATConvBn2d):
                    module.bn.eval()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        set_observers(pl_module, False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_observers(pl_module, False)
        if not self._started:
            rank_zero_warn(
                f"QuantizationAwareTraining: fit ended at step {trainer.global_step}, before the start step "
                f"{self._start_step}, so the model was trained without fake quantization"
            )
        rows = []
        for name, module in qat_layers(compression_target(pl_module)).items():
            quant = module.input_fake_quant
            scale, zero_point = (
                quant.qparams() if quant is not None and quant.mode == "static" else (None, None)
            )
            rows.append((name, type(module).__name__, module.config.weight_bits, scale, zero_point))
            if trainer.logger is not None and scale is not None and trainer.is_global_zero:
                trainer.logger.log_metrics({f"qat/{name}/input_scale": scale}, step=trainer.global_step)
        rank_zero_info("QuantizationAwareTraining summary\n" + _format_table(rows))
        if self.convert_on_fit_end:
            from lightning_weightlight.quantization.convert import convert

            convert(pl_module, inplace=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {RECORD_KEY: self.record, STARTED_KEY: self._started, START_STEP_KEY: self._start_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = state_dict.get(RECORD_KEY)
        if restored is not None and self.record is not None and restored != self.record:
            raise ValueError(
                "QuantizationAwareTraining: the checkpoint's QAT layers "
                f"{sorted(restored['layers'])} (config {restored['config']}) differ from this callback's "
                f"{sorted(self.record['layers'])} (config {self.record['config']}); use the same arguments"
            )
        self._restored_record = restored
        self._started = state_dict.get(STARTED_KEY, True)
        if self.start_epoch is not None and state_dict.get(START_STEP_KEY) is not None:
            # Keep the step that start_epoch became in the interrupted run, whatever the data now.
            self._start_step = state_dict[START_STEP_KEY]


def _scale_learning_rates(trainer: L.Trainer, factor: float) -> None:
    """Multiply the learning rates of every optimizer and the ``base_lrs`` of its schedulers by ``factor``."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
    # NOTE: a scheduler that computes its rate from other saved values (OneCycleLR's max_lr, for
    # one) overwrites the scaled rate at its next step.
    for config in trainer.lr_scheduler_configs:
        if hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs = [rate * factor for rate in config.scheduler.base_lrs]
    rank_zero_info(f"QuantizationAwareTraining: learning rates multiplied by {factor} for QAT")


def _format_table(rows: list[tuple]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=["layer", "module", "weight bits", "input scale", "zero point"])
