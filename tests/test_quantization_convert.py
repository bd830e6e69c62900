"""Conversion of QAT modules to deploy modules: exact integers, pruned zeros, atomic errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.kernels import layers, reference
from lightning_weightlight.quantization import (
    Float16Weight,
    Int16x8,
    QATConfig,
    QATLinear,
    QuantizationAwareTraining,
    WeightOnlyQuantized,
    convert,
    prepare_qat,
)


def calibrated_mlp(
    config: QATConfig | None = None, zero_columns: bool = False, seed: int = 0
) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    if zero_columns:
        with torch.no_grad():
            model[0].weight[:, 8:] = 0.0
    prepare_qat(model, config)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 24))
    return model.eval()


def qat_codes(module: QATLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the uint8 input codes and int8 weight codes that the QAT layer computes with."""
    scale, zero_point = module.input_fake_quant.scale, module.input_fake_quant.zero_point
    q_x = reference.quantize_affine(x, scale.expand(x.shape), zero_point, 0, 255)
    if module.input_fake_quant.signed:
        q_x = reference.quantize_affine(x, scale.expand(x.shape), zero_point, -128, 127) + 128
    w_scale = module.deploy_weight_scale()
    q_w = torch.clamp(torch.round(module.weight.detach() / w_scale[:, None]), -128, 127)
    return q_x.to(torch.uint8), q_w.to(torch.int8)


@pytest.mark.parametrize("signed", [False, True])
def test_static_accumulators_equal_reference(signed):
    model = calibrated_mlp(QATConfig(activation_signed=signed))
    deployed = convert(model)
    layer, qat_layer = deployed[0], model[0]
    assert isinstance(layer, layers.Int8Linear)
    x = torch.randn(5, 24) * 1.5
    q_x, q_w = qat_codes(qat_layer, x)
    assert torch.equal(layer.weight, q_w)

    zero_point = int(qat_layer.input_fake_quant.zero_point) + (128 if signed else 0)
    assert int(layer.input_zero_point) == zero_point
    expected = reference.int8_linear_accumulators(q_x, torch.tensor(zero_point), q_w)
    qat_accumulators = (q_x.long() - zero_point) @ q_w.long().t()
    assert torch.equal(expected.long(), qat_accumulators)

    kernel = layer(x)
    assert torch.equal(
        kernel,
        reference.static_int8_linear(
            x, layer.weight, layer.weight_scale, layer.input_scale, layer.input_zero_point, layer.bias
        ),
    )


def test_converted_output_matches_fake_quant():
    model = calibrated_mlp()
    deployed = convert(model)
    x = torch.randn(64, 24)
    with torch.no_grad():
        expected, actual = model(x), deployed(x)
    # The same integers; only float32 summation order differs.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_conversion_matches_fake_quant():
    model = calibrated_mlp(QATConfig(activation="dynamic"))
    deployed = convert(model)
    assert not deployed[0].static_input
    x = torch.randn(7, 24)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_conversion_keeps_pruned_zeros_and_picks_sparse():
    model = calibrated_mlp(zero_columns=True)
    zeros = model[0].weight == 0
    _, q_w = qat_codes(model[0], torch.zeros(1, 24))
    deployed = convert(model, sparse="auto", sparse_threshold=0.5)
    assert isinstance(deployed[0], layers.SparseInt8Linear)
    assert torch.equal(deployed[0].q_weight(), q_w)
    assert not deployed[0].q_weight()[zeros].any()
    dense = convert(model, sparse="never")
    assert isinstance(dense[0], layers.Int8Linear)
    assert torch.equal(dense[0].weight, q_w)
    assert not dense[0].weight[zeros].any()


def test_weight_only_four_bits_equal_fake_quant():
    model = calibrated_mlp(QATConfig(weight_bits=4, activation="none"))
    deployed = convert(model)
    assert isinstance(deployed[0], WeightOnlyQuantized)
    assert int(deployed[0].q_weight.abs().max()) <= 8
    assert torch.equal(deployed[0].dequantized_weight(), model[0].weight_fake_quant(model[0].weight).detach())
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-6, atol=1e-6)


def test_int16_activations_convert_to_16x8():
    model = calibrated_mlp(QATConfig(activation_bits=16))
    deployed = convert(model)
    assert isinstance(deployed[0], Int16x8)
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_error_leaves_model_unconverted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    prepare_qat(model)
    model.train()
    model[0].input_fake_quant.observer.observe(torch.randn(3, 4))
    # Layer 1 never observed data, so its conversion fails after layer 0's succeeded.
    with pytest.raises(ValueError, match=r"layer '1' has static activations but its observer saw no data"):
        convert(model, inplace=True)
    assert isinstance(model[0], QATLinear)
    assert isinstance(model[1], QATLinear)


def test_convert_rejects_invalid_arguments():
    model = calibrated_mlp()
    with pytest.raises(
        ValueError, match=r"sparse: expected one of \['auto', 'always', 'never'\], but got 'yes'"
    ):
        convert(model, sparse="yes")
    with pytest.raises(ValueError, match=r"expected a model with QAT modules, but Sequential has none"):
        convert(nn.Sequential(nn.Linear(2, 2)))


