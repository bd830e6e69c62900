"""compress() on the real deploy modules, and exact save/load round trips of every deploy layer."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from lightning_weightlight.demo import DigitsCNN, DigitsMLP
from lightning_weightlight.export import CompressionError, compress, load_compressed, save_compressed
from lightning_weightlight.kernels import layers


def pruned_linear(in_features: int, out_features: int, sparsity: float, seed: int = 0) -> nn.Linear:
    """A Linear layer whose smallest 1x4 blocks are zero, as block pruning leaves it."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        blocks = linear.weight.reshape(out_features, -1, 4)
        norms = blocks.abs().sum(dim=2)
        cut = norms.flatten().kthvalue(max(1, int(sparsity * norms.numel()))).values
        blocks.mul_((norms > cut).unsqueeze(-1).float())
    return linear


def pruned_conv(in_channels: int, out_channels: int, sparsity: float, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) >= sparsity).float())
    return conv


DEPLOY_BUILDERS = {
    "Int8Linear": lambda: layers.Int8Linear.from_float(pruned_linear(32, 16, 0.0)),
    "Int8Linear-static": lambda: layers.Int8Linear.from_float(
        pruned_linear(32, 16, 0.0), input_scale=0.05, input_zero_point=120
    ),
    "SparseLinear": lambda: layers.SparseLinear.from_dense(pruned_linear(32, 16, 0.75)),
    "SparseInt8Linear": lambda: layers.SparseInt8Linear.from_float(pruned_linear(32, 16, 0.75)),
    "SparseInt8Linear-static": lambda: layers.SparseInt8Linear.from_float(
        pruned_linear(32, 16, 0.75), input_scale=0.05, input_zero_point=120
    ),
    "Int8Conv2d": lambda: layers.Int8Conv2d.from_float(pruned_conv(4, 8, 0.0)),
    "SparseConv2d": lambda: layers.SparseConv2d.from_dense(pruned_conv(4, 8, 0.8)),
    "SparseInt8Conv2d": lambda: layers.SparseInt8Conv2d.from_float(pruned_conv(4, 8, 0.8)),
}


class Holder(nn.Module):
    """A user's model whose one layer is replaced by a deploy module."""

    def __init__(self, conv: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.layer = nn.Conv2d(4, 8, 3, padding=1) if conv else nn.Linear(32, 16)
        self.norm = nn.BatchNorm2d(8) if conv else nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer(x))


@pytest.mark.parametrize("kind", list(DEPLOY_BUILDERS))
def test_deploy_layer_round_trip_exact(tmp_path, kind):
    is_conv = "Conv" in kind
    model = Holder(conv=is_conv)
    model.layer = DEPLOY_BUILDERS[kind]()
    model.eval()
    path = save_compressed(model, tmp_path / "model.safetensors")

    loaded = load_compressed(path, model=Holder(conv=is_conv))

    assert type(loaded.layer) is type(model.layer)
    assert loaded.layer.extra_config() == model.layer.extra_config()
    assert loaded.layer.sparsity == model.layer.sparsity
    torch.manual_seed(1)
    inputs = torch.randn(3, 4, 6, 6) if is_conv else torch.randn(5, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(inputs), model(inputs))


def test_compress_picks_kernels_from_zeros():
    model = nn.Sequential(pruned_linear(64, 32, 0.9), nn.ReLU(), pruned_linear(32, 8, 0.0, seed=1))

    compressed = compress(model)

    assert type(compressed[0]) is layers.SparseInt8Linear
    assert compressed[0].sparsity >= 0.89
    assert type(compressed[2]) is layers.Int8Linear
    assert type(model[0]) is nn.Linear  # the input model is not changed


def test_compress_without_quantize_keeps_float_kernels():
    model = nn.Sequential(pruned_linear(64, 32, 0.9), nn.ReLU(), pruned_linear(32, 8, 0.0, seed=1))

    compressed = compress(model, quantize=False)

    assert type(compressed[0]) is layers.SparseLinear
    assert compressed[0].bits == 32
    assert type(compressed[2]) is nn.Linear  # no zeros to exploit: the dense float kernel stays
    inputs = torch.randn(4, 64)
    with torch.inference_mode():
        torch.testing.assert_close(compressed(inputs), model(inputs), rtol=1e-5, atol=1e-5)


def test_compress_measured_choice_converts_every_layer():
    model = nn.Sequential(pruned_linear(64, 32, 0.9), nn.ReLU(), pruned_linear(32, 8, 0.0, seed=1))

    compressed = compress(model, measure=True, batch_rows=4)

    assert type(compressed[0]) in (layers.Int8Linear, layers.SparseInt8Linear)
    assert type(compressed[2]) in (layers.Int8Linear, layers.SparseInt8Linear)


