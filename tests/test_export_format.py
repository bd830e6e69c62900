"""The compressed file format: exact round trips, atomic writes, and rejection of bad files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from lightning_weightlight.demo import DigitsCNN, DigitsMLP
from lightning_weightlight.export import (
    FORMAT_VERSION,
    CompressedFileError,
    load_compressed,
    read_metadata,
    save_compressed,
)
from lightning_weightlight.export.modules import TORCH_LAYERS, build_module, describe_module
from lightning_weightlight.export.serialization import METADATA_KEY, _tensor_digest


class TwoTower(nn.Module):
    """A user's plain module without hyperparameters and with one weight shared by two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 8))
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens)))


def rewrite_document(path: Path, change, drop_tensors: tuple[str, ...] = ()) -> None:
    """Rewrite the metadata of a saved file with ``change(document)`` and a matching digest."""
    data = path.read_bytes()
    tensors = safetensors.torch.load(data)
    for name in drop_tensors:
        del tensors[name]
    document = read_metadata(path)
    del document["sha256"]
    change(document)
    document["sha256"] = _tensor_digest(document, tensors)
    path.write_bytes(safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(document)}))


def test_lightning_module_rebuilds_from_hparams(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(channels=(8, 16), hidden=32).eval()
    path = save_compressed(model, tmp_path / "cnn.safetensors")

    loaded = load_compressed(path)

    assert type(loaded) is DigitsCNN
    assert loaded.hparams.channels == [8, 16]
    assert not loaded.training
    images = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(images), model(images))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_metadata_records_versions_and_layers(tmp_path):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors", metadata={"run": "a"})

    document = read_metadata(path)

    assert document["format_version"] == FORMAT_VERSION
    assert document["package_version"] == "0.1.0"
    assert document["model"]["class_path"] == "lightning_weightlight.demo.models.DigitsMLP"
    assert document["user"] == {"run": "a"}
    layers = {entry["name"]: entry for entry in document["model"]["modules"]}
    assert layers["features.1"] == {
        "name": "features.1",
        "class": "Linear",
        "config": {"in_features": 64, "out_features": 16, "bias": True},
    }
    assert len(document["sha256"]) == 64


def test_reshaped_layers_rebuild_from_records(tmp_path):
    # Shapes that differ from the constructor's, as structured pruning leaves them.
    torch.manual_seed(0)
    model = DigitsCNN(channels=(8, 16), hidden=32).eval()
    model.features[0].conv = nn.Conv2d(1, 5, 3, padding=1, bias=False)
    model.features[0].bn = nn.BatchNorm2d(5)
    model.features[1].conv = nn.Conv2d(5, 16, 3, padding=1, bias=False)
    model.classifier[0] = nn.Linear(256, 20)
    model.classifier[3] = nn.Linear(20, 10)
    model.eval()
    path = save_compressed(model, tmp_path / "pruned.safetensors")

    loaded = load_compressed(path)

    assert loaded.features[0].conv.out_channels == 5
    assert loaded.classifier[0].out_features == 20
    images = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(images), model(images))


def test_plain_module_loads_into_given_model(tmp_path):
    torch.manual_seed(0)
    model = TwoTower().eval()
    path = save_compressed(model, tmp_path / "tower.safetensors")

    assert read_metadata(path)["model"]["init_args"] is None
    with pytest.raises(CompressedFileError, match="pass model="):
        load_compressed(path)
    loaded = load_compressed(path, model=TwoTower())

    tokens = torch.randint(0, 20, (4, 6))
    assert torch.equal(loaded(tokens), model(tokens))
    # The rebuilt layers share the weight again, as the saved model did.
    assert loaded.head.weight is loaded.embed.weight
    assert len(list(loaded.parameters())) == len(list(model.parameters()))


def test_shared_buffer_shared_after_load(tmp_path):
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4)).eval()
    model[0].running_mean.uniform_()
    model[1].running_mean = model[0].running_mean

    loaded = load_compressed(
        save_compressed(model, tmp_path / "model.safetensors"),
        model=nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4)),
    )

    assert loaded[1].running_mean is loaded[0].running_mean
    assert torch.equal(loaded[0].running_mean, model[0].running_mean)


def test_shared_weight_stored_once(tmp_path):
    path = save_compressed(TwoTower(), tmp_path / "tower.safetensors")

    stored = safetensors.torch.load(path.read_bytes())

    assert read_metadata(path)["aliases"] == {"head.weight": "embed.weight"}
    assert "head.weight" not in stored


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_file_rejected(tmp_path, keep):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])

    with pytest.raises(CompressedFileError, match=r"truncated|too short"):
        load_compressed(path)


