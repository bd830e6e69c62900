"""Deploy modules for the modes that the int8 kernels do not cover: float16, weight-only, int16x8.

They run in plain PyTorch. Weight-only and float16 modules store the compressed weight and
dequantize it at each call (the memory saving is real, the compute is float32). The int16x8
modules quantize their input to int16 with a static symmetric scale, multiply with int8 weights
and accumulate exactly (float64 represents every integer sum below 2**53 exactly), then scale back as
``acc * (x_scale * w_scale) + bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_weightlight._checks import is_int, is_int_list
from lightning_weightlight.kernels.linear import _check_integer_values, _first_invalid_scale, _naming_layer
from lightning_weightlight.kernels.reference import integer_range, quantize_affine
from lightning_weightlight.quantization.fake_quant import weight_scale


def quantize_weight(
    weight: torch.Tensor, bits: int = 8, scale: torch.Tensor | None = None, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` symmetrically per output channel: ``(int8 values, float32 scales (out,))``.

    With ``scale=None`` the scale is ``max|w| / qmax``, as in ``reference.quantize_weight_per_channel``.
    4-bit values are stored one per int8 element.
    """
    qmin, qmax = integer_range(bits, signed=True)
    if scale is None:
        scale = weight_scale(weight, bits, per_channel)
    view = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.detach().float() / scale.view(view)), qmin, qmax)
    return q.to(torch.int8), scale.detach().float().clone()


