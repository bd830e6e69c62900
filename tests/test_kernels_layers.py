"""Deploy modules: numerics against the references, state_dict round trips, conversions and graphs."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_weightlight.kernels import (
    DEPLOY_MODULES,
    Int8Conv2d,
    Int8Linear,
    SparseConv2d,
    SparseInt8Conv2d,
    SparseInt8Linear,
    SparseLinear,
    build_deploy_module,
    choose_kernel,
    ops,
    reference,
)

FLOAT_TOL = {"rtol": 1e-5, "atol": 1e-5}
STATIC = {"input_scale": 0.04, "input_zero_point": 120}


def pruned_linear(in_features=40, out_features=24, sparsity=0.7, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) >= sparsity)
    return linear


def pruned_conv(sparsity=0.6, seed=0, **kwargs):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 10, 3, **kwargs)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= sparsity)
    return conv


def build_all(linear):
    return [
        Int8Linear.from_float(linear),
        Int8Linear.from_float(linear, **STATIC),
        SparseLinear.from_dense(linear),
        SparseInt8Linear.from_float(linear),
        SparseInt8Linear.from_float(linear, **STATIC),
    ]


def test_int8_linear_matches_reference():
    linear = pruned_linear(sparsity=0.0)
    x = torch.randn(2, 5, 40)
    q_w, w_scale = reference.quantize_weight_per_channel(linear.weight)
    dynamic = Int8Linear.from_float(linear)
    expected = reference.dynamic_int8_linear(x.reshape(10, 40), q_w, w_scale, linear.bias).reshape(2, 5, 24)
    torch.testing.assert_close(dynamic(x), expected, **FLOAT_TOL)
    static = Int8Linear.from_float(linear, **STATIC)
    expected = reference.static_int8_linear(x.reshape(10, 40), q_w, w_scale, 0.04, 120, linear.bias)
    torch.testing.assert_close(static(x), expected.reshape(2, 5, 24), **FLOAT_TOL)


def test_int8_linear_custom_weight_scale():
    linear = pruned_linear(sparsity=0.0)
    scale = torch.full((24,), 0.002)
    module = Int8Linear.from_float(linear, weight_scale=scale)
    expected = torch.clamp(torch.round(linear.weight / 0.002), -128, 127).to(torch.int8)
    assert torch.equal(module.weight, expected)
    assert torch.equal(module.weight_scale, scale)
    with pytest.raises(ValueError, match="weight_scale"):
        Int8Linear.from_float(linear, weight_scale=torch.ones(3))


@pytest.mark.parametrize("static", [False, True])
def test_sparse_int8_linear_matches_int8_linear(static):
    linear = pruned_linear(sparsity=0.8)
    x = torch.randn(7, 40)
    kwargs = STATIC if static else {}
    sparse = SparseInt8Linear.from_float(linear, **kwargs)
    dense = Int8Linear.from_float(linear, **kwargs)
    torch.testing.assert_close(sparse(x), dense(x), **FLOAT_TOL)
    # Pruned weights stay exactly zero after quantization.
    assert torch.equal(sparse.q_weight() == 0, (linear.weight == 0) | (dense.weight == 0))
    assert torch.equal(sparse.q_weight(), dense.weight)


def test_sparse_linear_matches_float():
    linear = pruned_linear(sparsity=0.9)
    module = SparseLinear.from_dense(linear)
    x = torch.randn(3, 4, 40)
    torch.testing.assert_close(module(x), linear(x), **FLOAT_TOL)
    assert module.sparsity == pytest.approx(float((linear.weight == 0).float().mean()))


@pytest.mark.parametrize("module_index", range(5))
def test_deploy_linear_state_dict_round_trip(module_index):
    module = build_all(pruned_linear())[module_index]
    state = module.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert not any(key.startswith("_") for key in state)
    config = json.loads(json.dumps(module.extra_config()))
    rebuilt = type(module).from_config(config)
    rebuilt.load_state_dict(state)
    x = torch.randn(6, 40)
    assert torch.equal(rebuilt(x), module(x))
    assert (rebuilt.sparsity, rebuilt.pattern, rebuilt.bits, rebuilt.kernel) == (
        module.sparsity,
        module.pattern,
        module.bits,
        module.kernel,
    )


@pytest.mark.parametrize("module_index", range(5))
def test_deploy_linear_to_float(module_index):
    linear = pruned_linear(bias=module_index % 2 == 0)
    module = build_all(linear)[module_index]
    restored = module.to_float()
    assert type(restored) is nn.Linear
    assert torch.equal(restored.weight == 0, module.dense_weight() == 0)
    # Dequantized weights are within half a quantization step of the originals.
    step = module.weight_scale[:, None] if module.bits == 8 else torch.zeros(1)
    assert torch.all((restored.weight - linear.weight).abs() <= step / 2 + 1e-7)
    if linear.bias is not None:
        assert torch.equal(restored.bias, linear.bias)


def test_deploy_module_attributes():
    linear = pruned_linear(sparsity=0.75)
    zeros = float((linear.weight == 0).float().mean())
    expected = {
        (Int8Linear, False): (8, "int8", "dense"),
        (SparseLinear, False): (32, "sparse", "unstructured"),
        (SparseInt8Linear, False): (8, "sparse_int8", "1x4"),
    }
    for module in build_all(linear):
        assert (module.bits, module.kernel, module.pattern) == expected[(type(module), False)]
        assert module.sparsity == pytest.approx(zeros, abs=0.02)


def test_sparse_linear_block_pattern_detected():
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        keep = (torch.rand(32, 16) > 0.8).repeat_interleave(4, 1)
        linear.weight.mul_(keep)
    module = SparseLinear.from_dense(linear)
    assert module.pattern == "1x4"
    assert module.values.shape[1:] == (4, 1)
    x = torch.randn(5, 64)
    torch.testing.assert_close(module(x), linear(x), **FLOAT_TOL)


def test_from_float_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        Int8Linear.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="input_scale"):
        Int8Linear.from_float(nn.Linear(4, 4), input_scale=-1.0, input_zero_point=0)
    with pytest.raises(ValueError, match="input_zero_point"):
        SparseInt8Linear.from_float(nn.Linear(4, 4), input_scale=0.1, input_zero_point=256)
    with pytest.raises(ValueError, match="block"):
        SparseLinear.from_dense(nn.Linear(4, 4), block="2x2")
    for cls in (Int8Linear, SparseInt8Linear):
        for scale in (float("inf"), 1e39, 1e-50):  # the last two overflow or underflow float32
            message = "input_scale: expected a positive float.*but got " + re.escape(repr(scale))
            with pytest.raises(ValueError, match=message):
                cls.from_float(nn.Linear(4, 4), input_scale=scale, input_zero_point=0)
        with pytest.raises(
            ValueError, match=r"input_zero_point: expected an integer in \[0, 255\], but got 1\.5"
        ):
            cls.from_float(nn.Linear(4, 4), input_scale=0.1, input_zero_point=1.5)
        with pytest.raises(
            ValueError, match="weight_scale: expected positive finite scales, but channel 2 has inf"
        ):
            cls.from_float(nn.Linear(4, 4), weight_scale=torch.tensor([0.1, 0.1, float("inf"), 0.1]))
    # An integral float zero point is accepted as that integer.
    module = Int8Linear.from_float(nn.Linear(4, 4), input_scale=0.1, input_zero_point=7.0)
    assert module.input_zero_point.item() == 7


@pytest.mark.parametrize("module_index", [0, 1, 3])
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("weight_scale", 0.0, r"weight_scale\[1\] is 0.0"),
        ("weight_scale", -0.5, r"weight_scale\[1\] is -0.5"),
        ("weight_scale", float("nan"), r"weight_scale\[1\] is nan"),
        ("input_scale", float("inf"), "a positive finite input_scale, but got inf"),
        ("input_zero_point", 300, r"an input_zero_point in \[0, 255\], but got 300"),
    ],
)
def test_int8_modules_reject_invalid_loaded_scales(module_index, key, value, message):
    # The scales from_float checks are checked again when a state dict loads.
    linear = pruned_linear()
    module = build_all(linear)[module_index]
    if key != "weight_scale":
        module = type(module).from_float(linear, **STATIC)
    state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    if key == "weight_scale":
        state[key][1] = value
    else:
        state[key] = torch.tensor(value, dtype=state[key].dtype)
    rebuilt = type(module).from_config(module.extra_config())
    before = {name: tensor.clone() for name, tensor in rebuilt.state_dict().items()}
    with pytest.raises(ValueError, match=f"{type(module).__name__}: expected .*{message}"):
        rebuilt.load_state_dict(state)
    # The check runs before the copy: the failed load leaves the module as it was.
    assert all(torch.equal(tensor, before[name]) for name, tensor in rebuilt.state_dict().items())

    # Inside a model, the message names the layer.
    model = nn.Sequential(nn.ReLU(), rebuilt)
    with pytest.raises(ValueError, match=f"layer '1': {type(module).__name__}: expected .*{message}"):
        model.load_state_dict({f"1.{name}": tensor for name, tensor in state.items()})


# ---------------------------------------------------------------------------------------------
# Conv2d


CONV_GEOMETRIES = [
    {"padding": 1},
    {"stride": 2, "padding": (0, 2)},
    {"dilation": 2, "padding": "same"},
    {"padding": "valid", "bias": False},
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_sparse_conv2d_matches_conv2d(geometry):
    conv = pruned_conv(**geometry)
    module = SparseConv2d.from_dense(conv)
    x = torch.randn(2, 3, 9, 11)
    torch.testing.assert_close(module(x), conv(x), **FLOAT_TOL)


@pytest.mark.parametrize("cls", [Int8Conv2d, SparseInt8Conv2d])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_int8_conv2d_matches_reference(cls, geometry):
    conv = pruned_conv(**geometry)
    module = cls.from_float(conv)
    x = torch.randn(2, 3, 9, 11)
    out = module(x)
    assert out.shape == conv(x).shape
    # The reference: the int8 Linear reference over the unfolded input.
    columns = F.unfold(x, conv.kernel_size, conv.dilation, module.padding, conv.stride).transpose(1, 2)
    q_w, w_scale = reference.quantize_weight_per_channel(conv.weight.reshape(10, -1))
    expected = reference.dynamic_int8_linear(columns.reshape(-1, 27), q_w, w_scale, conv.bias)
    expected = expected.reshape(2, -1, 10).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, expected, **FLOAT_TOL)


def test_pointwise_conv2d():
    conv = nn.Conv2d(8, 4, 1)
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(SparseConv2d.from_dense(conv)(x), conv(x), **FLOAT_TOL)


@pytest.mark.parametrize(
    "build", [Int8Conv2d.from_float, SparseConv2d.from_dense, SparseInt8Conv2d.from_float]
)
def test_deploy_conv2d_round_trip_and_to_float(build):
    conv = pruned_conv(stride=2, padding=1)
    module = build(conv)
    rebuilt = type(module).from_config(json.loads(json.dumps(module.extra_config())))
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(rebuilt(x), module(x))
    restored = module.to_float()
    assert type(restored) is nn.Conv2d
    assert (restored.stride, restored.padding) == ((2, 2), (1, 1))
    assert torch.equal(restored.weight == 0, module.dense_weight().reshape(conv.weight.shape) == 0)


@pytest.mark.parametrize("in_features", [39, 41, 44])
@pytest.mark.parametrize("rows", [1, 3, 6, 12])
def test_deploy_linear_rejects_wrong_input_width(in_features, rows):
    # The kernels pad K to whole groups of 4 (or blocks), so 37 to 40 inputs would all fit a
    # 40-input weight. The module must reject every width but its own.
    for module in build_all(pruned_linear(in_features=40)):
        with pytest.raises(
            ValueError, match=r"in_features = 40, but got shape \((\d+, )?" + str(in_features)
        ):
            module(torch.randn(rows, in_features))


@pytest.mark.parametrize(
    "build", [Int8Conv2d.from_float, SparseConv2d.from_dense, SparseInt8Conv2d.from_float]
)
@pytest.mark.parametrize("channels", [2, 4])
def test_deploy_conv2d_rejects_wrong_channels(build, channels):
    module = build(pruned_conv())
    with pytest.raises(ValueError, match=r"in_channels = 3, but got shape \(1, " + str(channels)):
        module(torch.randn(1, channels, 8, 8))


@pytest.mark.parametrize(
    "build", [Int8Conv2d.from_float, SparseConv2d.from_dense, SparseInt8Conv2d.from_float]
)
def test_deploy_conv2d_rejects_input_smaller_than_kernel(build):
    module = build(pruned_conv(dilation=2))  # a 3x3 kernel with dilation 2 spans 5x5
    assert module(torch.randn(1, 3, 5, 5)).shape == (1, 10, 1, 1)
    with pytest.raises(
        ValueError, match=r"kernel's extent 5x5 after padding \(0, 0\), but got height x width 4x9"
    ):
        module(torch.randn(1, 3, 4, 9))


@pytest.mark.parametrize(
    "build", [Int8Conv2d.from_float, SparseConv2d.from_dense, SparseInt8Conv2d.from_float]
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_deploy_conv2d_rejects_non_float32_input(build, dtype):
    module = build(pruned_conv())
    with pytest.raises(TypeError, match=f"expected a float32 input, but got {dtype}; convert it with"):
        module(torch.ones(1, 3, 8, 8, dtype=dtype))


def test_deploy_conv2d_without_outputs():
    conv = nn.Conv2d(3, 0, 3)
    x = torch.randn(1, 3, 8, 8)
    for module in (
        Int8Conv2d.from_float(conv),
        SparseConv2d.from_dense(conv),
        SparseInt8Conv2d.from_float(conv),
    ):
        assert module(x).shape == (1, 0, 6, 6)


@pytest.mark.parametrize("shape", [(8, 0), (0, 8), (0, 0)])
def test_deploy_linear_empty_layers(shape):
    in_features, out_features = shape
    linear = nn.Linear(in_features, out_features)
    x = torch.randn(3, in_features)
    for module in build_all(linear):
        assert module(x).shape == (3, out_features)
        # With no inputs every output is the bias.
        if in_features == 0:
            assert torch.allclose(module(x), linear.bias.expand(3, -1))
        assert module.to_float().weight.shape == (out_features, in_features)


@pytest.mark.parametrize("module_index", range(5))
def test_deploy_linear_backward_raises(module_index):
    linear = pruned_linear()
    module = build_all(linear)[module_index]
    x = torch.randn(2, 40, requires_grad=True)
    y = module(x)  # forward in grad mode works, with the same values as under no_grad
    with torch.no_grad():
        assert torch.equal(y, module(x))
    with pytest.raises(RuntimeError, match="has no backward: the deploy modules are inference-only"):
        y.sum().backward()
    assert x.grad is None
    # An input that needs no gradient builds no graph.
    assert not module(torch.randn(2, 40)).requires_grad


@pytest.mark.parametrize("module_index", [2, 3, 4])
def test_deploy_linear_rejects_corrupted_state_dict(module_index):
    module = build_all(pruned_linear(in_features=40))[module_index]
    index = "col_idx" if isinstance(module, SparseLinear) else "group_idx"
    limit = 40 if isinstance(module, SparseLinear) else 10
    state = {key: value.clone() for key, value in module.state_dict().items()}
    owner = type(module).__name__
    rebuilt = type(module).from_config(module.extra_config())
    before = {name: tensor.clone() for name, tensor in rebuilt.state_dict().items()}

    bad = dict(state, **{index: state[index].clone()})
    bad[index][-1] = limit
    with pytest.raises(
        ValueError,
        match=f"{owner}: expected every index in {index} to be below {limit}, but {index} contains {limit}",
    ):
        rebuilt.load_state_dict(bad)
    bad = dict(state, row_ptr=state["row_ptr"].clone())
    bad["row_ptr"][1] = bad["row_ptr"][2] + 1
    with pytest.raises(ValueError, match=f"{owner}: expected a non-decreasing row_ptr, but row_ptr\\[1\\]"):
        rebuilt.load_state_dict(bad)
    bad = dict(state, row_ptr=state["row_ptr"].clone())
    bad["row_ptr"][-1] -= 1
    with pytest.raises(ValueError, match=f"{owner}: expected row_ptr to run from 0 to the number of blocks"):
        rebuilt.load_state_dict(bad)
    # The checks run before the copy: the rejected loads left the module as it was.
    assert all(torch.equal(tensor, before[name]) for name, tensor in rebuilt.state_dict().items())

    # A good state dict still loads into the same module, and the result is unchanged.
    rebuilt.load_state_dict(state)
    x = torch.randn(3, 40)
    assert torch.equal(rebuilt(x), module(x))

    # A module whose buffers were changed in place reports the index in to_float() too.
    module._buffers[index][0] = limit + 5
    with pytest.raises(ValueError, match=f"{index} to be below {limit}, but {index} contains {limit + 5}"):
        module.to_float()


@pytest.mark.parametrize("module_index", [0, 2, 3])
def test_deploy_linear_rejects_overflowing_values(module_index):
    # load_state_dict casts into the buffer's dtype: out-of-range values must not wrap silently.
    module = build_all(pruned_linear(in_features=40))[module_index]
    key = {0: "weight", 2: "col_idx", 3: "group_idx"}[module_index]
    owner = type(module).__name__
    state = {name: value.clone() for name, value in module.state_dict().items()}
    wide = state[key].to(torch.int32)
    rebuilt = type(module).from_config(module.extra_config())

    # A wider dtype with values that fit loads, and the layer is unchanged.
    rebuilt.load_state_dict(dict(state, **{key: wide}))
    x = torch.randn(3, 40)
    assert torch.equal(rebuilt(x), module(x))

    too_large = wide.clone()
    too_large.view(-1)[0] = 65536 + 7 if key != "weight" else 300
    with pytest.raises(
        ValueError, match=f"{owner}: {key} contains {too_large.view(-1)[0].item()}, which its"
    ):
        rebuilt.load_state_dict(dict(state, **{key: too_large}))
    fractional = dict(state, row_ptr=state["row_ptr"].double() + 0.5) if key != "weight" else None
    if fractional is not None:
        with pytest.raises(ValueError, match=f"{owner}: row_ptr contains 0.5"):
            rebuilt.load_state_dict(fractional)

    # Inside a model, the error names the layer as the other load errors do.
    model = nn.Sequential(nn.ReLU(), rebuilt)
    model_state = {f"1.{name}": value for name, value in state.items()}
    model_state[f"1.{key}"] = too_large
    with pytest.raises(ValueError, match=f"^layer '1': {owner}: {key} contains"):
        model.load_state_dict(model_state)
    assert torch.equal(rebuilt(x), module(x))


def test_conv2d_rejects_unsupported():
    with pytest.raises(ValueError, match="groups=1"):
        Int8Conv2d.from_float(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="same"):
        SparseInt8Conv2d.from_float(nn.Conv2d(4, 4, 2, padding="same"))
    with pytest.raises(TypeError, match=r"nn\.Conv2d"):
        Int8Conv2d.from_float(nn.Linear(4, 4))


def test_deploy_modules_listed():
    assert set(DEPLOY_MODULES) == {
        Int8Linear,
        SparseLinear,
        SparseInt8Linear,
        Int8Conv2d,
        SparseConv2d,
        SparseInt8Conv2d,
    }


# ---------------------------------------------------------------------------------------------
# Graphs


class TwoLayers(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.int8 = Int8Linear.from_float(linear, **STATIC)
        self.sparse = SparseLinear.from_dense(nn.Linear(24, 24))
        self.sparse_int8 = SparseInt8Linear.from_float(pruned_linear(24, 16, seed=1))

    def forward(self, x):
        return self.sparse_int8(self.sparse(self.int8(x)))


OUR_OPS = {
    "weightlight.int8_linear.default",
    "weightlight.sparse_linear.default",
    "weightlight.sparse_int8_linear.default",
}


def graph_ops(graph):
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


def test_deploy_modules_compile_fullgraph():
    model = TwoLayers(pruned_linear())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(3, 40)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), model(x))
    names = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert {"weightlight.int8_linear", "weightlight.sparse_linear", "weightlight.sparse_int8_linear"} <= {
        name.removesuffix(".default") for name in names
    }


def test_deploy_modules_export():
    model = TwoLayers(pruned_linear())
    x = torch.randn(3, 40)
    exported = torch.export.export(model, (x,))
    assert OUR_OPS <= graph_ops(exported.graph)
    assert torch.equal(exported.module()(x), model(x))


ROOT_MODULES = {
    "Int8Linear": lambda bias: Int8Linear.from_float(pruned_linear(bias=bias)),
    "Int8Linear static": lambda bias: Int8Linear.from_float(pruned_linear(bias=bias), **STATIC),
    "SparseLinear": lambda bias: SparseLinear.from_dense(pruned_linear(bias=bias)),
    "SparseInt8Linear": lambda bias: SparseInt8Linear.from_float(pruned_linear(bias=bias)),
    "Int8Conv2d": lambda bias: Int8Conv2d.from_float(pruned_conv(bias=bias)),
    "SparseConv2d": lambda bias: SparseConv2d.from_dense(pruned_conv(bias=bias)),
    "SparseInt8Conv2d": lambda bias: SparseInt8Conv2d.from_float(pruned_conv(bias=bias)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(ROOT_MODULES))
def test_deploy_module_exports_as_root(name, bias):
    # Exported on its own, so that the module's buffers, None ones included, are the program's.
    module = ROOT_MODULES[name](bias)
    x = torch.randn(3, 40) if "Linear" in name else torch.randn(2, 3, 7, 7)
    exported = torch.export.export(module, (x,))
    assert torch.equal(exported.module()(x), module(x))


# ---------------------------------------------------------------------------------------------
# Kernel choice


def test_choose_kernel_from_zeros():
    dense = torch.randn(256, 256)
    sparse = dense * (torch.rand(256, 256) > 0.95)
    assert choose_kernel(dense) == "dense"
    assert choose_kernel(sparse) == "sparse"
    assert choose_kernel(dense, quantized=True) == "int8"
    blocks = dense * (torch.rand(256, 64) > 0.9).repeat_interleave(4, 1)
    assert choose_kernel(blocks, quantized=True, batch_rows=32) == "sparse_int8"
    assert choose_kernel(torch.randn(8, 3, 3, 3)) == "dense"


def test_choose_kernel_measured():
    sparse = torch.randn(512, 512) * (torch.rand(512, 512) > 0.97)
    assert choose_kernel(sparse, batch_rows=8, measure=True) in ("dense", "sparse")
    assert choose_kernel(sparse, measure=True, quantized=True) in ("int8", "sparse_int8")


def test_choose_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_rows"):
        choose_kernel(torch.randn(4, 4), batch_rows=0)
    with pytest.raises(TypeError, match="weight"):
        choose_kernel(torch.randn(4))


@pytest.mark.parametrize("kernel", ["dense", "int8", "sparse", "sparse_int8"])
def test_build_deploy_module(kernel):
    for layer in (pruned_linear(), pruned_conv(padding=1)):
        module = build_deploy_module(layer, kernel)
        x = torch.randn(2, 40) if isinstance(layer, nn.Linear) else torch.randn(1, 3, 6, 6)
        assert module(x).shape == layer(x).shape
        if kernel == "dense":
            assert type(module) is type(layer)
            assert module is not layer
        else:
            assert module.kernel == kernel
    with pytest.raises(ValueError, match="kernel"):
        build_deploy_module(pruned_linear(), "fast")


def test_layers_scalar_isa():
    linear = pruned_linear(sparsity=0.8)
    x = torch.randn(5, 40)
    expected = [module(x) for module in build_all(linear)]
    ops.set_isa("scalar")
    try:
        got = [module(x) for module in build_all(linear)]
    finally:
        ops.set_isa("auto")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **FLOAT_TOL)


def test_isa_environment_override_forces_scalar(python_executable):
    script = (
        "import torch\n"
        "from torch import nn\n"
        "from lightning_weightlight.kernels import SparseInt8Linear, active_isa, reference\n"
        "torch.manual_seed(0)\n"
        "linear = nn.Linear(30, 12)\n"
        "module = SparseInt8Linear.from_float(linear)\n"
        "x = torch.randn(5, 30)\n"
        "q_w, w_scale = reference.quantize_weight_per_channel(linear.weight)\n"
        "expected = reference.dynamic_int8_linear(x, q_w, w_scale, linear.bias)\n"
        "torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)\n"
        "print(active_isa())\n"
    )
    env = {**os.environ, "WEIGHTLIGHT_ISA": "scalar", "WEIGHTLIGHT_REQUIRE_CPP": "1"}
    result = subprocess.run(
        [python_executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "scalar"