def test_byte_edit_in_tensors_rejected(tmp_path):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(CompressedFileError, match="SHA-256 digest"):
        load_compressed(path)


def test_byte_edit_in_metadata_rejected(tmp_path):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")
    data = path.read_bytes()
    edited = data.replace(b'\\"out_features\\": 16', b'\\"out_features\\": 17', 1)
    assert edited != data
    path.write_bytes(edited)

    with pytest.raises(CompressedFileError, match="SHA-256 digest"):
        load_compressed(path)


def test_newer_format_version_rejected(tmp_path):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")
    rewrite_document(path, lambda document: document.update(format_version=FORMAT_VERSION + 1))

    with pytest.raises(CompressedFileError, match=f"format version {FORMAT_VERSION + 1}.*upgrade"):
        load_compressed(path)


class PickleBomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_payload_never_executed(tmp_path, writer):
    marker = tmp_path / "executed"
    path = tmp_path / "model.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(PickleBomb(marker)))
    else:
        torch.save({"state": PickleBomb(marker)}, path)

    with pytest.raises(CompressedFileError):
        load_compressed(path)
    assert not marker.exists()


def test_plain_safetensors_file_rejected(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, path)

    with pytest.raises(CompressedFileError, match="without the 'weightlight' metadata"):
        load_compressed(path)


def test_class_outside_allow_list_rejected(tmp_path):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")

    def swap_class(document):
        document["model"]["modules"][0]["class"] = "builtins.eval"

    rewrite_document(path, swap_class)

    with pytest.raises(ValueError, match=r"expected a class from .*'builtins\.eval'"):
        load_compressed(path)


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("subprocess.Popen", "expected an nn.Module subclass"),
        ("weightlight_never_imported_module.Model", "neither imported nor under trusted_modules"),
    ],
)
def test_model_class_path_restricted(tmp_path, class_path, message):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")
    rewrite_document(path, lambda document: document["model"].update(class_path=class_path))

    with pytest.raises(CompressedFileError, match=message):
        load_compressed(path)
    assert "weightlight_never_imported_module" not in sys.modules


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_compressed(DigitsMLP(hidden=(16,)), path)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_compressed(DigitsMLP(hidden=(32,)), path)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_invalid_sparse_index_rejected_with_path(tmp_path, monkeypatch):
    from lightning_weightlight.export import serialization
    from lightning_weightlight.kernels import SparseLinear

    linear = nn.Linear(16, 4)
    with torch.no_grad():
        linear.weight.mul_(torch.arange(64).reshape(4, 16) % 2)
    model = nn.Sequential(nn.ReLU(), SparseLinear.from_dense(linear))
    model[1].col_idx[0] = 16
    path = tmp_path / "bad.safetensors"

    # save_compressed checks the deploy layers first and writes nothing for a damaged one.
    message = r"save_compressed: the stored tensors of layer '1' are invalid, so nothing was written: .* 16"
    with pytest.raises(ValueError, match=message):
        save_compressed(model, path)
    assert not path.exists()

    # A file written without that check (an older version) has a valid digest but an index out of
    # range: the load names the file and the layer.
    monkeypatch.setattr(serialization, "_unloadable_layer", lambda model: None)
    save_compressed(model, path)
    monkeypatch.undo()
    message = r"bad\.safetensors: the stored tensors are invalid: layer '1': SparseLinear: .* 16"
    skeleton = nn.Sequential(nn.ReLU(), nn.Linear(16, 4))
    before = _snapshot(skeleton)
    with pytest.raises(CompressedFileError, match=message):
        load_compressed(path, model=skeleton)
    _assert_unchanged(skeleton, before)


