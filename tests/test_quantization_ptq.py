"""Post-training quantization: every mode, the SQNR report, bad calibration data, the callback."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.kernels import layers
from lightning_weightlight.quantization import (
    CalibrationError,
    Float16Weight,
    Int16x8,
    PostTrainingQuantization,
    WeightOnlyQuantized,
    quantize_model,
)

EXPECTED_TYPES = {
    "static": layers.Int8Linear,
    "dynamic": layers.Int8Linear,
    "weight_only": WeightOnlyQuantized,
    "float16": Float16Weight,
    "int16x8": Int16x8,
}
# Measured floors with margin: int8 about 35-40 dB on this MLP, int16x8 and float16 above 60 dB.
MIN_OUTPUT_SQNR = {"static": 25.0, "dynamic": 25.0, "weight_only": 30.0, "float16": 50.0, "int16x8": 35.0}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(count: int = 4, nan: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=generator), torch.zeros(32)) for _ in range(count)]
    if nan:
        data[1][0][3, 5] = float("nan")
    return data


@pytest.mark.parametrize("mode", sorted(EXPECTED_TYPES))
def test_each_mode_quantizes_and_reports_sqnr(mode):
    model = mlp()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    result = quantize_model(model, mode, batches(), progress=False)
    assert all(isinstance(result.model[index], EXPECTED_TYPES[mode]) for index in (0, 2, 4))
    assert set(result.sqnr_db) == {"0", "2", "4", "output"}
    assert result.sqnr_db["output"] > MIN_OUTPUT_SQNR[mode]
    assert result.low_sqnr_layers == []
    # The input model is untouched.
    assert all(type(model[index]) is nn.Linear for index in (0, 2, 4))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_weight_only_four_bits_reports_lower_sqnr():
    eight = quantize_model(mlp(), "weight_only", batches(), progress=False)
    four = quantize_model(mlp(), "weight_only", batches(), weight_bits=4, progress=False)
    assert int(four.model[0].q_weight.abs().max()) <= 8
    assert four.sqnr_db["output"] < eight.sqnr_db["output"] - 10.0


def test_low_sqnr_warning_names_layers():
    with pytest.warns(UserWarning, match=r"SQNR below 200.0 dB in 0 \(.*dB\), 2 \(.*4 \(.*output"):
        result = quantize_model(mlp(), "static", batches(), sqnr_threshold_db=200.0, progress=False)
    assert result.low_sqnr_layers == ["0", "2", "4", "output"]


def test_skip_layers_stay_float():
    result = quantize_model(mlp(), "static", batches(), skip_layers=["4"], progress=False)
    assert type(result.model[4]) is nn.Linear
    assert isinstance(result.model[0], layers.Int8Linear)
    assert "4" not in result.sqnr_db


def test_empty_dataloader_is_rejected():
    model = mlp()
    with pytest.raises(CalibrationError, match=r"dataloader: expected at least one batch.*empty"):
        quantize_model(model, "static", [], progress=False)
    assert type(model[0]) is nn.Linear


def test_nan_activation_names_layer():
    model = mlp()
    with pytest.raises(CalibrationError, match=r"observer of layer '0': expected finite activations"):
        quantize_model(model, "static", batches(nan=True), progress=False)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "int4"}, r"mode: expected one of \['static', .*\], but got 'int4'"),
        ({"mode": "static", "weight_bits": 4}, r"weight_bits: 4-bit weights need mode='weight_only'"),
        ({"mode": "static", "weight_bits": 6}, r"weight_bits: expected one of \[4, 8\], but got 6"),
        ({"mode": "static", "num_batches": 0}, r"num_batches: expected a positive integer, but got 0"),
    ],
)
def test_invalid_arguments_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        quantize_model(mlp(), dataloader=batches(), progress=False, **arguments)
    with pytest.raises(ValueError, match=message):
        PostTrainingQuantization(**arguments)


def test_static_without_data_is_rejected():
    with pytest.raises(
        ValueError, match="dataloader: mode 'static' calibrates activation ranges and needs data"
    ):
        quantize_model(mlp(), "static")


def test_cnn_static_folds_batchnorm_and_measures_after_it():
    model = DigitsCNN(channels=[4, 8], hidden=16)
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    result = quantize_model(model, "static", data.train_dataloader(), num_batches=4, progress=False)
    assert isinstance(result.model.features[0].conv, layers.Int8Conv2d)
    assert isinstance(result.model.features[0].bn, nn.Identity)
    assert set(result.sqnr_db) == {
        "features.0.conv",
        "features.1.conv",
        "classifier.0",
        "classifier.3",
        "output",
    }
    assert result.sqnr_db["features.0.conv"] > 25.0


def test_callback_quantizes_at_fit_end(make_trainer, caplog):
    torch.manual_seed(0)
    model = DigitsCNN(channels=[4, 8], hidden=16)
    callback = PostTrainingQuantization(mode="static", num_batches=4)
    trainer = make_trainer(max_steps=10, callbacks=[callback], limit_val_batches=0)
    data = DigitsDataModule(batch_size=32)
    with caplog.at_level("INFO"):
        trainer.fit(model, data)
    assert isinstance(model.features[0].conv, layers.Int8Conv2d)
    assert isinstance(model.classifier[3], layers.Int8Linear)
    assert re.search(r"features\.0\.conv\s+\d+\.\d", caplog.text)
    assert callback.result.sqnr_db["output"] > 20.0
    assert trainer.test(model, data, verbose=False)[0]["test_acc"] > 0.0


def test_callback_quantizes_on_test_start(make_trainer):
    model = DigitsCNN(channels=[4, 8], hidden=16)
    callback = PostTrainingQuantization(mode="dynamic", run_on="test_start", num_batches=2, dataloader="val")
    make_trainer(callbacks=[callback], limit_test_batches=2).test(model, DigitsDataModule(batch_size=32))
    assert isinstance(model.features[1].conv, layers.Int8Conv2d)
    assert isinstance(model.classifier[0], layers.Int8Linear)


def test_callback_quantizes_on_validate_start(make_trainer):
    model = DigitsCNN(channels=[4, 8], hidden=16)
    callback = PostTrainingQuantization(mode="weight_only", run_on="validate_start", num_batches=2)
    make_trainer(callbacks=[callback], limit_val_batches=2).validate(model, DigitsDataModule(batch_size=32))
    assert isinstance(model.features[0].conv, WeightOnlyQuantized)
    assert callback.result.sqnr_db["output"] > 30.0