def describe_layer(module: nn.Module) -> dict:
    """Return the JSON-serialisable geometry of a Linear, Conv2d or Embedding: what a deploy module needs."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode: expected 'zeros' for a quantized Conv2d, but got {module.padding_mode!r}"
            )
        if isinstance(module.padding, str):
            raise ValueError(f"padding: expected integers for a quantized Conv2d, but got {module.padding!r}")
        options = {
            "stride": list(module.stride),
            "padding": list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
        }
        return {
            "kind": "conv2d",
            "weight_shape": list(module.weight.shape),
            "bias": module.bias is not None,
            **options,
        }
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(f"max_norm: expected None for a quantized Embedding, but got {module.max_norm}")
        return {
            "kind": "embedding",
            "weight_shape": list(module.weight.shape),
            "bias": False,
            "padding_idx": module.padding_idx,
        }
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "weight_shape": list(module.weight.shape), "bias": module.bias is not None}
    raise TypeError(f"expected a Linear, Conv2d or Embedding module, but got {type(module).__name__}")


def _check_loaded_values(module: nn.Module, state_dict, prefix, *args) -> None:
    """Reject loaded scales that are not positive and finite, and int4 weights outside [-8, 7]."""
    with _naming_layer(prefix):
        for name in ("weight_scale", "input_scale"):
            value = state_dict.get(prefix + name)
            buffer = module._buffers.get(name)
            if not isinstance(value, torch.Tensor) or buffer is None:
                continue
            value = value.detach().to(buffer.dtype).reshape(-1)  # as the buffer holds it: 1e300 is inf
            index = _first_invalid_scale(value)
            if index is not None:
                bad = value[index].item()
                raise ValueError(
                    f"{type(module).__name__}: expected positive finite values in {name}, but "
                    f"{name}[{index}] is {bad}"
                )
        q_weight = state_dict.get(prefix + "q_weight")
        bits = getattr(module, "bits", 8)
        if isinstance(q_weight, torch.Tensor) and bits < 8:
            low, high = integer_range(bits, signed=True)
            outside = (q_weight < low) | (q_weight > high)
            if bool(outside.any()):
                bad = q_weight[outside].flatten()[0].item()
                raise ValueError(
                    f"{type(module).__name__}: q_weight contains {bad!r}, outside the int{bits} range "
                    f"[{low}, {high}]; quantize the weight with bits={bits}"
                )


class _LayerForward(nn.Module):
    """Hold what a Linear, Conv2d or Embedding call needs besides its weight.

    The constructor takes only plain values (see :func:`describe_layer`), so ``extra_config``
    and ``from_config`` rebuild an empty module of the same shapes for ``load_state_dict``.
    """

    def __init__(
        self,
        kind: str,
        weight_shape: list[int],
        bias: bool,
        stride: list[int] | None = None,
        padding: list[int] | None = None,
        dilation: list[int] | None = None,
        groups: int = 1,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("linear", "conv2d", "embedding"):
            raise ValueError(f"kind: expected 'linear', 'conv2d' or 'embedding', but got {kind!r}")
        dims = 4 if kind == "conv2d" else 2
        if not is_int_list(weight_shape, 0, dims):
            raise ValueError(
                f"weight_shape: expected {dims} ints >= 0 for a {kind} weight, but got {weight_shape!r}"
            )
        for name, value, minimum in (
            ("stride", stride, 1),
            ("padding", padding, 0),
            ("dilation", dilation, 1),
        ):
            if value is not None and not is_int_list(value, minimum, 2):
                raise ValueError(f"{name}: expected 2 ints >= {minimum}, but got {value!r}")
        if not is_int(groups, 1):
            raise ValueError(f"groups: expected a positive int, but got {groups!r}")
        if padding_idx is not None and not (
            is_int(padding_idx, -weight_shape[0]) and padding_idx < weight_shape[0]
        ):
            rows = weight_shape[0]
            raise ValueError(
                f"padding_idx: expected None or an int in [-{rows}, {rows}), but got {padding_idx!r}"
            )
        self.kind = kind
        self.weight_shape = list(weight_shape)
        self.has_bias = bool(bias)
        self.conv_options = {
            "stride": tuple(stride or (1, 1)),
            "padding": tuple(padding or (0, 0)),
            "dilation": tuple(dilation or (1, 1)),
            "groups": groups,
        }
        self.padding_idx = padding_idx
        self.register_buffer("bias", torch.zeros(weight_shape[0]) if bias else None)
        self.register_load_state_dict_pre_hook(_check_integer_values)
        self.register_load_state_dict_pre_hook(_check_loaded_values)

    def extra_config(self) -> dict:
        """Return the constructor arguments, JSON-serialisable."""
        config = {"kind": self.kind, "weight_shape": self.weight_shape, "bias": self.has_bias}
        if self.kind == "conv2d":
            config.update(
                {
                    key: list(value) if isinstance(value, tuple) else value
                    for key, value in self.conv_options.items()
                }
            )
        if self.kind == "embedding":
            config["padding_idx"] = self.padding_idx
        return config

    @classmethod
    def from_config(cls, config: dict):
        """Build an empty module from :meth:`extra_config`; load a ``state_dict`` into it."""
        return cls(**config)

    def _load_bias(self, module: nn.Module) -> None:
        bias = getattr(module, "bias", None)
        if self.bias is not None:
            self.bias.copy_(bias.detach().float())

    def _call(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv2d":
            return F.conv2d(x, weight, bias, **self.conv_options)
        return F.embedding(x, weight, self.padding_idx)


class WeightOnlyQuantized(_LayerForward):
    """A Linear, Conv2d or Embedding with int8 or int4 weights per output channel and float activations.

    Example:
        >>> layer = WeightOnlyQuantized.from_float(nn.Linear(4, 3), bits=4)
        >>> layer(torch.ones(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, kind: str, weight_shape: list[int], bias: bool, bits: int = 8, **geometry) -> None:
        super().__init__(kind, weight_shape, bias, **geometry)
        if bits not in (4, 8):
            raise ValueError(f"bits: expected 4 or 8, but got {bits!r}")
        self.bits = bits
        self.register_buffer("q_weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight_shape[0]))

    def extra_config(self) -> dict:
        return {**super().extra_config(), "bits": self.bits}

    @classmethod
    @torch.no_grad()
    def from_float(
        cls,
        module: nn.Module,
        bits: int = 8,
        weight_scale: torch.Tensor | None = None,
        per_channel: bool = True,
    ) -> WeightOnlyQuantized:
        """Quantize ``module``'s weight (with ``weight_scale`` when given, else ``max|w| / qmax``)."""
        layer = cls(**describe_layer(module), bits=bits)
        q_weight, scale = quantize_weight(module.weight, bits, weight_scale, per_channel)
        layer.q_weight.copy_(q_weight)
        layer.weight_scale.copy_(scale)
        layer._load_bias(module)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """Return ``q * scale`` in float32, the weight this module computes with."""
        view = (-1,) + (1,) * (self.q_weight.dim() - 1)
        return self.q_weight.float() * self.weight_scale.view(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, bits={self.bits}, weight={tuple(self.q_weight.shape)}"


class Float16Weight(_LayerForward):
    """A Linear, Conv2d or Embedding whose weight and bias are stored in float16, computed in float32."""

    def __init__(self, kind: str, weight_shape: list[int], bias: bool, **geometry) -> None:
        super().__init__(kind, weight_shape, bias, **geometry)
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.float16))
        if self.bias is not None:
            self.bias = self.bias.half()

    @classmethod
    @torch.no_grad()
    def from_float(cls, module: nn.Module) -> Float16Weight:
        """Round ``module``'s weight and bias to float16."""
        layer = cls(**describe_layer(module))
        layer.weight.copy_(module.weight.detach().half())
        layer._load_bias(module)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return self._call(x, self.weight.float(), bias)


class Int16x8(_LayerForward):
    """A Linear or Conv2d with int16 inputs (static, symmetric per tensor) and int8 weights per channel.

    This is TensorFlow Lite's 16x8 scheme. Integer products accumulate exactly.
    """

    def __init__(self, kind: str, weight_shape: list[int], bias: bool, **geometry) -> None:
        super().__init__(kind, weight_shape, bias, **geometry)
        if kind == "embedding":
            raise TypeError("Int16x8: expected a Linear or Conv2d module, but got Embedding")
        self.register_buffer("q_weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight_shape[0]))
        self.register_buffer("input_scale", torch.tensor(1.0))

    @classmethod
    @torch.no_grad()
    def from_float(
        cls, module: nn.Module, *, input_scale: float, weight_scale: torch.Tensor | None = None
    ) -> Int16x8:
        """Quantize ``module``'s weight to int8 and fix the int16 input scale."""
        if not input_scale > 0:
            raise ValueError(f"input_scale: expected a positive float, but got {input_scale!r}")
        layer = cls(**describe_layer(module))
        q_weight, scale = quantize_weight(module.weight, 8, weight_scale)
        layer.q_weight.copy_(q_weight)
        layer.weight_scale.copy_(scale)
        layer.input_scale.fill_(float(input_scale))
        layer._load_bias(module)
        return layer

    def accumulators(self, x: torch.Tensor) -> torch.Tensor:
        """Return the exact integer accumulators (held in float64) for input ``x``."""
        qmin, qmax = integer_range(16, signed=True)
        q_x = quantize_affine(x.float(), self.input_scale.expand(x.shape), torch.tensor(0.0), qmin, qmax)
        return self._call(q_x.double(), self.q_weight.double(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.accumulators(x).float()
        view = (1, -1, 1, 1) if self.kind == "conv2d" else (-1,)
        out = acc * (self.input_scale * self.weight_scale).view(view)
        if self.bias is not None:
            out = out + self.bias.view(view)
        return out

    def extra_repr(self) -> str:
        shape = tuple(self.q_weight.shape)
        return f"kind={self.kind!r}, weight={shape}, input_scale={self.input_scale.item():.4g}"