class ScaledMLP(nn.Module):
    """A user's module with a parameter of its own, outside any recorded layer."""

    def __init__(self, width: int = 4, extra_layer: bool = False, scale: float = 2.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        if extra_layer:
            self.body.append(nn.Linear(4, 2))
        self.scale = nn.Parameter(torch.full((width,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def _without_last_layer() -> ScaledMLP:
    model = ScaledMLP()
    del model.body[2]
    return model


def _without_body() -> ScaledMLP:
    model = ScaledMLP()
    model.body = None
    return model


def _mlp_with_failing_hook() -> ScaledMLP:
    """A skeleton whose own load hook raises after every tensor has been copied into it."""

    def fail_load(module: nn.Module, incompatible_keys) -> None:
        raise RuntimeError("the model's hook failed")

    model = ScaledMLP(scale=5.0)
    model.register_load_state_dict_post_hook(fail_load)
    return model


def _snapshot(model: nn.Module) -> tuple[dict[str, nn.Module | None], dict[str, torch.Tensor]]:
    modules = dict(model.named_modules())
    return modules, {key: value.clone() for key, value in model.state_dict().items()}


def _assert_unchanged(
    model: nn.Module, before: tuple[dict[str, nn.Module | None], dict[str, torch.Tensor]]
) -> None:
    modules, tensors = before
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(module is modules[name] for name, module in model.named_modules())
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[key], tensors[key]) for key in tensors)


@pytest.mark.parametrize(
    "skeleton, message",
    [
        (
            lambda: ScaledMLP(extra_layer=True),
            r"the model has tensors that the file lacks: \['body\.3\.bias', 'body\.3\.weight'\]",
        ),
        (lambda: ScaledMLP(width=5), r"scale has shape \(4,\) in the file and \(5,\) in the model"),
        (
            lambda: nn.Sequential(nn.Linear(16, 16)),
            r"records layer 'body\.0' \(Linear\), but the model has no module there; pass an instance",
        ),
        (
            _without_last_layer,
            r"records layer 'body\.2' \(SparseLinear\), but the model has no module there",
        ),
        (_without_body, r"records layer 'body\.0' \(Linear\), but the model has no module there"),
        (
            _mlp_with_failing_hook,
            r"loading the stored tensors into the model failed: the model's hook failed",
        ),
    ],
    ids=[
        "extra_layer",
        "other_shape",
        "other_architecture",
        "missing_layer",
        "attribute_none",
        "hook_raises",
    ],
)
def test_failed_load_leaves_given_model_unchanged(tmp_path, skeleton, message):
    from lightning_weightlight.kernels import SparseLinear

    torch.manual_seed(0)
    model = ScaledMLP()
    model.body[2] = SparseLinear.from_dense(model.body[2])
    path = save_compressed(model.eval(), tmp_path / "scaled.safetensors")
    target = skeleton()
    before = _snapshot(target)

    with pytest.raises(CompressedFileError, match=message):
        load_compressed(path, model=target)
    _assert_unchanged(target, before)

    # The model the file was saved from loads, with the recorded deploy layer in place.
    loaded = load_compressed(path, model=ScaledMLP())
    x = torch.randn(3, 16)
    assert isinstance(loaded.body[2], SparseLinear)
    assert torch.equal(loaded(x), model(x))


def test_interrupted_load_leaves_given_model_unchanged(tmp_path):
    def interrupt(module: nn.Module, incompatible_keys) -> None:
        raise KeyboardInterrupt

    path = save_compressed(ScaledMLP().eval(), tmp_path / "scaled.safetensors")
    target = ScaledMLP(scale=5.0)
    target.register_load_state_dict_post_hook(interrupt)
    before = _snapshot(target)

    with pytest.raises(KeyboardInterrupt):
        load_compressed(path, model=target)
    _assert_unchanged(target, before)


class WithProperty(nn.Sequential):
    """A model with a property that raises, as LightningModule.trainer does outside a Trainer."""

    @property
    def trainer(self) -> None:
        raise RuntimeError("not attached to a Trainer")


def test_recorded_name_of_property_rejected(tmp_path):
    path = save_compressed(WithProperty(nn.Linear(4, 2)), tmp_path / "model.safetensors")
    entry = {"name": "trainer", "class": "Identity", "config": {}}
    rewrite_document(path, lambda document: document["model"]["modules"].append(entry))

    with pytest.raises(
        CompressedFileError, match=r"records layer 'trainer' \(Identity\), but the model has no"
    ):
        load_compressed(path, model=WithProperty(nn.Linear(4, 2)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda document: document.pop("model"), r"the metadata does not describe the model"),
        (lambda document: document["model"].update(modules=5), r"the metadata does not describe the model"),
        (lambda document: document.update(aliases={"x": 3}), r"the metadata does not describe the model"),
        (
            lambda document: document.update(aliases={"2.weight": "nope"}),
            r"tensor '2\.weight' is stored as 'nope', which the file lacks",
        ),
        (
            lambda document: document["model"]["modules"][0]["config"].update(
                in_features=200_000, out_features=200_000
            ),
            r"layer '0' do not fit .* weight has shape \(16, 16\) in the file and \(200000, 200000\) in the "
            r"recorded layer",
        ),
        (
            lambda document: document["model"]["modules"][0]["config"].update(device="meta"),
            r"cannot build layer '0': module description: unexpected arguments \['device'\] for Linear",
        ),
        (
            lambda document: document["model"]["modules"][0].update({"class": ["Linear"]}),
            r"cannot build layer '0': module description: expected a class name, but got \['Linear'\]",
        ),
        (
            lambda document: document["model"]["modules"].append(
                {"name": "0.inner", "class": "Identity", "config": {}}
            ),
            r"the recorded layer '0\.inner' is nested in another recorded layer",
        ),
        (
            lambda document: document["model"]["modules"][0].update(
                {
                    "class": "Embedding",
                    "config": {"num_embeddings": 16, "embedding_dim": 16, "padding_idx": 50},
                }
            ),
            r"cannot build layer '0': Padding_idx must be within num_embeddings",
        ),
        (
            lambda document: document["model"]["modules"][0].update(
                {"class": "GroupNorm", "config": {"num_groups": 0, "num_channels": 16}}
            ),
            r"cannot build layer '0': ",
        ),
    ],
    ids=[
        "no_model",
        "modules_not_list",
        "alias_not_name",
        "alias_missing",
        "huge_layer",
        "device",
        "class_not_name",
        "nested",
        "bad_padding_idx",
        "zero_groups",
    ],
)
def test_inconsistent_metadata_rejected(tmp_path, change, message):
    # Each file carries a valid digest, which only shows that nothing changed after writing.
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    path = save_compressed(model, tmp_path / "model.safetensors")
    rewrite_document(path, change)
    skeleton = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    before = _snapshot(skeleton)

    with pytest.raises(CompressedFileError, match=message):
        load_compressed(path, model=skeleton)
    _assert_unchanged(skeleton, before)


@pytest.mark.parametrize("kind", ["Linear", "Int8Linear"])
def test_forged_layer_size_not_allocated(tmp_path, kind):
    from lightning_weightlight.kernels import Int8Linear

    layer = nn.Linear(16, 16) if kind == "Linear" else Int8Linear.from_float(nn.Linear(16, 16))
    path = save_compressed(nn.Sequential(layer), tmp_path / "model.safetensors")
    config = {"in_features": 200_000, "out_features": 200_000}
    # With the weight left out of the file too, only the recorded config gives the size.
    rewrite_document(
        path, lambda document: document["model"]["modules"][0]["config"].update(config), ("0.weight",)
    )

    with pytest.raises(
        CompressedFileError,
        match=r"layer '0' do not fit .*: the recorded layer has tensors that the file lacks: \['weight'\]",
    ):
        load_compressed(path, model=nn.Sequential(nn.Linear(16, 16)))


@pytest.mark.parametrize(
    "class_path, message",
    [
        (None, r"expected the model's class path \(module\.Class\), but got None"),
        (
            "lightning_weightlight.nope.Model",
            r"cannot import 'lightning_weightlight\.nope'.*install the package",
        ),
    ],
)
def test_unusable_class_path_rejected(tmp_path, class_path, message):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")
    rewrite_document(path, lambda document: document["model"].update(class_path=class_path))

    with pytest.raises(CompressedFileError, match=f"mlp\\.safetensors: .*{message}"):
        load_compressed(path)


def test_format_version_must_be_integer(tmp_path):
    path = save_compressed(DigitsMLP(hidden=(16,)), tmp_path / "mlp.safetensors")
    rewrite_document(path, lambda document: document.update(format_version=True))

    with pytest.raises(CompressedFileError, match="expected a positive integer format_version, but got True"):
        load_compressed(path)


def test_load_arguments_checked(tmp_path):
    path = save_compressed(nn.Sequential(nn.Linear(4, 2)), tmp_path / "model.safetensors")

    with pytest.raises(TypeError, match=r"model: expected an nn\.Module instance .* the class Sequential"):
        load_compressed(path, model=nn.Sequential)
    with pytest.raises(TypeError, match=r"model: expected an nn\.Module instance .* a str; pass an instance"):
        load_compressed(path, model="MyModel")
    with pytest.raises(TypeError, match=r"trusted_modules: .* the string 'mymodel'; pass \['mymodel'\]"):
        load_compressed(path, trusted_modules="mymodel")
    with pytest.raises(TypeError, match=r"trusted_modules: expected a list of module names, but got None"):
        load_compressed(path, trusted_modules=None)
    with pytest.raises(TypeError, match=r"save_compressed: metadata: expected JSON-serialisable values"):
        save_compressed(
            nn.Sequential(nn.Linear(4, 2)), tmp_path / "other.safetensors", metadata={"a": object()}
        )
    other = tmp_path / "other.safetensors"
    with pytest.raises(TypeError, match=r"save_compressed: metadata: expected JSON-serialisable values"):
        save_compressed(nn.Sequential(nn.Linear(4, 2)), other, metadata={"a": float("nan")})
    with pytest.raises(TypeError, match=r"save_compressed: metadata: expected a mapping, but got list"):
        save_compressed(nn.Sequential(nn.Linear(4, 2)), other, metadata=[1, 2])
    with pytest.raises(TypeError, match=r"save_compressed: init_args: expected JSON-serialisable values"):
        save_compressed(nn.Sequential(nn.Linear(4, 2)), other, init_args={"p": Path(".")})
    assert not other.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("weight", r"size mismatch for weight"),
        ("weight_dtype", r"weight contains 300\.0, which its torch\.int8 buffer cannot hold"),
        ("bias", r"size mismatch for bias"),
    ],
)
def test_save_rejects_layer_that_would_not_load(tmp_path, damage, message):
    from lightning_weightlight.kernels import Int8Linear

    model = nn.Sequential(nn.Linear(15, 15), Int8Linear.from_float(nn.Linear(15, 8)))
    layer = model[1]
    if damage == "weight":
        layer.weight = torch.zeros(8, 14, dtype=torch.int8)
    elif damage == "weight_dtype":
        layer.weight = torch.full((8, 15), 300.0)
    else:
        layer.bias = torch.zeros(5)
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match=f"(?s)layer '1' are invalid, so nothing was written: .*{message}"):
        save_compressed(model, path)
    assert not path.exists()


