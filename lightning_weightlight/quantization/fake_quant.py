"""Observers, scales and zero points, and fake quantization with straight-through gradients.

Every quantize-dequantize here performs the same float32 operations, in the same order, as
:func:`lightning_weightlight.kernels.reference.fake_quantize_affine`, so training sees exactly
the values that the converted integer model computes with.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from lightning_weightlight.kernels.reference import (
    choose_qparams_affine,
    choose_qparams_symmetric,
    integer_range,
)

OBSERVERS = ("minmax", "moving_average", "percentile")
WEIGHT_BITS = (4, 8)
MIN_LEARNED_SCALE = 1e-8
ACTIVATION_BITS = (8, 16)


class CalibrationError(ValueError):
    """Calibration data was missing or produced non-finite activations."""


def check_choice(argument: str, value: object, allowed: tuple) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{argument}: expected one of {list(allowed)}, but got {value!r}")


# --------------------------------------------------------------------------------------------
# Fake quantization with straight-through gradients


class _FakeQuantizeSTE(torch.autograd.Function):
    """Affine fake quantization whose gradient passes where the value was not clamped."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        # A full-shape divisor keeps a true division; torch may multiply by the reciprocal of a scalar.
        q = x / scale.expand(x.shape)
        q.round_()
        # A zero point of 0 (common after ReLU) makes the add and subtract no-ops; skip both passes.
        has_zero_point = bool(zero_point.any())
        if has_zero_point:
            q.add_(zero_point)
        clamped = q.clamp(qmin, qmax)
        inside = clamped == q
        ctx.save_for_backward(inside)
        if has_zero_point:
            clamped.sub_(zero_point)
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None, None


class _SymmetricFakeQuantize(torch.autograd.Function):
    """Symmetric fake quantization of a weight whose scale covers its whole range.

    With ``scale = max|w| / qmax`` no value is clamped, so the straight-through gradient is the
    identity and no mask needs to be kept.
    """

    @staticmethod
    def forward(ctx, weight, scale, qmin: int, qmax: int, clamp: bool):
        q = weight / scale
        q.round_()
        if clamp:
            q.clamp_(qmin, qmax)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


