"""Deploy modules that replace ``nn.Conv2d``: im2col (``F.unfold``) over the Linear kernels.

The weight ``(out_channels, in_channels, kh, kw)`` is stored as the 2-D matrix
``(out_channels, in_channels * kh * kw)`` of the matching Linear module, in ``F.unfold`` order.
Supported: any kernel size, stride, dilation and zero padding (ints, pairs or ``"valid"``,
and ``"same"`` when the padding is symmetric). ``groups > 1`` and other padding modes are rejected.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_weightlight.kernels.linear import (
    Int8Linear,
    SparseInt8Linear,
    SparseLinear,
    _input_quantization,
    _quantize_weight,
)

__all__ = ["Int8Conv2d", "SparseConv2d", "SparseInt8Conv2d"]


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
        raise ValueError(f"{name}: expected a non-negative int or a pair of them, but got {value!r}")
    return pair


def _conv_geometry(conv: nn.Module, method: str) -> dict[str, Any]:
    """Check that a convolution is supported and return its constructor arguments."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{method}: expected an nn.Conv2d, but got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"{method}: expected a convolution with groups=1, but got groups={conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{method}: expected padding_mode='zeros', but got {conv.padding_mode!r}")
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same"
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(total % 2 for total in totals):
                raise ValueError(
                    f"{method}: padding='same' needs asymmetric padding for kernel_size={conv.kernel_size} "
                    f"and dilation={conv.dilation}, which is not supported; pad the input explicitly"
                )
            padding = tuple(total // 2 for total in totals)
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(padding),
        "dilation": list(conv.dilation),
        "bias": conv.bias is not None,
    }


class _Conv2dAdapter:
    """Convolution geometry and the im2col forward around a deploy Linear module."""

    def _init_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(
                f"stride and dilation: expected values >= 1, but got {self.stride} and {self.dilation}"
            )
        # A 1x1 convolution with unit stride and no padding needs no unfold.
        self._pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def _geometry_config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }

    def extra_config(self) -> dict[str, Any]:
        config = super().extra_config()
        del config["in_features"], config["out_features"]
        return {**self._geometry_config(), **config}

    def to_float(self) -> nn.Conv2d:
        """Return an equivalent ``nn.Conv2d`` with the dequantized (and zero-filled) weight."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight().reshape(conv.weight.shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected a 4-D input (N, C, H, W) with C = in_channels = "
                f"{self.in_channels}, but got shape {tuple(x.shape)}"
            )
        if x.dtype != torch.float32:  # F.unfold below would fail first, with a message about im2col
            raise TypeError(
                f"{type(self).__name__}: expected a float32 input, but got {x.dtype}; "
                "convert it with .float()"
            )
        batch, _, height, width = x.shape
        out_h = (
            height + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1
        ) // self.stride[0] + 1
        out_w = (
            width + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1
        ) // self.stride[1] + 1
        if out_h < 1 or out_w < 1:
            extent_h = self.dilation[0] * (self.kernel_size[0] - 1) + 1
            extent_w = self.dilation[1] * (self.kernel_size[1] - 1) + 1
            raise ValueError(
                f"{type(self).__name__}: expected an input of at least the kernel's extent "
                f"{extent_h}x{extent_w} after padding {self.padding}, but got height x width {height}x{width}"
            )
        if self._pointwise:
            columns = x.flatten(2)
        else:
            columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out = super().forward(columns.transpose(1, 2))
        return out.transpose(1, 2).reshape(batch, self.out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, kernel={self.kernel}, "
            f"pattern={self.pattern}, sparsity={self.sparsity:.3f}"
        )


def _features(in_channels: int, kernel_size) -> int:
    kh, kw = _pair(kernel_size, "kernel_size")
    return in_channels * kh * kw


def _as_linear(conv: nn.Conv2d) -> nn.Linear:
    """Return an ``nn.Linear`` view of a convolution's weight and bias, sharing no storage."""
    in_features = math.prod(conv.weight.shape[1:])
    linear = nn.Linear(in_features, conv.out_channels, bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.detach().reshape(conv.out_channels, in_features))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias.detach())
    return linear


class Int8Conv2d(_Conv2dAdapter, Int8Linear):
    """``nn.Conv2d`` with per-channel int8 weights and uint8 activations; see :class:`Int8Linear`.

    Example:
        >>> layer = Int8Conv2d.from_float(nn.Conv2d(3, 8, 3, padding=1))
        >>> layer(torch.randn(2, 3, 10, 10)).shape
        torch.Size([2, 8, 10, 10])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        static_input: bool = False,
    ) -> None:
        Int8Linear.__init__(self, _features(in_channels, kernel_size), out_channels, bias, static_input)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        weight_scale: torch.Tensor | None = None,
        input_scale: float | None = None,
        input_zero_point: int | None = None,
    ) -> Int8Conv2d:
        """Quantize an ``nn.Conv2d``; the arguments are those of :meth:`Int8Linear.from_float`."""
        geometry = _conv_geometry(conv, "Int8Conv2d.from_float")
        params = _input_quantization(input_scale, input_zero_point)
        module = cls(**geometry, static_input=params is not None)
        linear = _as_linear(conv)
        q_weight, scale = _quantize_weight(linear.weight, weight_scale)
        module._load_quantized(q_weight, scale, linear.bias, params)
        return module


class SparseConv2d(_Conv2dAdapter, SparseLinear):
    """``nn.Conv2d`` with a block-sparse float32 weight; see :class:`SparseLinear`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        block: str = "unstructured",
        num_blocks: int = 0,
    ) -> None:
        SparseLinear.__init__(
            self, _features(in_channels, kernel_size), out_channels, bias, block, num_blocks
        )
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, block: str | None = None) -> SparseConv2d:
        """Compress an ``nn.Conv2d`` whose weight already contains its zeros, like ``SparseLinear``."""
        geometry = _conv_geometry(conv, "SparseConv2d.from_dense")
        linear_module = SparseLinear.from_dense(_as_linear(conv), block=block)
        module = cls(**geometry, block=linear_module.block, num_blocks=linear_module.col_idx.numel())
        module.load_state_dict(linear_module.state_dict())
        return module


class SparseInt8Conv2d(_Conv2dAdapter, SparseInt8Linear):
    """``nn.Conv2d`` with a sparse int8 weight in groups of 4 inputs; see :class:`SparseInt8Linear`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        num_groups: int = 0,
        static_input: bool = False,
    ) -> None:
        SparseInt8Linear.__init__(
            self, _features(in_channels, kernel_size), out_channels, bias, num_groups, static_input
        )
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        weight_scale: torch.Tensor | None = None,
        input_scale: float | None = None,
        input_zero_point: int | None = None,
    ) -> SparseInt8Conv2d:
        """Quantize and compress an ``nn.Conv2d``; see :meth:`SparseInt8Linear.from_float`."""
        geometry = _conv_geometry(conv, "SparseInt8Conv2d.from_float")
        linear_module = SparseInt8Linear.from_float(
            _as_linear(conv),
            weight_scale=weight_scale,
            input_scale=input_scale,
            input_zero_point=input_zero_point,
        )
        module = cls(
            **geometry, num_groups=linear_module.group_idx.numel(), static_input=linear_module.static_input
        )
        module.load_state_dict(linear_module.state_dict())
        return module
