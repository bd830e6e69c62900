"""Deploy modules that replace ``nn.Linear`` and run the compiled kernels.

Every module keeps only tensors in its ``state_dict`` and can be rebuilt without pickle:
``type(module).from_config(module.extra_config())`` makes an empty module of the same shapes,
into which ``load_state_dict`` loads. Packed layouts that are derived from the stored tensors
are non-persistent buffers, rebuilt after every ``load_state_dict``.

Each module describes itself with ``sparsity`` (fraction of zero weights), ``pattern``
(``"dense"`` or a sparse block pattern of :data:`~lightning_weightlight.kernels.packing.BLOCK_SHAPES`),
``bits`` (32 or 8) and ``kernel`` (the op family that runs it).

NOTE: a ``torch.ops`` call from eager Python goes through the boxed dispatcher, which costs a few
microseconds of CPU time per call. On small layers at one token that is most of the time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_weightlight.kernels import ops, packing, reference

__all__ = ["Int8Linear", "SparseInt8Linear", "SparseLinear"]


def _check_linear(layer: nn.Module, method: str) -> None:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{method}: expected an nn.Linear, but got {type(layer).__name__}")


def _first_invalid_scale(scale: torch.Tensor) -> int | None:
    """Return the index of the first scale that is not positive and finite, or ``None``."""
    invalid = ~(torch.isfinite(scale) & (scale > 0))
    return int(invalid.nonzero()[0]) if bool(invalid.any()) else None


def _quantize_weight(
    weight: torch.Tensor, weight_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight symmetrically per output channel, with given or computed scales."""
    if weight_scale is None:
        return reference.quantize_weight_per_channel(weight)
    scale = torch.as_tensor(weight_scale, dtype=torch.float32).detach().reshape(-1)
    if scale.numel() != weight.shape[0]:
        raise ValueError(
            f"weight_scale: expected {weight.shape[0]} per-channel scales, but got shape {tuple(scale.shape)}"
        )
    channel = _first_invalid_scale(scale)
    if channel is not None:
        value = scale[channel].item()
        raise ValueError(f"weight_scale: expected positive finite scales, but channel {channel} has {value}")
    qmin, qmax = reference.INT8_RANGE
    q = torch.clamp(torch.round(weight.detach().float() / scale[:, None]), qmin, qmax)
    return q.to(torch.int8), scale.clone()