def test_cnn_with_folded_batchnorm_converts(make_trainer):
    torch.manual_seed(0)
    model = DigitsCNN(channels=[4, 8], hidden=16)
    callback = QuantizationAwareTraining(freeze_bn_step=3)
    make_trainer(max_steps=5, callbacks=[callback], limit_val_batches=0).fit(
        model, DigitsDataModule(batch_size=32)
    )
    model.eval()
    deployed = convert(model)
    assert isinstance(deployed.features[0].conv, layers.Int8Conv2d)
    assert isinstance(deployed.features[0].bn, nn.Identity)
    assert isinstance(deployed.classifier[0], layers.Int8Linear)

    qat_conv = model.features[1].conv
    folded, _ = qat_conv.deploy_weight()
    codes = torch.clamp(torch.round(folded / qat_conv.deploy_weight_scale()[:, None, None, None]), -128, 127)
    assert torch.equal(deployed.features[1].conv.weight.reshape(codes.shape), codes.to(torch.int8))

    images = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(deployed(images), model(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("build", "layer"),
    [
        (lambda m: WeightOnlyQuantized.from_float(m, bits=4), nn.Linear(6, 3)),
        (lambda m: WeightOnlyQuantized.from_float(m), nn.Embedding(7, 4, padding_idx=0)),
        (Float16Weight.from_float, nn.Conv2d(2, 3, 3, stride=2, padding=1)),
        (lambda m: Int16x8.from_float(m, input_scale=0.01), nn.Conv2d(2, 3, 3, padding=1, bias=False)),
    ],
)
def test_deploy_modules_rebuild_from_config(build, layer):
    module = build(layer)
    rebuilt = type(module).from_config(module.extra_config())
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    x = torch.tensor([[0, 3, 6]]) if isinstance(layer, nn.Embedding) else torch.randn(2, 2, 5, 5)
    if isinstance(layer, nn.Linear):
        x = torch.randn(2, 6)
    assert torch.equal(rebuilt(x), module(x))
    torch.testing.assert_close(module(x), layer(x), rtol=0.2, atol=0.2)


@pytest.mark.parametrize(
    ("build", "key", "value", "message"),
    [
        (
            lambda m: WeightOnlyQuantized.from_float(m),
            "q_weight",
            300,
            r"q_weight contains 300, which its torch\.int8",
        ),
        (
            lambda m: WeightOnlyQuantized.from_float(m, bits=4),
            "q_weight",
            9,
            r"q_weight contains 9, outside the int4",
        ),
        (
            lambda m: WeightOnlyQuantized.from_float(m),
            "weight_scale",
            0.0,
            r"expected positive finite values in weight_scale, but weight_scale\[0\] is 0\.0",
        ),
        (
            lambda m: Int16x8.from_float(m, input_scale=0.01),
            "input_scale",
            -1.0,
            r"expected positive finite values in input_scale, but input_scale\[0\] is -1\.0",
        ),
        (
            lambda m: Int16x8.from_float(m, input_scale=0.01),
            "weight_scale",
            float("nan"),
            r"expected positive finite values in weight_scale, but weight_scale\[0\] is nan",
        ),
        (
            lambda m: Int16x8.from_float(m, input_scale=0.01),
            "input_scale",
            1e-320,
            r"expected positive finite values in input_scale, but input_scale\[0\] is 0\.0",
        ),
    ],
)
def test_deploy_modules_reject_invalid_loaded_values(build, key, value, message):
    module = build(nn.Linear(6, 3))
    state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    # float64 scales are checked as the float32 values the buffers will hold (1e-320 becomes 0).
    bad = state[key].to(torch.int32 if key == "q_weight" else torch.float64).clone()
    bad.view(-1)[0] = value
    rebuilt = type(module).from_config(module.extra_config())
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 6)

    # Inside a model the error names the layer, and the layer keeps its tensors.
    model = nn.Sequential(rebuilt)
    with pytest.raises(ValueError, match=f"^layer '0': {type(module).__name__}: {message}"):
        model.load_state_dict({f"0.{name}": tensor for name, tensor in dict(state, **{key: bad}).items()})
    assert torch.equal(rebuilt(x), module(x))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"weight_shape": []}, r"weight_shape: expected 2 ints >= 0 for a linear weight, but got \[\]"),
        ({"kind": "conv2d", "weight_shape": [3, 2, 3, 3], "stride": [0, 0]}, r"stride: expected 2 ints >= 1"),
        (
            {"kind": "conv2d", "weight_shape": [3, 2, 3, 3], "padding": [-1, -1]},
            r"padding: expected 2 ints >= 0",
        ),
        ({"kind": "conv2d", "weight_shape": [3, 2, 3, 3], "groups": 0}, r"groups: expected a positive int"),
        ({"kind": "embedding", "padding_idx": 99}, r"padding_idx: expected None or an int in \[-3, 3\)"),
    ],
)
def test_deploy_modules_reject_invalid_config(config, message):
    arguments = {"kind": "linear", "weight_shape": [3, 6], "bias": True, **config}
    with pytest.raises(ValueError, match=message):
        WeightOnlyQuantized.from_config(arguments)


def test_embedding_converts_to_weight_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 3))
    prepare_qat(model, types=["Embedding", "Linear"])
    model.train()
    indices = torch.tensor([[0, 5, 11], [3, 3, 7]])
    model(indices)
    model.eval()
    deployed = convert(model)
    assert isinstance(deployed[0], WeightOnlyQuantized)
    assert torch.equal(deployed[0](indices), model[0](indices))