class _PassThrough(torch.autograd.Function):
    """Return a precomputed value forward and the unchanged gradient backward."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _LearnedScaleFakeQuantize(torch.autograd.Function):
    """Fake quantization with a learned scale (LSQ, Esser et al., 2020, "Learned Step Size Quantization").

    The scale gradient is ``round(x/s) - x/s`` inside the range and ``qmin - zp`` or ``qmax - zp``
    outside it, multiplied by ``grad_factor`` and summed over the elements each scale covers.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        ratio = x / scale.expand(x.shape)
        q = torch.round(ratio) + zero_point
        below, above = q < qmin, q > qmax
        q = torch.clamp(q, qmin, qmax)
        ctx.save_for_backward(ratio, zero_point, below, above, scale)
        ctx.grad_factor = grad_factor
        ctx.qrange = (qmin, qmax)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad_output):
        ratio, zero_point, below, above, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        inside = ~(below | above)
        local = torch.where(inside, torch.round(ratio) - ratio, torch.zeros_like(ratio))
        local = torch.where(below, qmin - zero_point, local)
        local = torch.where(above, qmax - zero_point, local)
        grad_scale = grad_output * local * ctx.grad_factor
        reduce_dims = [d for d in range(grad_scale.dim()) if d >= scale.dim() or scale.shape[d] == 1]
        if scale.dim() == 0:
            grad_scale = grad_scale.sum()
        else:
            grad_scale = grad_scale.sum(dim=reduce_dims, keepdim=True).reshape(scale.shape)
        return grad_output * inside, grad_scale, None, None, None, None


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize and dequantize ``x`` with a straight-through gradient masked to the unclamped values.

    The forward value equals ``reference.fake_quantize_affine(x, scale, zero_point, qmin, qmax)``
    exactly; ``scale`` and ``zero_point`` broadcast against ``x`` and get no gradient.

    Example:
        >>> x = torch.tensor([-1.0, 0.5, 3.0])
        >>> fake_quantize(x, torch.tensor(0.5), torch.tensor(0.0), -2, 2).tolist()
        [-1.0, 0.5, 1.0]
    """
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax)


def fake_quantize_learned_scale(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, numel: int
) -> torch.Tensor:
    """Fake quantize ``x`` with a trainable ``scale`` (LSQ); ``numel`` is the element count per scale."""
    grad_factor = 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))
    return _LearnedScaleFakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_factor)


def weight_scale(weight: torch.Tensor, bits: int = 8, per_channel: bool = True) -> torch.Tensor:
    """Compute the symmetric scale of ``weight``: ``max|w| / qmax`` per output channel or per tensor.

    Per channel, this is the scale of ``reference.quantize_weight_per_channel``; per tensor the
    one scale is repeated for every output channel, so the result is always ``(out,)``.
    """
    _, qmax = integer_range(bits, signed=True)
    flat = weight.detach().float().reshape(weight.shape[0], math.prod(weight.shape[1:]))
    if flat.numel() == 0:
        amax = torch.zeros(weight.shape[0], device=weight.device)
    elif per_channel:
        # max(-min, max) equals max|w| exactly without an abs() copy. Separate amin and amax, because
        # aminmax(dim=1) took 18 ms against 0.5 ms for both on a 2048x2048 weight (torch 2.13.0 CPU).
        amax = torch.maximum(flat.amin(dim=1).neg(), flat.amax(dim=1))
    else:
        low, high = flat.aminmax()
        amax = torch.maximum(low.neg(), high).expand(weight.shape[0])
    return choose_qparams_symmetric(amax, qmax)


def fake_quantize_weight(
    weight: torch.Tensor, scale: torch.Tensor, bits: int = 8, *, scale_covers_range: bool = False
) -> torch.Tensor:
    """Fake quantize ``weight`` symmetrically with per-output-channel ``scale``, straight-through.

    ``scale_covers_range=True`` promises ``scale >= max|w| / qmax`` per channel (as from
    :func:`weight_scale`). Then ``|w / scale|`` stays below ``qmax + 0.5``, rounding never leaves
    the range, and the clamp (one pass over the weight) is skipped with the same result.
    """
    qmin, qmax = integer_range(bits, signed=True)
    view = (-1,) + (1,) * (weight.dim() - 1)
    return _SymmetricFakeQuantize.apply(weight, scale.view(view), qmin, qmax, not scale_covers_range)


def fake_quantize_per_row(x: torch.Tensor) -> torch.Tensor:
    """Fake quantize each row (last dimension) of ``x`` to uint8 as ``reference.quantize_per_row`` does."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    qmin, qmax = integer_range(8, signed=False)
    if rows.shape[1] == 0:
        return x
    scale, zero_point = choose_qparams_affine(rows.amin(dim=1), rows.amax(dim=1), qmin, qmax)
    scale, zero_point = scale[:, None], zero_point[:, None]
    q = torch.clamp(torch.round(rows / scale) + zero_point, qmin, qmax)
    value = ((q - zero_point) * scale).reshape(x.shape)
    return _PassThrough.apply(x, value)


# --------------------------------------------------------------------------------------------
# Observers


def _all_reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Take the minimum of ``lo`` and the maximum of ``hi`` over all ranks of the default group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return lo, hi
    packed = torch.stack([lo, -hi])
    dist.all_reduce(packed, op=dist.ReduceOp.MIN)
    return packed[0], -packed[1]