def _input_quantization(
    input_scale: float | None, input_zero_point: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Check a static activation scale and zero point; ``None`` means dynamic quantization."""
    if input_scale is None and input_zero_point is None:
        return None
    if input_scale is None:
        raise ValueError("input_scale: expected a positive float with input_zero_point, but got None")
    scale = float(torch.tensor(float(input_scale), dtype=torch.float32))  # the value the buffer stores
    zero_point = 0 if input_zero_point is None else float(input_zero_point)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(
            f"input_scale: expected a positive float, finite and nonzero in float32, but got {input_scale!r}"
        )
    if not (0 <= zero_point <= 255 and zero_point == int(zero_point)):
        raise ValueError(f"input_zero_point: expected an integer in [0, 255], but got {input_zero_point!r}")
    zero_point = int(zero_point)
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.int32)


def _check_integer_values(module: _DeployLinear, state_dict, prefix, *args) -> None:
    """Reject loaded values that an integer buffer cannot hold before torch casts them into it.

    ``load_state_dict`` copies a tensor of another dtype into the buffer, so an int32 index of
    70000 or an int16 weight of 300 would wrap around silently and load as a wrong layer.
    """
    for name, buffer in module._buffers.items():
        key = prefix + name
        if buffer is None or buffer.is_floating_point() or key not in state_dict:
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.dtype == buffer.dtype:
            continue
        cast = value.detach().to(buffer.dtype).to(value.dtype)
        differs = cast != value
        if bool(differs.any()):
            bad = value.detach().flatten()[differs.flatten()][0].item()
            hint = ""
            if buffer.dtype == torch.int16:
                hint = " (indices above 32767 are stored as their int16 bit pattern, value - 65536)"
            with _naming_layer(prefix):
                raise ValueError(
                    f"{type(module).__name__}: {name} contains {bad!r}, which its {buffer.dtype} buffer "
                    f"cannot hold; store {name} as {buffer.dtype}{hint}"
                )


def _check_loaded_tensors(module: _DeployLinear, state_dict, prefix, *args) -> None:
    """Run the module's checks on the incoming tensors before ``load_state_dict`` copies them.

    A rejected load then leaves the module as it was. When a tensor is missing or has another
    shape, the post-hook checks the loaded buffers instead (after ``load_state_dict`` reports a
    shape mismatch or, with ``strict=False``, loads the rest).
    """
    module._load_prefix = prefix
    module._checked_before_load = False
    tensors = {}
    for name, buffer in module._buffers.items():
        if buffer is None or name in module._non_persistent_buffers_set:
            continue
        value = state_dict.get(prefix + name)
        if not isinstance(value, torch.Tensor) or value.shape != buffer.shape:
            return
        tensors[name] = value.detach().to(buffer.dtype)
    with _naming_layer(prefix):
        module._check_tensors(tensors)
    module._checked_before_load = True


@contextlib.contextmanager
def _naming_layer(prefix: str):
    """Prefix a ``ValueError`` raised inside with the layer's name, when the module is inside a model."""
    try:
        yield
    except ValueError as err:
        name = prefix.rstrip(".")
        if not name:
            raise
        raise ValueError(f"layer {name!r}: {err}") from err


def _repack_after_load(module: _DeployLinear, incompatible_keys) -> None:
    if not getattr(module, "_checked_before_load", False):
        with _naming_layer(getattr(module, "_load_prefix", "")):
            module._check_format()
    module._repack()


class _DeployLinear(nn.Module):
    """Shared parts of the deploy Linear modules."""

    bits: int = 32
    kernel: str = "dense"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, but got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.sparsity = 0.0
        self.pattern = "dense"
        self.register_load_state_dict_pre_hook(_check_integer_values)
        self.register_load_state_dict_pre_hook(_check_loaded_tensors)
        self.register_load_state_dict_post_hook(_repack_after_load)

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        # Keep None buffers (no bias, dynamic input quantization) after the tensors. torch.export in
        # torch 2.13 pairs a root module's buffers with graph inputs by their position among all
        # buffers, None ones included, so a None before a tensor makes it raise IndexError.
        for key in [key for key, value in self._buffers.items() if value is None]:
            self._buffers[key] = self._buffers.pop(key)

    def _repack(self) -> None:
        """Rebuild the non-persistent packed buffers and the descriptive attributes."""
        raise NotImplementedError

    def _check_format(self) -> None:
        """Raise ``ValueError`` when the stored tensors do not describe this module's weight."""
        self._check_tensors(self._buffers)

    def _check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` when ``tensors`` (the persistent buffers by name) do not describe a weight."""

    def _wrong_input(self, x: torch.Tensor) -> ValueError:
        return ValueError(
            f"{type(self).__name__}: expected an input whose last dimension is in_features = "
            f"{self.in_features}, but got shape {tuple(x.shape)}"
        )

    def dense_weight(self) -> torch.Tensor:
        """Return the float32 weight ``(out_features, in_features)`` that this module computes with."""
        raise NotImplementedError

    def extra_config(self) -> dict[str, Any]:
        """Return the constructor arguments, JSON-serialisable, that rebuild a module of these shapes."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        """Build an empty module from :meth:`extra_config`; load a ``state_dict`` into it."""
        return cls(**config)

    def to_float(self) -> nn.Linear:
        """Return an equivalent ``nn.Linear`` with the dequantized (and zero-filled) weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _set_sparsity(self, nonzero: int) -> None:
        total = self.in_features * self.out_features
        self.sparsity = 1.0 - nonzero / total if total else 0.0

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kernel={self.kernel}, pattern={self.pattern}, "
            f"sparsity={self.sparsity:.3f}"
        )


class _QuantizedInput:
    """Static or dynamic activation quantization of the int8 modules."""

    def _init_input(self, static_input: bool) -> None:
        self.static_input = bool(static_input)
        # Dynamic quantization registers None, which stays out of the state_dict.
        self.register_buffer("input_scale", torch.tensor(1.0) if self.static_input else None)
        self.register_buffer(
            "input_zero_point", torch.tensor(0, dtype=torch.int32) if self.static_input else None
        )

    def _set_input(self, params: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if params is not None:
            self.input_scale.copy_(params[0])
            self.input_zero_point.copy_(params[1])

    def _check_scales(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` for scales in ``tensors`` that ``from_float`` would have rejected."""
        owner = type(self).__name__
        weight_scale = tensors["weight_scale"]
        channel = _first_invalid_scale(weight_scale)
        if channel is not None:
            raise ValueError(
                f"{owner}: expected positive finite values in weight_scale, but weight_scale[{channel}] "
                f"is {weight_scale[channel].item()}"
            )
        if not self.static_input:
            return
        scale = float(tensors["input_scale"])
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{owner}: expected a positive finite input_scale, but got {scale}")
        zero_point = int(tensors["input_zero_point"])
        if not 0 <= zero_point <= 255:
            raise ValueError(f"{owner}: expected an input_zero_point in [0, 255], but got {zero_point}")


class Int8Linear(_QuantizedInput, _DeployLinear):
    """Linear layer with per-channel int8 weights and uint8 activations (``weightlight::int8_linear``).

    Activations are quantized per row at run time, or per tensor with a fixed scale and zero
    point when ``static_input`` is true. Stored tensors: ``weight`` (int8), ``weight_scale``,
    ``bias``, and ``input_scale``/``input_zero_point`` when static.

    Example:
        >>> layer = Int8Linear.from_float(nn.Linear(16, 4))
        >>> layer(torch.randn(2, 3, 16)).shape
        torch.Size([2, 3, 4])
    """

    bits = 8
    kernel = "int8"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, static_input: bool = False
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self._init_input(static_input)
        if not self.weight_scale.is_meta:  # built on the meta device by the loader's shape check
            self._repack()

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weight_scale: torch.Tensor | None = None,
        input_scale: float | None = None,
        input_zero_point: int | None = None,
    ) -> Int8Linear:
        """Quantize an ``nn.Linear``; ``weight_scale`` defaults to ``max|w| / 127`` per output channel."""
        _check_linear(linear, "Int8Linear.from_float")
        params = _input_quantization(input_scale, input_zero_point)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, params is not None)
        q_weight, scale = _quantize_weight(linear.weight, weight_scale)
        module._load_quantized(q_weight, scale, linear.bias, params)
        return module

    def _load_quantized(self, q_weight, scale, bias, params) -> None:
        with torch.no_grad():
            self.weight.copy_(q_weight)
            self.weight_scale.copy_(scale)
            if self.bias is not None:
                self.bias.copy_(bias.detach().float())
            self._set_input(params)
        self._repack()

    def _check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._check_scales(tensors)

    def _repack(self) -> None:
        packed = packing.pack_int8_weight(self.weight)
        self.register_buffer("_packed", packed.packed, persistent=False)
        self.register_buffer("_sums", packed.sums, persistent=False)
        self._set_sparsity(int(self.weight.count_nonzero()))

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def extra_config(self) -> dict[str, Any]:
        return {**super().extra_config(), "static_input": self.static_input}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 0 and x.shape[-1] != self.in_features:
            raise self._wrong_input(x)
        # Reading the buffers from the dict skips nn.Module.__getattr__, a large share of a small call.
        b = self._buffers
        return ops.int8_linear(
            x, b["_packed"], b["_sums"], b["weight_scale"], b["bias"], b["input_scale"], b["input_zero_point"]
        )


class SparseLinear(_DeployLinear):
    """Linear layer with a block-sparse float32 weight (``weightlight::sparse_linear``).

    Stored tensors: ``row_ptr``, ``col_idx`` and ``values`` of the block-compressed rows (see
    :mod:`lightning_weightlight.kernels.packing`) and ``bias``. ``block`` is a pattern name of
    :data:`~lightning_weightlight.kernels.packing.BLOCK_SHAPES`; ``num_blocks`` the number of
    stored blocks.

    Example:
        >>> linear = nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     _ = linear.weight.masked_fill_(torch.rand(4, 8) < 0.5, 0.0)
        >>> layer = SparseLinear.from_dense(linear)
        >>> torch.allclose(layer(torch.ones(1, 8)), linear(torch.ones(1, 8)), atol=1e-5)
        True
    """

    kernel = "sparse"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block: str = "unstructured",
        num_blocks: int = 0,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if block not in packing.BLOCK_SHAPES:
            raise ValueError(f"block: expected one of {sorted(packing.BLOCK_SHAPES)}, but got {block!r}")
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks: expected a non-negative int, but got {num_blocks!r}")
        r, c = packing.BLOCK_SHAPES[block]
        self.block = block
        self.pattern = block
        self.register_buffer("row_ptr", torch.zeros(-(-out_features // r) + 1, dtype=torch.int32))
        self.register_buffer("col_idx", torch.zeros(num_blocks, dtype=torch.int16))
        self.register_buffer("values", torch.zeros(num_blocks, c, r))

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, block: str | None = None) -> SparseLinear:
        """Compress an ``nn.Linear`` whose weight already contains its zeros.

        ``block`` defaults to the pattern that :func:`~lightning_weightlight.kernels.packing.detect_pattern`
        finds; blocks that contain any nonzero are stored whole.
        """
        _check_linear(linear, "SparseLinear.from_dense")
        weight = linear.weight.detach().float()
        if block is None:
            block = packing.detect_pattern(weight)
            block = "unstructured" if block == "dense" else block
        if block not in packing.BLOCK_SHAPES:
            raise ValueError(f"block: expected one of {sorted(packing.BLOCK_SHAPES)}, but got {block!r}")
        sparse = packing.pack_sparse_weight(weight, packing.BLOCK_SHAPES[block])
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, block, sparse.col_idx.numel()
        )
        with torch.no_grad():
            module.row_ptr.copy_(sparse.row_ptr)
            module.col_idx.copy_(sparse.col_idx)
            module.values.copy_(sparse.values)
            if module.bias is not None:
                module.bias.copy_(linear.bias.detach().float())
        module._repack()
        return module

    def _repack(self) -> None:
        self._set_sparsity(int(self.values.count_nonzero()))

    def _check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        sparse = packing.SparseWeight(tensors["row_ptr"], tensors["col_idx"], tensors["values"])
        packing.check_sparse_weight(sparse, self.out_features, self.in_features, owner=type(self).__name__)

    def dense_weight(self) -> torch.Tensor:
        sparse = packing.SparseWeight(self.row_ptr, self.col_idx, self.values)
        return packing.unpack_sparse_weight(
            sparse, self.out_features, self.in_features, owner=type(self).__name__
        )

    def extra_config(self) -> dict[str, Any]:
        return {**super().extra_config(), "block": self.block, "num_blocks": self.col_idx.numel()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 0 and x.shape[-1] != self.in_features:
            raise self._wrong_input(x)
        b = self._buffers
        return ops.sparse_linear(x, b["row_ptr"], b["col_idx"], b["values"], b["bias"], self.out_features)


class SparseInt8Linear(_QuantizedInput, _DeployLinear):
    """Linear layer with a sparse int8 weight in groups of 4 inputs (``weightlight::sparse_int8_linear``).

    The activation quantization is that of :class:`Int8Linear`. Stored tensors: ``row_ptr``,
    ``group_idx`` and ``values`` (int8, one row of 4 per kept group), ``weight_scale``, ``bias``
    and the static ``input_scale``/``input_zero_point``. Zero weights stay exactly zero.
    """

    bits = 8
    kernel = "sparse_int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        num_groups: int = 0,
        static_input: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if not isinstance(num_groups, int) or num_groups < 0:
            raise ValueError(f"num_groups: expected a non-negative int, but got {num_groups!r}")
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("group_idx", torch.zeros(num_groups, dtype=torch.int16))
        self.register_buffer("values", torch.zeros(num_groups, 4, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self._init_input(static_input)
        if not self.weight_scale.is_meta:  # built on the meta device by the loader's shape check
            self._repack()

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weight_scale: torch.Tensor | None = None,
        input_scale: float | None = None,
        input_zero_point: int | None = None,
    ) -> SparseInt8Linear:
        """Quantize and compress an ``nn.Linear`` whose weight already contains its zeros."""
        _check_linear(linear, "SparseInt8Linear.from_float")
        params = _input_quantization(input_scale, input_zero_point)
        q_weight, scale = _quantize_weight(linear.weight, weight_scale)
        sparse, _ = packing.pack_sparse_int8_weight(q_weight)
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            sparse.col_idx.numel(),
            params is not None,
        )
        with torch.no_grad():
            module.row_ptr.copy_(sparse.row_ptr)
            module.group_idx.copy_(sparse.col_idx)
            module.values.copy_(sparse.values)
            module.weight_scale.copy_(scale)
            if module.bias is not None:
                module.bias.copy_(linear.bias.detach().float())
            module._set_input(params)
        module._repack()
        return module

    def _repack(self) -> None:
        sums = torch.zeros(self.out_features, dtype=torch.int32)
        # An empty module from from_config has no row structure yet; its sums stay zero until a load.
        if int(self.row_ptr[-1]) == self.values.shape[0]:
            counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
            rows = torch.repeat_interleave(torch.arange(self.out_features), counts)
            sums.index_add_(0, rows, self.values.sum(dim=1, dtype=torch.int32))
        self.register_buffer("_sums", sums, persistent=False)
        self.pattern = "1x4"
        self._set_sparsity(int(self.values.count_nonzero()))

    def _check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        sparse = packing.SparseWeight(
            tensors["row_ptr"], tensors["group_idx"], tensors["values"].reshape(-1, 4, 1)
        )
        packing.check_sparse_weight(
            sparse, self.out_features, self.in_features, owner=type(self).__name__, index_name="group_idx"
        )
        self._check_scales(tensors)

    def q_weight(self) -> torch.Tensor:
        """Return the int8 weight ``(out_features, in_features)``."""
        sparse = packing.SparseWeight(self.row_ptr, self.group_idx, self.values)
        return packing.unpack_sparse_int8_weight(
            sparse, self.out_features, self.in_features, owner=type(self).__name__, index_name="group_idx"
        )

    def dense_weight(self) -> torch.Tensor:
        return self.q_weight().float() * self.weight_scale[:, None]

    def extra_config(self) -> dict[str, Any]:
        return {
            **super().extra_config(),
            "num_groups": self.group_idx.numel(),
            "static_input": self.static_input,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 0 and x.shape[-1] != self.in_features:
            raise self._wrong_input(x)
        b = self._buffers
        return ops.sparse_int8_linear(
            x,
            b["row_ptr"],
            b["group_idx"],
            b["values"],
            b["_sums"],
            b["weight_scale"],
            b["bias"],
            b["input_scale"],
            b["input_zero_point"],
        )