def test_header_length_beyond_file_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")

    with pytest.raises(CompressedFileError, match="not a lightning-weightlight compressed file"):
        load_compressed(path)


def test_invalid_tensor_entry_rejected(tmp_path):
    header = json.dumps({"weight": {"dtype": "F32", "shape": [1]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)

    with pytest.raises(CompressedFileError, match="invalid tensor entry"):
        load_compressed(path)


def test_unconverted_qat_layer_rejected_at_save(tmp_path):
    from lightning_weightlight.quantization import prepare_qat

    model = DigitsMLP(hidden=(16,))
    prepare_qat(model)

    with pytest.raises(
        TypeError, match=r"layer 'features\.1' \(QATLinear\) is a training module.*run compress\(\) first"
    ):
        save_compressed(model, tmp_path / "qat.safetensors")
    assert not (tmp_path / "qat.safetensors").exists()


def test_saved_file_mode_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_compressed(DigitsMLP(hidden=[16]), tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(3, 4, bias=False),
        nn.Conv1d(2, 4, 3),
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
        nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"),
        nn.Conv3d(2, 2, 1),
        nn.BatchNorm1d(3, momentum=None),
        nn.BatchNorm2d(3, eps=0.0, momentum=0.0),
        nn.BatchNorm3d(3, affine=False, track_running_stats=False),
        nn.LayerNorm([4, 5], elementwise_affine=False),
        nn.GroupNorm(2, 4),
        nn.Embedding(5, 3, padding_idx=-1, max_norm=1.0),
        nn.Identity(),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_torch_layer_description_rebuilds(layer):
    description = describe_module(layer)
    assert description["class"] in TORCH_LAYERS

    rebuilt = build_module(description)

    assert type(rebuilt) is type(layer)
    assert repr(rebuilt) == repr(layer)


@pytest.mark.parametrize(
    "name, config, message",
    [
        (
            "Conv2d",
            {"in_channels": 2, "out_channels": 4, "kernel_size": [3, 3], "stride": [0, 0]},
            r"invalid value \[0, 0\] for stride of Conv2d",
        ),
        ("BatchNorm2d", {"num_features": 3, "eps": "x"}, r"invalid value 'x' for eps of BatchNorm2d"),
        (
            "Linear",
            {"in_features": 2, "out_features": 2, "bias": "no"},
            r"invalid value 'no' for bias of Linear",
        ),
        ("GroupNorm", {"num_groups": -2, "num_channels": 4}, r"invalid value -2 for num_groups of GroupNorm"),
        (
            "Embedding",
            {"num_embeddings": 3, "embedding_dim": 2, "_freeze": "x"},
            r"unexpected arguments \['_freeze'\] for Embedding; expected some of",
        ),
    ],
)
def test_build_module_rejects_invalid_torch_arguments(name, config, message):
    # torch's constructors accept these and fail only at the first forward, or not at all.
    with pytest.raises(ValueError, match=message):
        build_module({"class": name, "config": config})