def _all_reduce_mean(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return lo, hi
    packed = torch.stack([lo, hi])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed = packed / dist.get_world_size()
    return packed[0], packed[1]


class Observer(nn.Module):
    """Track the range ``[min_val, max_val]`` of the tensors it observes, identical on every rank.

    Under ``torch.distributed`` each batch's range is reduced over all ranks before it is merged,
    so every rank holds the same statistics and hence the same scales.

    Args:
        kind: ``"minmax"`` (running extremes), ``"moving_average"`` (exponential average of each
            batch's extremes) or ``"percentile"`` (moving average of each batch's percentiles).
        momentum: Weight of the newest batch for the moving averages.
        percentile: Upper percentile in (50, 100] for ``"percentile"``; the lower one mirrors it.
        name: Layer name used in error messages.
    """

    def __init__(
        self, kind: str = "minmax", momentum: float = 0.01, percentile: float = 99.99, name: str = ""
    ) -> None:
        super().__init__()
        check_choice("observer", kind, OBSERVERS)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum: expected a value in (0, 1], but got {momentum}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (50, 100], but got {percentile}")
        self.kind = kind
        self.momentum = momentum
        self.percentile = percentile
        self.name = name
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def initialized(self) -> bool:
        """Whether at least one batch was observed."""
        return bool(self.min_val <= self.max_val)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.detach().float().reshape(-1)
        if self.kind != "percentile" or flat.numel() < 2:
            return torch.aminmax(flat)
        # kthvalue has no size limit, unlike torch.quantile.
        k_hi = max(1, min(flat.numel(), math.ceil(flat.numel() * self.percentile / 100.0)))
        k_lo = max(1, flat.numel() + 1 - k_hi)
        return flat.kthvalue(k_lo).values, flat.kthvalue(k_hi).values

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Merge the range of ``x`` into the statistics; raise :class:`CalibrationError` on NaN or inf."""
        if x.numel() == 0:
            return
        lo, hi = self._batch_range(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CalibrationError(
                f"observer of layer {self.name!r}: expected finite activations, but got a batch with "
                f"range [{lo.item()}, {hi.item()}] (NaN or inf); check the data and the model's inputs"
            )
        if self.kind == "percentile":
            # NOTE: under DDP this averages the ranks' percentiles. That approximates the percentile
            # of the union of their batches, but every rank still gets the same value.
            lo, hi = _all_reduce_mean(lo, hi)
        else:
            lo, hi = _all_reduce_range(lo, hi)
        if self.kind == "minmax" or not self.initialized:
            if self.kind == "minmax" and self.initialized:
                lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            return
        self.min_val.lerp_(lo, self.momentum)
        self.max_val.lerp_(hi, self.momentum)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, min_val={self.min_val.item():.4g}, max_val={self.max_val.item():.4g}"


# --------------------------------------------------------------------------------------------
# Fake quantization modules


class ActivationFakeQuantize(nn.Module):
    """Fake quantize a layer's input: uint8 (or int8, int16) affine per tensor, or uint8 per row.

    ``"static"`` takes its scale and zero point from the observer. ``"dynamic"`` computes them
    from each row of the input at run time, as the int8 kernels' dynamic path does. Until the
    observer has seen a batch, a static quantizer passes its input through unchanged.

    The observer updates only while ``observer_enabled`` is set and the module is in training
    mode, or while ``calibrating`` is set (post-training calibration).

    Args:
        mode: ``"static"`` or ``"dynamic"``.
        bits: 8, or 16 for the int16 activations of the 16x8 mode.
        signed: Signed integers; 16-bit activations are symmetric (zero point 0) as in
            TensorFlow Lite's 16x8 mode.
        observer: Observer kind, see :class:`Observer`.
        learn_scale: Train the scale by LSQ, starting from the first observed range.
        name: Layer name used in error messages.
    """

    def __init__(
        self,
        mode: str = "static",
        bits: int = 8,
        signed: bool = False,
        observer: str = "moving_average",
        momentum: float = 0.01,
        percentile: float = 99.99,
        learn_scale: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        check_choice("activation", mode, ("static", "dynamic"))
        check_choice("activation_bits", bits, ACTIVATION_BITS)
        if mode == "dynamic" and (bits != 8 or signed or learn_scale):
            raise ValueError(
                "activation='dynamic': expected 8-bit unsigned activations without learned scales, "
                f"but got bits={bits}, signed={signed}, learn_scale={learn_scale}"
            )
        self.mode = mode
        self.bits = bits
        self.signed = signed or bits == 16
        self.symmetric = bits == 16
        self.qmin, self.qmax = integer_range(bits, self.signed)
        self.learn_scale = learn_scale
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self.calibrating = False
        self.observer = Observer(observer, momentum=momentum, percentile=percentile, name=name)
        self.register_buffer("zero_point", torch.tensor(0.0))
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("scale", torch.tensor(1.0))

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Set ``scale`` and ``zero_point`` from the observer (a learned scale only once, at the start)."""
        if not self.observer.initialized:
            return
        if self.symmetric:
            amax = torch.maximum(self.observer.min_val.abs(), self.observer.max_val.abs())
            scale, zero_point = choose_qparams_symmetric(amax, self.qmax), torch.tensor(0.0)
        else:
            scale, zero_point = choose_qparams_affine(
                self.observer.min_val, self.observer.max_val, self.qmin, self.qmax
            )
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def effective_scale(self) -> torch.Tensor:
        """Return the scale in use: the buffer, or the learned parameter floored at a tiny positive value."""
        if self.learn_scale:
            return self.scale.clamp(min=MIN_LEARNED_SCALE)
        return self.scale

    def qparams(self) -> tuple[float, int]:
        """Return the static ``(scale, zero_point)`` as Python numbers for the deploy modules."""
        return float(self.effective_scale().detach()), int(self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            return fake_quantize_per_row(x) if self.fake_quant_enabled else x

        if self.observer_enabled and (self.training or self.calibrating):
            first = not self.observer.initialized
            self.observer.observe(x)
            if not self.learn_scale or first:
                self.update_qparams()
        if not self.fake_quant_enabled or not self.observer.initialized:
            return x
        if self.learn_scale:
            return fake_quantize_learned_scale(
                x,
                self.effective_scale(),
                self.zero_point,
                self.qmin,
                self.qmax,
                x.numel() // max(x.shape[0], 1),
            )
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, bits={self.bits}, signed={self.signed}, learn_scale={self.learn_scale}"


class WeightFakeQuantize(nn.Module):
    """Fake quantize a weight symmetrically (zero point 0), per output channel or per tensor.

    Without ``learn_scale`` the scale is ``max|w| / qmax`` of the current weight at every call,
    exactly the scale the conversion to int8 uses. With it, the per-channel scale is a parameter
    trained by LSQ, initialised from the first weight it quantizes.
    """

    def __init__(self, out_channels: int, bits: int = 8, per_channel: bool = True, learn_scale: bool = False):
        super().__init__()
        check_choice("weight_bits", bits, WEIGHT_BITS)
        self.bits = bits
        self.per_channel = per_channel
        self.learn_scale = learn_scale
        self.qmin, self.qmax = integer_range(bits, signed=True)
        self.fake_quant_enabled = True
        if learn_scale:
            self.scale = nn.Parameter(torch.ones(out_channels if per_channel else 1))
            self.register_buffer("initialized", torch.tensor(False))

    def _learned_scale(self) -> torch.Tensor:
        # A learned scale may be driven to zero or below; the floor keeps the division finite.
        return self.scale.clamp(min=MIN_LEARNED_SCALE)

    def current_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the ``(out,)`` scale that quantizes ``weight`` now."""
        if self.learn_scale:
            return self._learned_scale().detach().float().expand(weight.shape[0]).clone()
        return weight_scale(weight, self.bits, self.per_channel)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return weight
        if not self.learn_scale:
            scale = weight_scale(weight, self.bits, self.per_channel)
            return fake_quantize_weight(weight, scale, self.bits, scale_covers_range=True)

        if not bool(self.initialized):
            with torch.no_grad():
                initial = weight_scale(weight, self.bits, self.per_channel)
                self.scale.copy_(initial if self.per_channel else initial[:1])
                self.initialized.fill_(True)
        view = (-1,) + (1,) * (weight.dim() - 1)
        numel = weight[0].numel() if self.per_channel else weight.numel()
        return fake_quantize_learned_scale(
            weight,
            self._learned_scale().view(view),
            torch.zeros((), device=weight.device),
            self.qmin,
            self.qmax,
            numel,
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, learn_scale={self.learn_scale}"
