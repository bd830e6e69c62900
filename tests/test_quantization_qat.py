"""QuantizationAwareTraining on real Trainers: the swap, observers, freezing and checkpoint round trips."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.quantization import (
    QATConvBn2d,
    QATEmbedding,
    QATLinear,
    QuantizationAwareTraining,
    load_qat_checkpoint,
    prepare_qat,
    restore_qat_layers,
)
from lightning_weightlight.selection import NoLayerMatchedError


class TwoInputRegressor(L.LightningModule):
    """A model written as a user writes one: two tensors and a keyword argument in ``forward``."""

    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Linear(4, width)
        self.side = nn.Linear(2, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, side: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        hidden = torch.relu(self.encoder(x) + self.side(side))
        return self.head(hidden).squeeze(-1) * scale

    def training_step(self, batch, batch_idx):
        x, side, y = batch
        loss = F.mse_loss(self(x, side, scale=1.0), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, side, y = batch
        self.log("val_loss", F.mse_loss(self(x, side), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class RestoringRegressor(TwoInputRegressor):
    """The user model that rebuilds QAT layers in ``on_load_checkpoint`` for ``load_from_checkpoint``."""

    def on_load_checkpoint(self, checkpoint):
        restore_qat_layers(self, checkpoint)


def regression_loader(scale: float = 1.0, batches: int = 4, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batches * 8, 4, generator=generator) * 2 * scale - scale
    side = torch.rand(batches * 8, 2, generator=generator) * scale
    y = x.sum(dim=1) + side[:, 0]
    return DataLoader(TensorDataset(x, side, y), batch_size=8)


def test_prepare_keeps_parameters_and_names():
    model = DigitsCNN()
    parameters = dict(model.named_parameters())
    user_keys = set(model.state_dict())
    prepare_qat(model)
    assert {name: id(p) for name, p in model.named_parameters()} == {
        name: id(p) for name, p in parameters.items()
    }
    new_keys = set(model.state_dict()) - user_keys
    assert user_keys <= set(model.state_dict())
    assert all("fake_quant" in key for key in new_keys)
    assert isinstance(model.features[0].conv, QATConvBn2d)
    assert isinstance(model.classifier[0], QATLinear)
    assert type(model.features[0].bn) is nn.BatchNorm2d


def test_prepare_twice_changes_nothing():
    model = DigitsCNN()
    first = prepare_qat(model)
    modules = dict(model.named_modules())
    assert prepare_qat(model) == first
    assert dict(model.named_modules()) == modules


def test_prepare_selects_by_pattern_and_embedding():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    record = prepare_qat(model, types=["Linear", "Embedding"], exclude="2")
    assert {name: entry["kind"] for name, entry in record["layers"].items()} == {
        "0": "embedding",
        "1": "linear",
    }
    assert isinstance(model[0], QATEmbedding)
    assert type(model[2]) is nn.Linear
    with pytest.raises(NoLayerMatchedError, match=r"'missing\.\*'"):
        prepare_qat(nn.Sequential(nn.Linear(2, 2)), include="missing.*")


def test_prepare_error_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(2, 2), nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r"activation='dynamic'.*Conv2d layers \['1'\]"):
        from lightning_weightlight.quantization import QATConfig

        prepare_qat(model, QATConfig(activation="dynamic"))
    assert type(model[0]) is nn.Linear


def test_callback_rejects_invalid_arguments():
    with pytest.raises(ValueError, match=r"weight_bits: expected one of \[4, 8\], but got 2"):
        QuantizationAwareTraining(weight_bits=2)
    with pytest.raises(
        ValueError, match=r"freeze_observer_step: expected None or an integer >= 0, but got -1"
    ):
        QuantizationAwareTraining(freeze_observer_step=-1)
    with pytest.raises(ValueError, match=r"types: expected names from .*unsupported \['Conv1d'\]"):
        QuantizationAwareTraining(types=["Conv1d"])


def test_keyword_forward_and_training_batches_only(make_trainer):
    model = TwoInputRegressor()
    callback = QuantizationAwareTraining(observer="minmax")
    trainer = make_trainer(max_steps=4, callbacks=[callback], num_sanity_val_steps=2, val_check_interval=2)
    # Validation inputs reach 100; training inputs stay in [-1, 1].
    trainer.fit(model, regression_loader(1.0), regression_loader(100.0))
    observer = model.encoder.input_fake_quant.observer
    assert -1.0 <= observer.min_val.item() < 0.0
    assert 0.0 < observer.max_val.item() <= 1.0
    model.eval()
    x, side, _ = next(iter(regression_loader()))
    assert model(x, side, scale=2.0).shape == (8,)


def test_validate_alone_leaves_observers_empty(make_trainer):
    model = TwoInputRegressor()
    make_trainer(callbacks=[QuantizationAwareTraining()]).validate(model, regression_loader())
    assert not model.encoder.input_fake_quant.observer.initialized
    assert not model.head.input_fake_quant.observer.initialized


def test_observer_freezes_at_step(make_trainer):
    # Batch i contains values in [-(i + 1), i + 1], so a min-max observer frozen at step 2 ends at 2.
    x = torch.cat([torch.linspace(-(i + 1), i + 1, 8 * 4).reshape(8, 4) for i in range(5)])
    data = DataLoader(TensorDataset(x, torch.zeros(40, 2), torch.zeros(40)), batch_size=8)
    model = TwoInputRegressor()
    callback = QuantizationAwareTraining(observer="minmax", freeze_observer_step=2)
    make_trainer(max_steps=5, callbacks=[callback], limit_val_batches=0).fit(model, data)
    observer = model.encoder.input_fake_quant.observer
    assert (observer.min_val.item(), observer.max_val.item()) == (-2.0, 2.0)


def test_bn_statistics_freeze_at_step(make_trainer):
    model = DigitsCNN()
    callback = QuantizationAwareTraining(freeze_bn_step=2)
    history = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(pl_module.features[0].bn.running_mean.clone())

    make_trainer(max_steps=5, callbacks=[callback, Recorder()], limit_val_batches=0).fit(
        model, DigitsDataModule()
    )
    assert not torch.equal(history[0], history[1])
    assert torch.equal(history[1], history[4])


def test_fit_twice_with_one_callback(make_trainer):
    model = TwoInputRegressor()
    callback = QuantizationAwareTraining()
    make_trainer(max_steps=2, callbacks=[callback], limit_val_batches=0).fit(model, regression_loader())
    encoder = model.encoder
    make_trainer(max_steps=4, callbacks=[callback], limit_val_batches=0).fit(model, regression_loader())
    assert model.encoder is encoder
    assert isinstance(model.encoder, QATLinear)


def _fit_with_checkpoint(make_trainer, tmp_path, model, max_steps):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(
        max_steps=max_steps,
        callbacks=[QuantizationAwareTraining(freeze_bn_step=3), checkpoint],
        enable_checkpointing=True,
        limit_val_batches=1,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return trainer, checkpoint.last_model_path


def test_load_qat_checkpoint_into_fresh_class(make_trainer, tmp_path):
    L.seed_everything(0)
    model = DigitsCNN(channels=[4, 8], hidden=16)
    _, path = _fit_with_checkpoint(make_trainer, tmp_path, model, 4)
    loaded = load_qat_checkpoint(DigitsCNN, path)
    model.eval()
    loaded.eval()
    images = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(images), loaded(images))
    assert torch.equal(
        model.classifier[0].input_fake_quant.scale, loaded.classifier[0].input_fake_quant.scale
    )


def test_load_from_checkpoint_with_on_load_hook(make_trainer, tmp_path):
    model = RestoringRegressor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(
        max_steps=3, callbacks=[QuantizationAwareTraining(), checkpoint], enable_checkpointing=True
    )
    trainer.fit(model, regression_loader(), regression_loader())
    loaded = RestoringRegressor.load_from_checkpoint(checkpoint.last_model_path)
    model.eval()
    loaded.eval()
    x, side, _ = next(iter(regression_loader()))
    assert isinstance(loaded.encoder, QATLinear)
    assert torch.equal(model(x, side), loaded(x, side))


def test_test_with_ckpt_path_on_fresh_model(make_trainer, tmp_path):
    L.seed_everything(0)
    model = DigitsCNN(channels=[4, 8], hidden=16)
    trainer, path = _fit_with_checkpoint(make_trainer, tmp_path, model, 4)
    expected = trainer.test(model, DigitsDataModule(batch_size=32), verbose=False)
    fresh_trainer = make_trainer(callbacks=[QuantizationAwareTraining(freeze_bn_step=3)])
    result = fresh_trainer.test(
        DigitsCNN(channels=[4, 8], hidden=16), DigitsDataModule(batch_size=32), ckpt_path=path
    )
    assert result == expected


def _ordered_digits(batch_size: int = 32) -> DataLoader:
    data = DigitsDataModule(batch_size=batch_size)
    data.setup("fit")
    return DataLoader(data.train_set, batch_size=batch_size, shuffle=False)


def test_resume_matches_uninterrupted_run(make_trainer, tmp_path):
    def run(directory, ckpt_path=None):
        L.seed_everything(0)
        model = DigitsCNN(channels=[4, 8], hidden=16, dropout=0.0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / directory, save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(
            max_epochs=3,
            limit_train_batches=3,
            limit_val_batches=0,
            callbacks=[QuantizationAwareTraining(freeze_bn_step=4, freeze_observer_step=5), checkpoint],
            enable_checkpointing=True,
        )
        trainer.fit(model, _ordered_digits(), ckpt_path=ckpt_path)
        return model

    straight = run("straight")
    # The first epoch ends at step 3, before both freeze steps: the resumed run must cross them.
    resumed = run("resumed", ckpt_path=tmp_path / "straight" / "epoch=0-step=3.ckpt")

    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_checkpoint_with_other_layers_is_rejected(make_trainer, tmp_path):
    model = TwoInputRegressor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(
        max_steps=2, callbacks=[QuantizationAwareTraining(), checkpoint], enable_checkpointing=True
    ).fit(model, regression_loader(), regression_loader())
    trainer = make_trainer(callbacks=[QuantizationAwareTraining(include="encoder", strict=True)])
    # Lightning loads the weights before the callbacks' state, so the strict load names the extra keys.
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"side\.input_fake_quant"):
        trainer.validate(TwoInputRegressor(), regression_loader(), ckpt_path=checkpoint.last_model_path)


def test_learned_scales_train(make_trainer):
    model = TwoInputRegressor()
    callback = QuantizationAwareTraining(learn_scale=True)
    make_trainer(max_steps=4, callbacks=[callback], limit_val_batches=0).fit(model, regression_loader())
    assert isinstance(model.encoder.weight_fake_quant.scale, nn.Parameter)
    assert model.encoder.weight_fake_quant.scale.grad is not None
    assert bool(model.encoder.weight_fake_quant.initialized)


def test_convert_on_fit_end_swaps_in_int8(make_trainer):
    from lightning_weightlight.kernels import layers

    model = TwoInputRegressor()
    callback = QuantizationAwareTraining(convert_on_fit_end=True)
    make_trainer(max_steps=3, callbacks=[callback], limit_val_batches=0).fit(model, regression_loader())
    assert isinstance(model.encoder, layers.Int8Linear)
    assert isinstance(model.head, layers.Int8Linear)
    x, side, _ = next(iter(regression_loader()))
    assert model(x, side).shape == (8,)


def _range_batches(batches: int = 5) -> DataLoader:
    # Batch i contains values in [-(i + 1), i + 1], so a min-max observer shows which batches it saw.
    x = torch.cat([torch.linspace(-(i + 1), i + 1, 8 * 4).reshape(8, 4) for i in range(batches)])
    return DataLoader(TensorDataset(x, torch.zeros(8 * batches, 2), torch.zeros(8 * batches)), batch_size=8)


def test_callback_rejects_invalid_start():
    with pytest.raises(ValueError, match=r"start_step: expected an integer >= 0, but got -3"):
        QuantizationAwareTraining(start_step=-3)
    with pytest.raises(
        ValueError, match=r"freeze_bn_step: expected a step >= the start step 10, .* but got 5"
    ):
        QuantizationAwareTraining(start_step=10, freeze_bn_step=5)
    with pytest.raises(
        ValueError, match=r"freeze_observer_step: expected a step >= the start step 10, .* but got 9"
    ):
        QuantizationAwareTraining(start_step=10, freeze_observer_step=9)
    with pytest.raises(
        ValueError, match=r"start_epoch: expected start_step=0 .* start_step=4 and start_epoch=1"
    ):
        QuantizationAwareTraining(start_step=4, start_epoch=1)


def test_before_start_equals_float_training(make_trainer):
    def train(callbacks):
        L.seed_everything(0)
        model = DigitsCNN(channels=[4, 8], hidden=16, dropout=0.0)
        make_trainer(max_steps=4, callbacks=callbacks, limit_val_batches=0).fit(model, _ordered_digits())
        return model

    float_model = train([])
    qat_model = train([QuantizationAwareTraining(start_step=5)])
    expected = float_model.state_dict()
    actual = qat_model.state_dict()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert not qat_model.classifier[0].input_fake_quant.observer.initialized
    assert not qat_model.features[0].conv.weight_fake_quant.fake_quant_enabled


def test_start_step_turns_on_observers(make_trainer):
    model = TwoInputRegressor()
    callback = QuantizationAwareTraining(observer="minmax", start_step=2, freeze_observer_step=4)
    make_trainer(max_steps=5, callbacks=[callback], limit_val_batches=0).fit(model, _range_batches())
    observer = model.encoder.input_fake_quant.observer
    # Only the batches of steps 2 and 3 were observed.
    assert (observer.min_val.item(), observer.max_val.item()) == (-4.0, 4.0)
    assert model.encoder.weight_fake_quant.fake_quant_enabled
    assert model.encoder.input_fake_quant.fake_quant_enabled


def test_start_epoch_converts_to_steps(make_trainer):
    model = TwoInputRegressor()
    callback = QuantizationAwareTraining(start_epoch=1, freeze_observer_step=7)
    make_trainer(max_epochs=2, callbacks=[callback], limit_val_batches=0, accumulate_grad_batches=2).fit(
        model, _range_batches()
    )
    # 5 batches with 2 accumulated per step make 3 optimizer steps per epoch.
    assert callback.state_dict()["start_step"] == 3
    with pytest.raises(ValueError, match=r"freeze_observer_step: expected a step >= the start step 5"):
        make_trainer(
            max_epochs=2,
            callbacks=[QuantizationAwareTraining(start_epoch=1, freeze_observer_step=4)],
            limit_val_batches=0,
        ).fit(TwoInputRegressor(), _range_batches())


@pytest.mark.parametrize("resume_epoch", [0, 1])
def test_resume_across_start_step(make_trainer, tmp_path, resume_epoch):
    def run(directory, ckpt_path=None):
        L.seed_everything(0)
        model = DigitsCNN(channels=[4, 8], hidden=16, dropout=0.0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / directory, save_top_k=-1, every_n_epochs=1)
        callback = QuantizationAwareTraining(
            start_step=4, start_lr_scale=0.5, freeze_bn_step=5, freeze_observer_step=7
        )
        trainer = make_trainer(
            max_epochs=3,
            limit_train_batches=3,
            limit_val_batches=1,
            callbacks=[callback, checkpoint],
            enable_checkpointing=True,
        )
        trainer.fit(model, _ordered_digits(), _ordered_digits(), ckpt_path=ckpt_path)
        return model

    straight = run("straight")
    # Step 3 is before the start step 4, step 6 after it.
    step = 3 * (resume_epoch + 1)
    resumed = run("resumed", ckpt_path=tmp_path / "straight" / f"epoch={resume_epoch}-step={step}.ckpt")

    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_checkpoint_before_start_loads_as_float(make_trainer, tmp_path):
    model = RestoringRegressor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(
        max_steps=3,
        callbacks=[QuantizationAwareTraining(start_step=10), checkpoint],
        enable_checkpointing=True,
    )
    with pytest.warns(UserWarning, match=r"fit ended at step 3, before the start step 10"):
        trainer.fit(model, regression_loader(), regression_loader())
    loaded = RestoringRegressor.load_from_checkpoint(checkpoint.last_model_path)
    assert not loaded.encoder.weight_fake_quant.fake_quant_enabled
    plain = TwoInputRegressor()
    plain.load_state_dict(
        {key: value for key, value in loaded.state_dict().items() if "fake_quant" not in key}
    )
    loaded.eval()
    plain.eval()
    x, side, _ = next(iter(regression_loader()))
    assert torch.equal(loaded(x, side), plain(x, side))


def test_start_lr_scale_scales_once(make_trainer):
    model = TwoInputRegressor(lr=0.05)
    callback = QuantizationAwareTraining(start_step=2, start_lr_scale=0.1)
    trainer = make_trainer(max_steps=4, callbacks=[callback], limit_val_batches=0)
    trainer.fit(model, regression_loader(batches=4))
    # StepLR(step_size=2) steps once per epoch, and the one epoch does not change the rate.
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05 * 0.1
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.05 * 0.1]
