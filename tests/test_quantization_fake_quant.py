"""Fake quantization against the numerics contract (zero tolerance), gradients and observers."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_weightlight.kernels import reference
from lightning_weightlight.quantization import (
    ActivationFakeQuantize,
    CalibrationError,
    Observer,
    QATConfig,
    WeightFakeQuantize,
    fake_quantize,
    fake_quantize_per_row,
    fake_quantize_weight,
    weight_scale,
)
from lightning_weightlight.quantization.fake_quant import fake_quantize_learned_scale

RANGES = [(0, 255), (-128, 127), (-32768, 32767), (-8, 7)]


@pytest.mark.parametrize(("qmin", "qmax"), RANGES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fake_quantize_equals_reference(qmin, qmax, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 33, generator=generator) * 3.0
    lo, hi = torch.tensor(-2.5), torch.tensor(4.0)
    scale, zero_point = reference.choose_qparams_affine(lo, hi, qmin, qmax)
    expected = reference.fake_quantize_affine(x, scale, zero_point, qmin, qmax)
    assert torch.equal(fake_quantize(x, scale, zero_point, qmin, qmax), expected)


def test_fake_quantize_rounds_ties_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    result = fake_quantize(x, torch.tensor(1.0), torch.tensor(0.0), -128, 127)
    assert result.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


@pytest.mark.parametrize("shape", [(16, 9), (8, 3, 3, 3), (1, 5), (4, 0)])
def test_weight_fake_quant_equals_per_channel_reference(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    q, scale = reference.quantize_weight_per_channel(weight)
    view = (-1,) + (1,) * (weight.dim() - 1)
    expected = q.float() * scale.view(view)
    assert torch.equal(weight_scale(weight), scale)
    assert torch.equal(fake_quantize_weight(weight, scale), expected)
    assert torch.equal(WeightFakeQuantize(shape[0])(weight), expected)


def test_weight_fake_quant_per_tensor_uses_one_scale():
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    scale = weight_scale(weight, per_channel=False)
    assert torch.equal(scale, torch.full((2,), 2.0 / 127))
    expected = reference.fake_quantize_affine(weight, scale[0], torch.tensor(0.0), -128, 127)
    assert torch.equal(WeightFakeQuantize(2, per_channel=False)(weight), expected)


def test_weight_fake_quant_keeps_zeros():
    weight = torch.randn(8, 8)
    weight[:, ::2] = 0.0
    assert torch.equal(WeightFakeQuantize(8)(weight)[:, ::2], torch.zeros(8, 4))


def test_per_row_fake_quant_equals_reference():
    x = torch.randn(2, 5, 17, generator=torch.Generator().manual_seed(4)) * 2.0
    q, scale, zero_point = reference.quantize_per_row(x.reshape(-1, 17))
    expected = reference.dequantize_affine(q, scale[:, None], zero_point[:, None].float())
    assert torch.equal(fake_quantize_per_row(x), expected.reshape(x.shape))


def test_straight_through_gradient_masks_clamped_values():
    x = torch.tensor([-3.0, -0.4, 0.2, 0.9, 5.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.1), torch.tensor(10.0), 0, 20).sum().backward()
    # Codes round(x / 0.1) + 10: -20, 6, 12, 19, 60, so the first and last are clamped.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_weight_gradient_passes_straight_through():
    weight = torch.randn(4, 6, requires_grad=True)
    WeightFakeQuantize(4)(weight).mul(2.0).sum().backward()
    assert torch.equal(weight.grad, torch.full((4, 6), 2.0))


def test_learned_scale_forward_and_gradient():
    x = torch.tensor([0.26, -0.3, 2.0])
    scale = torch.tensor(0.1, requires_grad=True)
    output = fake_quantize_learned_scale(x, scale, torch.tensor(0.0), -8, 7, numel=3)
    assert torch.equal(
        output.detach(), reference.fake_quantize_affine(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7)
    )
    output.sum().backward()
    # LSQ: round(x/s) - x/s inside the range, qmax - zp above it, times 1/sqrt(numel * qmax).
    ratio = [0.26 / 0.1, -0.3 / 0.1]
    local = (round(ratio[0]) - ratio[0]) + (round(ratio[1]) - ratio[1]) + 7.0
    assert scale.grad.item() == pytest.approx(local / math.sqrt(3 * 7), rel=1e-5)


def test_minmax_observer_tracks_extremes():
    observer = Observer("minmax")
    assert not observer.initialized
    observer.observe(torch.tensor([-1.0, 2.0]))
    observer.observe(torch.tensor([0.5, 3.0]))
    assert (observer.min_val.item(), observer.max_val.item()) == (-1.0, 3.0)


def test_moving_average_observer_by_hand():
    observer = Observer("moving_average", momentum=0.5)
    observer.observe(torch.tensor([-2.0, 2.0]))
    observer.observe(torch.tensor([0.0, 4.0]))
    assert (observer.min_val.item(), observer.max_val.item()) == (-1.0, 3.0)


def test_percentile_observer_ignores_outliers():
    values = torch.cat([torch.linspace(-1.0, 1.0, 999), torch.tensor([1000.0])])
    observer = Observer("percentile", percentile=99.0, momentum=1.0)
    observer.observe(values)
    assert observer.max_val.item() < 1.0
    assert observer.min_val.item() > -1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_observer_rejects_non_finite_activations(bad):
    observer = Observer(name="encoder.0")
    with pytest.raises(CalibrationError, match=r"encoder\.0.*finite"):
        observer.observe(torch.tensor([1.0, bad]))


def test_activation_quant_static_uses_observed_range():
    quant = ActivationFakeQuantize(observer="minmax").train()
    x = torch.tensor([[-1.0, 0.0, 3.0]])
    output = quant(x)
    scale, zero_point = reference.choose_qparams_affine(torch.tensor(-1.0), torch.tensor(3.0), 0, 255)
    assert torch.equal(output, reference.fake_quantize_affine(x, scale, zero_point, 0, 255))
    assert quant.qparams() == (float(scale), int(zero_point))


def test_activation_quant_passes_through_before_first_batch():
    quant = ActivationFakeQuantize().eval()
    x = torch.randn(3, 4)
    assert torch.equal(quant(x), x)


def test_activation_quant_int16_is_symmetric():
    quant = ActivationFakeQuantize(bits=16, observer="minmax").train()
    quant(torch.tensor([-1.0, 3.0]))
    assert quant.qparams() == (float(torch.tensor(3.0) / 32767), 0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"weight_bits": 3}, r"weight_bits: expected one of \[4, 8\], but got 3"),
        ({"activation_bits": 4}, r"activation_bits: expected one of \[8, 16\], but got 4"),
        ({"observer": "histogram"}, r"observer: expected one of .*'histogram'"),
        ({"activation": "per_token"}, r"activation: expected one of .*'per_token'"),
        ({"weight_bits": 4}, r"weight_bits=4.*activation='none'"),
        ({"activation": "dynamic", "activation_bits": 16}, r"activation='dynamic'"),
        ({"momentum": 0.0}, r"momentum: expected a value in \(0, 1\], but got 0.0"),
    ],
)
def test_config_rejects_invalid_values(arguments, message):
    with pytest.raises(ValueError, match=message):
        QATConfig(**arguments)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_fake_quant_skipped_clamp_is_exact(bits):
    # Rows with one large outlier put other entries near the rounding boundary of qmax.
    weight = torch.randn(64, 257, generator=torch.Generator().manual_seed(5))
    weight[:, 0] = torch.linspace(-3.0, 3.0, 64)
    scale = weight_scale(weight, bits)
    qmin, qmax = reference.integer_range(bits, signed=True)
    expected = reference.fake_quantize_affine(weight, scale[:, None], torch.tensor(0.0), qmin, qmax)
    assert torch.equal(fake_quantize_weight(weight, scale, bits, scale_covers_range=True), expected)
    assert torch.equal(fake_quantize_weight(weight, scale, bits), expected)
