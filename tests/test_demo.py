"""The embedded digits data module and the reference classifiers on a real Trainer."""

from __future__ import annotations

import pytest
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule, DigitsMLP


def test_split_is_deterministic_and_disjoint():
    first, second = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    first.setup()
    second.setup()
    for a, b in zip(
        (first.train_set, first.val_set, first.test_set), (second.train_set, second.val_set, second.test_set)
    ):
        assert torch.equal(a.tensors[0], b.tensors[0])
        assert torch.equal(a.tensors[1], b.tensors[1])
    sizes = [len(first.train_set), len(first.val_set), len(first.test_set)]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(0.2 * 1797, abs=10)
    assert sizes[1] == pytest.approx(0.15 * 1797, abs=10)


def test_split_changes_with_seed():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    a.setup()
    b.setup()
    assert not torch.equal(a.test_set.tensors[1], b.test_set.tensors[1])


def test_normalisation_uses_training_statistics():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    train_images = dm.train_set.tensors[0]
    assert train_images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_images.std().item() == pytest.approx(1.0, abs=1e-4)


def test_flatten_and_batch_size():
    dm = DigitsDataModule(batch_size=16, flatten=True)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 64)
    assert labels.shape == (16,)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "argument"),
    [
        (DigitsCNN, {"channels": []}, "channels"),
        (DigitsCNN, {"channels": [8, 8, 8, 8]}, "channels"),
        (DigitsCNN, {"dropout": 1.0}, "dropout"),
        (DigitsMLP, {"hidden": [0]}, "hidden"),
        (DigitsMLP, {"lr": -1.0}, "lr"),
        (DigitsMLP, {"optimizer": "lbfgs"}, "optimizer"),
    ],
)
def test_models_reject_bad_arguments(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(**kwargs)


@pytest.mark.parametrize("model_cls", [DigitsCNN, DigitsMLP])
def test_models_train_and_log_accuracy(model_cls, make_trainer):
    torch.manual_seed(0)
    flatten = model_cls is DigitsMLP
    dm = DigitsDataModule(batch_size=32, flatten=flatten)
    model = model_cls()
    trainer = make_trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 8
    assert 0.0 <= trainer.callback_metrics["val_acc"].item() <= 1.0
    results = trainer.test(model, datamodule=dm, verbose=False)
    assert set(results[0]) == {"test_loss", "test_acc"}


def test_cnn_checkpoint_round_trip(make_trainer, tmp_path):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32)
    model = DigitsCNN(channels=(8, 16), hidden=32)
    trainer = make_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    restored = DigitsCNN.load_from_checkpoint(path)
    model.eval()
    restored.eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), restored(x))
    assert restored.hparams.channels == [8, 16] or tuple(restored.hparams.channels) == (8, 16)
