"""QAT modules: drop-in subclasses of ``Linear``, ``Conv2d`` and ``Embedding`` that fake quantize.

Each QAT module shares the original module's ``Parameter`` objects, so parameter names, optimizer
references and masks kept by other callbacks stay valid. It adds only fake-quantization
submodules (observer buffers and, with LSQ, scale parameters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_weightlight.quantization.fake_quant import (
    ACTIVATION_BITS,
    OBSERVERS,
    WEIGHT_BITS,
    ActivationFakeQuantize,
    WeightFakeQuantize,
    check_choice,
)


@dataclass(frozen=True)
class QATConfig:
    """Quantization settings of a QAT module, as plain values that checkpoints can store.

    Args:
        weight_bits: 8, or 4 (4-bit weights convert to weight-only deploy modules).
        per_channel: Symmetric weight scale per output channel; otherwise one per tensor.
        activation: ``"static"`` (observed range, per tensor), ``"dynamic"`` (per row at run time,
            Linear layers only) or ``"none"`` (weight-only quantization).
        activation_bits: 8, or 16 for int16 activations (the 16x8 mode).
        activation_signed: int8 instead of uint8 activations (8-bit only).
        observer: ``"minmax"``, ``"moving_average"`` or ``"percentile"``.
        momentum: Weight of the newest batch in the moving-average and percentile observers.
        percentile: Upper percentile of the percentile observer.
        learn_scale: Train weight and activation scales by LSQ.
    """

    weight_bits: int = 8
    per_channel: bool = True
    activation: str = "static"
    activation_bits: int = 8
    activation_signed: bool = False
    observer: str = "moving_average"
    momentum: float = 0.01
    percentile: float = 99.99
    learn_scale: bool = False

    def __post_init__(self) -> None:
        check_choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        check_choice("activation", self.activation, ("static", "dynamic", "none"))
        check_choice("activation_bits", self.activation_bits, ACTIVATION_BITS)
        check_choice("observer", self.observer, OBSERVERS)
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum: expected a value in (0, 1], but got {self.momentum}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (50, 100], but got {self.percentile}")
        if self.activation == "dynamic" and (self.activation_bits != 8 or self.activation_signed):
            raise ValueError(
                "activation='dynamic': expected activation_bits=8 and activation_signed=False, "
                f"but got activation_bits={self.activation_bits}, activation_signed={self.activation_signed}"
            )
        if self.activation == "dynamic" and self.learn_scale:
            raise ValueError("learn_scale: expected False with activation='dynamic', but got True")
        if self.weight_bits == 4 and self.activation != "none":
            raise ValueError(
                "weight_bits=4: 4-bit weights are supported for weight-only quantization; expected "
                f"activation='none', but got activation={self.activation!r}"
            )

    def to_dict(self) -> dict:
        """Return the fields as a plain dict."""
        return asdict(self)


def _make_activation_quant(config: QATConfig, name: str) -> ActivationFakeQuantize | None:
    if config.activation == "none":
        return None
    return ActivationFakeQuantize(
        mode=config.activation,
        bits=config.activation_bits,
        signed=config.activation_signed,
        observer=config.observer,
        momentum=config.momentum,
        percentile=config.percentile,
        learn_scale=config.learn_scale,
        name=name,
    )


def _share_parameters(target: nn.Module, source: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        setattr(target, name, getattr(source, name))


class _QATMixin:
    """Shared parts of the QAT modules: the config, the two quantizers and a switch for both."""

    config: QATConfig
    input_fake_quant: ActivationFakeQuantize | None
    weight_fake_quant: WeightFakeQuantize

    def _init_quantizers(self, config: QATConfig, name: str, out_channels: int, device) -> None:
        self.config = config
        self.layer_name = name
        self.input_fake_quant = _make_activation_quant(config, name)
        self.weight_fake_quant = WeightFakeQuantize(
            out_channels,
            bits=config.weight_bits,
            per_channel=config.per_channel,
            learn_scale=config.learn_scale,
        )
        self.input_fake_quant = self.input_fake_quant.to(device) if self.input_fake_quant else None
        self.weight_fake_quant = self.weight_fake_quant.to(device)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_fake_quant(x) if self.input_fake_quant is not None else x

    def deploy_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the float weight and bias that the deploy module quantizes (folded for Conv+BN)."""
        return self.weight.detach(), None if self.bias is None else self.bias.detach()

    def deploy_weight_scale(self) -> torch.Tensor:
        """Return the ``(out,)`` weight scale that training used, for the conversion."""
        weight, _ = self.deploy_weight()
        return self.weight_fake_quant.current_scale(weight)


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` that fake quantizes its input and weight; ``weight`` and ``bias`` keep their names."""

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QATConfig, name: str = "") -> QATLinear:
        """Wrap ``linear``'s parameters (the same ``Parameter`` objects) in a QAT module."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        _share_parameters(module, linear, ("weight", "bias"))
        module._init_quantizers(config, name, linear.out_features, linear.weight.device)
        module.train(linear.training)
        return module

    def to_float(self) -> nn.Linear:
        """Return a plain ``nn.Linear`` sharing this module's parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        _share_parameters(linear, self, ("weight", "bias"))
        return linear.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight_fake_quant(self.weight), self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    """``nn.Conv2d`` that fake quantizes its input and weight."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QATConfig, name: str = "") -> QATConv2d:
        """Wrap ``conv``'s parameters (the same ``Parameter`` objects) in a QAT module."""
        module = cls(**_conv_arguments(conv), device="meta")
        _share_parameters(module, conv, ("weight", "bias"))
        module._init_quantizers(config, name, conv.out_channels, conv.weight.device)
        module.train(conv.training)
        return module

    def to_float(self) -> nn.Conv2d:
        """Return a plain ``nn.Conv2d`` sharing this module's parameters."""
        conv = nn.Conv2d(**_conv_arguments(self), device="meta")
        _share_parameters(conv, self, ("weight", "bias"))
        return conv.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.weight_fake_quant(self.weight), self.bias)


def _conv_arguments(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def bn_fold_factor(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Return ``gamma / sqrt(running_var + eps)``, the per-channel factor that folds ``bn`` into a conv."""
    std = torch.sqrt(bn.running_var + bn.eps)
    return bn.weight / std if bn.weight is not None else 1.0 / std


def fold_conv_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference-mode BatchNorm into the preceding convolution's weight and bias.

    ``weight * factor`` and ``beta + (bias - running_mean) * factor`` with
    ``factor = gamma / sqrt(running_var + eps)``; a zero weight stays exactly zero.
    """
    factor = bn_fold_factor(bn)
    folded_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    conv_bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return folded_weight, beta + (conv_bias - bn.running_mean) * factor


class QATConvBn2d(QATConv2d):
    """``Conv2d`` followed by a ``BatchNorm2d`` that it folds for fake quantization.

    The BatchNorm stays where it is in the user's model (its parameters and running statistics
    keep their names) and still normalises this module's output. This module fake quantizes the
    weight folded with the running statistics, then divides the folding factor back out, so that
    the BatchNorm applied afterwards gives the folded, quantized convolution in inference mode.
    In training mode the BatchNorm normalises with batch statistics and updates its running
    statistics, until the QAT callback freezes it.
    """

    @classmethod
    def from_float(  # type: ignore[override]
        cls, conv: nn.Conv2d, config: QATConfig, name: str = "", bn: nn.BatchNorm2d | None = None
    ) -> QATConvBn2d:
        if bn is None:
            raise TypeError(f"QATConvBn2d.from_float: expected the BatchNorm2d after {name!r}, but got None")
        module = super().from_float(conv, config, name)
        # Not registered as a submodule, so the BatchNorm's state_dict keys stay with its parent.
        object.__setattr__(module, "bn", bn)
        return module

    def deploy_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return fold_conv_bn(self.weight, self.bias, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight_fake_quant.fake_quant_enabled:
            # Before QAT starts the module must compute exactly what the float convolution computes.
            return self._conv_forward(self.quantize_input(x), self.weight, self.bias)
        factor = bn_fold_factor(self.bn)
        folded = self.weight * factor.reshape(-1, 1, 1, 1)
        output = self._conv_forward(self.quantize_input(x), self.weight_fake_quant(folded), None)
        # A channel with gamma = 0 has an all-zero folded weight; dividing by 1 keeps it finite.
        safe_factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        output = output / safe_factor.reshape(1, -1, 1, 1)
        if self.bias is not None:
            output = output + self.bias.reshape(1, -1, 1, 1)
        return output


class QATEmbedding(_QATMixin, nn.Embedding):
    """``nn.Embedding`` whose table is fake quantized per row (weight-only; lookups need no activations)."""

    @classmethod
    def from_float(cls, embedding: nn.Embedding, config: QATConfig, name: str = "") -> QATEmbedding:
        """Wrap ``embedding``'s table (the same ``Parameter``) in a QAT module."""
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            device="meta",
        )
        _share_parameters(module, embedding, ("weight",))
        weight_only = QATConfig(**{**config.to_dict(), "activation": "none"})
        module._init_quantizers(weight_only, name, embedding.num_embeddings, embedding.weight.device)
        module.bias = None
        module.train(embedding.training)
        return module

    def to_float(self) -> nn.Embedding:
        """Return a plain ``nn.Embedding`` sharing this module's table."""
        embedding = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
            device="meta",
        )
        _share_parameters(embedding, self, ("weight",))
        return embedding.train(self.training)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            indices,
            self.weight_fake_quant(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


QAT_MODULES = (QATLinear, QATConv2d, QATEmbedding)
"""Base classes of every QAT module (``QATConvBn2d`` is a ``QATConv2d``)."""


def qat_layers(model: nn.Module) -> dict[str, _QATMixin]:
    """Return the QAT modules of ``model`` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QAT_MODULES)}