def test_compress_include_exclude():
    model = DigitsMLP(hidden=(32, 16)).eval()

    compressed = compress(model, include="features.*", exclude="features.4")

    assert type(compressed.features[1]) is layers.Int8Linear
    assert type(compressed.features[4]) is nn.Linear
    assert type(compressed.classifier) is nn.Linear


class ScaledLinear(nn.Linear):
    """A user's Linear subclass with its own forward, which compress cannot know how to convert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def test_compress_warns_and_names_layers_left_in_float():
    model = nn.Sequential(nn.Linear(8, 8), ScaledLinear(8, 8), nn.Conv2d(2, 2, 1, groups=2))

    with pytest.warns(UserWarning) as records:
        compressed = compress(model)

    messages = [str(record.message) for record in records]
    assert any(re.search(r"layer '1' stays in float: ScaledLinear", message) for message in messages)
    assert any(re.search(r"layer '2' stays in float: .*groups=2", message) for message in messages)
    assert type(compressed[0]) is layers.Int8Linear
    assert type(compressed[1]) is ScaledLinear
    assert type(compressed[2]) is nn.Conv2d


def test_compress_strict_raises_for_unconvertible_layer():
    model = nn.Sequential(nn.Linear(8, 8), ScaledLinear(8, 8))

    with pytest.raises(CompressionError, match="layer '1' stays in float"):
        compress(model, strict=True)


def test_compress_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        compress("model")
    with pytest.raises(ValueError, match="batch_rows: expected a positive integer, but got 0"):
        compress(nn.Linear(4, 4), batch_rows=0)


def test_compressed_cnn_round_trip_from_class_path(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(channels=(8, 16), hidden=32).eval()
    compressed = compress(model)
    path = save_compressed(compressed, tmp_path / "cnn.safetensors")

    loaded = load_compressed(path)

    assert type(loaded.features[0].conv) is layers.Int8Conv2d
    images = torch.randn(6, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(images), compressed(images))
        torch.testing.assert_close(loaded(images), model(images), atol=0.05, rtol=0.05)


def test_compress_converts_qat_model_with_learned_scales():
    from lightning_weightlight.quantization import prepare_qat

    torch.manual_seed(0)
    model = DigitsMLP(hidden=(32,))
    prepare_qat(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))  # the observers record activation ranges
    model.eval()

    compressed = compress(model)

    deploy = [module for module in compressed.modules() if isinstance(module, layers.Int8Linear)]
    assert len(deploy) == 2
    assert all(module.static_input for module in deploy)
    images = torch.randn(8, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(compressed(images), model(images), atol=0.05, rtol=0.05)


def test_compress_distillation_module_returns_student():
    from lightning_weightlight.distillation.module import DistillationModule

    student = DigitsCNN(channels=(8, 16), hidden=16)
    module = DistillationModule(student, DigitsCNN(channels=(8, 16), hidden=32))

    compressed = compress(module)

    assert type(compressed) is DigitsCNN
    assert type(compressed.classifier[0]) is layers.Int8Linear
    assert type(student.classifier[0]) is nn.Linear


def test_compress_inplace_changes_model():
    model = nn.Sequential(nn.Linear(8, 8))
    original = copy.deepcopy(model)

    compressed = compress(model, inplace=True)

    assert compressed is model
    assert type(model[0]) is layers.Int8Linear
    assert type(original[0]) is nn.Linear


def test_structurally_pruned_model_round_trip(make_trainer, tmp_path):
    from lightning_weightlight.demo import DigitsDataModule
    from lightning_weightlight.pruning.structured import StructuredPruning

    torch.manual_seed(0)
    model = DigitsCNN(channels=(8, 16, 16), hidden=16)
    trainer = make_trainer(
        max_steps=2, limit_val_batches=0, callbacks=[StructuredPruning(amount=0.5, ignore_head=True)]
    )
    trainer.fit(model, DigitsDataModule())
    model.eval()
    assert model.features[0].conv.out_channels == 4  # the constructor built 8

    compressed = compress(model)
    loaded = load_compressed(save_compressed(compressed, tmp_path / "structured.safetensors"))

    assert loaded.features[0].conv.out_channels == 4
    assert loaded.features[0].bn.num_features == 4
    assert loaded.classifier[0].in_features == model.classifier[0].in_features
    images = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(images), compressed(images))
