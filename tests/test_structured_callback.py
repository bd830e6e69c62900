"""StructuredPruning inside a real Trainer: schedules, optimizers, checkpoints, logging, arguments."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_weightlight.pruning.structured import StructuredPruning, load_structured_checkpoint
from lightning_weightlight.selection import NoLayerMatchedError
from tests.structured_models import DictDigits, ResidualCNN, TokenMLP

pytestmark = pytest.mark.filterwarnings("ignore:StructuredPruning cannot remove:UserWarning")


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """Training and test loaders over the digits in a fixed order, so that two runs see the same batches."""
    data = DigitsDataModule(batch_size=batch_size)
    data.setup("fit")
    return DataLoader(data.train_set, batch_size=batch_size), DataLoader(data.test_set, batch_size=batch_size)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.linspace(-2, 2, 4 * 64).reshape(4, 1, 8, 8))


def test_fit_prunes_user_cnn(make_trainer):
    torch.manual_seed(0)
    model = ResidualCNN(width=16)
    pruning = StructuredPruning(amount=0.5, importance="l1", num_steps=2, start_step=2, end_step=6)
    trainer = make_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, callbacks=[pruning])
    train, _ = digits_loaders()
    trainer.fit(model, train)

    assert [record["global_step"] for record in pruning.history] == [2, 6]
    assert [record["ratio"] for record in pruning.history] == [0.25, 0.5]
    assert model.stem.out_channels == 8
    assert model.conv1.out_channels == 8
    assert model.expand.out_channels == 16
    assert model.spatial.out_features == 16
    assert model.squeeze.out_channels == 1
    assert model.head.out_features == 10
    assert trainer.global_step == 10
    # Without example_input_array, the first training batch's input gives the traced shape.
    assert pruning.example_input == {"shape": [1, 1, 8, 8], "dtype": "float32"}


def test_schedule_by_epochs(make_trainer):
    pruning = StructuredPruning(amount=0.5, num_steps=2, start_epoch=1, end_epoch=2)
    trainer = make_trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=0, callbacks=[pruning])
    trainer.fit(DigitsMLP(hidden=(32, 16)), DigitsDataModule(batch_size=32, flatten=True))
    assert [record["global_step"] for record in pruning.history] == [4, 8]


def test_accumulation_counts_optimizer_steps(make_trainer):
    pruning = StructuredPruning(amount=0.5, start_step=3)
    trainer = make_trainer(
        max_epochs=1,
        limit_train_batches=10,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        callbacks=[pruning],
    )
    trainer.fit(DigitsMLP(hidden=(32, 16)), DigitsDataModule(batch_size=32, flatten=True))
    assert [record["global_step"] for record in pruning.history] == [3]


class OptimizerProbe(Callback):
    """Record the optimizer and scheduler at the start of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.seen:
            optimizer = trainer.optimizers[0]
            self.seen = {
                "lr": optimizer.param_groups[0]["lr"],
                "last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                "momentum": {
                    name: optimizer.state[parameter]["momentum_buffer"].clone()
                    for name, parameter in pl_module.named_parameters()
                },
                "head_bias": pl_module.head.bias,
                "params": {id(parameter) for parameter in pl_module.parameters()},
                "optimized": {
                    id(parameter) for group in optimizer.param_groups for parameter in group["params"]
                },
            }


def test_optimizer_rebuilt_schedule_kept(make_trainer):
    torch.manual_seed(0)
    model = ResidualCNN(width=16, lr=0.08)
    before, after = OptimizerProbe(step=7), OptimizerProbe(step=7)
    pruning = StructuredPruning(amount=0.5, start_step=7)
    trainer = make_trainer(max_steps=9, limit_val_batches=0, callbacks=[before, pruning, after])
    train, _ = digits_loaders()
    trainer.fit(model, train)

    # StepLR halves every 3 steps: after 7 steps the rate is 0.08 / 4, as without pruning.
    assert after.seen["lr"] == 0.08 / 4
    assert after.seen["last_epoch"] == 7
    assert after.seen["optimized"] == after.seen["params"]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 9

    # Momentum carries over: whole for the head's bias, cut to the kept channels elsewhere.
    plan = pruning.history[0]["plan"]

    def kept(width: int, *members: str) -> list[int]:
        # A group's plan is keyed by its root layer, which may be any of its members.
        (removed,) = [plan[name] for name in members if name in plan]
        return [index for index in range(width) if index not in removed]

    residual = kept(16, "stem", "conv2")
    inner = kept(16, "conv1")
    old, new = before.seen["momentum"], after.seen["momentum"]
    assert torch.equal(new["head.bias"], old["head.bias"])
    assert torch.equal(new["stem.weight"], old["stem.weight"][residual])
    assert torch.equal(new["conv1.weight"], old["conv1.weight"][inner][:, residual])
    assert torch.equal(new["head.weight"], old["head.weight"][:, kept(32, "expand", "spatial")])


def fit_cnn(make_trainer, tmp_path, max_epochs: int, ckpt_path=None, name: str = "run"):
    torch.manual_seed(0)
    model = ResidualCNN(width=16)
    pruning = StructuredPruning(amount=0.5, num_steps=2, start_step=3, end_step=7)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
    trainer = make_trainer(
        max_epochs=max_epochs,
        limit_train_batches=5,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[pruning, checkpoint],
    )
    train, _ = digits_loaders()
    trainer.fit(model, train, ckpt_path=ckpt_path)
    return model, pruning, tmp_path / name / "last.ckpt"


def test_resume_matches_uninterrupted(make_trainer, tmp_path):
    whole, whole_pruning, _ = fit_cnn(make_trainer, tmp_path, max_epochs=2, name="whole")
    _, first_pruning, checkpoint = fit_cnn(make_trainer, tmp_path, max_epochs=1, name="first")
    assert len(first_pruning.history) == 1

    resumed, resumed_pruning, _ = fit_cnn(
        make_trainer, tmp_path, max_epochs=2, ckpt_path=checkpoint, name="resumed"
    )
    assert [record["plan"] for record in resumed_pruning.history] == [
        record["plan"] for record in whole_pruning.history
    ]
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_checkpoint_round_trips(make_trainer, tmp_path):
    trained, _, checkpoint = fit_cnn(make_trainer, tmp_path, max_epochs=2)
    expected = outputs(trained)

    loaded = load_structured_checkpoint(ResidualCNN, checkpoint)
    assert loaded.stem.out_channels == 8
    assert torch.equal(outputs(loaded), expected)

    fresh = ResidualCNN(width=16)
    tester = make_trainer(callbacks=[StructuredPruning(amount=0.5, num_steps=2, start_step=3, end_step=7)])
    _, test = digits_loaders()
    results = tester.test(fresh, test, ckpt_path=checkpoint, verbose=False)
    assert 0.0 <= results[0]["test_accuracy"] <= 1.0
    assert torch.equal(outputs(fresh), expected)

    assert "on_load_checkpoint" not in fresh.__dict__

    # The same model tested again carries the structure already, so nothing is replayed twice.
    tester = make_trainer(callbacks=[StructuredPruning(amount=0.5, num_steps=2, start_step=3, end_step=7)])
    tester.test(fresh, test, ckpt_path=checkpoint, verbose=False)
    assert torch.equal(outputs(fresh), expected)


def test_token_mlp_with_dict_batches(make_trainer):
    torch.manual_seed(0)
    model = TokenMLP(dim=32, hidden=64)
    pruning = StructuredPruning(amount=0.5, importance="taylor", start_step=2)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[pruning])
    trainer.fit(model, DataLoader(DictDigits(size=64), batch_size=16))
    assert model.fc1.out_features == 32
    assert model.embed.out_features == 16
    assert model.head.out_features == 10
    assert trainer.global_step == 4


def test_missing_example_input_raises(make_trainer):
    model = TokenMLP()
    model.example_input_array = None
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[StructuredPruning(amount=0.5)])
    with pytest.raises(ValueError, match=r"no `example_input_array` and the training batch is a dict"):
        trainer.fit(model, DataLoader(DictDigits(size=32), batch_size=16))


@pytest.mark.parametrize(("target", "measure"), [("params", 0), ("macs", 1)])
def test_reduction_targets(make_trainer, target, measure):
    pruning = StructuredPruning(amount=0.6, target=target, num_steps=2, start_step=1, end_step=2)
    trainer = make_trainer(max_steps=4, limit_val_batches=0, callbacks=[pruning])
    trainer.fit(DigitsMLP(hidden=(64, 32)), DigitsDataModule(batch_size=32, flatten=True))
    first, last = pruning.history
    counts = [("params_before", "params_after"), ("macs_before", "macs_after")][measure]
    initial = first[counts[0]]
    assert first[counts[1]] <= initial * (1 - 0.3)
    assert last[counts[1]] <= initial * (1 - 0.6)
    assert last[counts[1]] > initial * (1 - 0.6) * 0.8


def test_logs_and_summary(make_trainer, tmp_path, caplog):
    pruning = StructuredPruning(amount=0.5, importance="lamp", global_ranking=True, start_step=1)
    trainer = make_trainer(
        max_steps=3, limit_val_batches=0, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[pruning]
    )
    with caplog.at_level(logging.INFO, logger="lightning_weightlight.pruning.structured"):
        trainer.fit(DigitsMLP(hidden=(64, 32)), DigitsDataModule(batch_size=32, flatten=True))

    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0]
    assert "StructuredPruning/params" in header
    assert "StructuredPruning/macs" in header
    assert "StructuredPruning/channels/features.1" in header
    assert re.search(r"step 1/1 at optimizer step 1: parameters \d+ -> \d+, MACs \d+ -> \d+", caplog.text)
    assert re.search(r"total\s+\d+\s+\d+\s+\d+\s+\d+", caplog.text)


def test_strict_names_unprunable_layer(make_trainer):
    trainer = make_trainer(max_steps=2, limit_val_batches=0, callbacks=[StructuredPruning(strict=True)])
    train, _ = digits_loaders()
    with pytest.raises(ValueError, match=r"strict: .*squeeze: it has only one output channel"):
        trainer.fit(ResidualCNN(width=8), train)


def test_ignored_pattern_unmatched_strict(make_trainer):
    pruning = StructuredPruning(ignore=["encoder.*"], strict=True)
    trainer = make_trainer(max_steps=1, callbacks=[pruning])
    with pytest.raises(
        NoLayerMatchedError, match=r"ignore: pattern 'encoder\.\*' matches no layer of DigitsCNN"
    ):
        trainer.fit(DigitsCNN(), DigitsDataModule())


def test_ignored_pattern_keeps_layer(make_trainer):
    model = DigitsCNN(channels=(8, 16, 16), hidden=16)
    pruning = StructuredPruning(amount=0.5, ignore=["features.1.*"])
    trainer = make_trainer(max_steps=1, limit_val_batches=0, callbacks=[pruning])
    trainer.fit(model, DigitsDataModule())
    assert model.features[0].conv.out_channels == 4
    assert model.features[1].conv.out_channels == 16
    assert model.features[2].conv.out_channels == 8
    assert model.classifier[0].out_features == 8


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"amount": 1.0}, r"amount: expected a fraction in \[0, 1\), but got 1.0"),
        ({"amount": -0.1}, r"amount: expected a fraction in \[0, 1\), but got -0.1"),
        ({"importance": "l3"}, r"importance: expected one of .*, but got 'l3'"),
        ({"target": "flops"}, r"target: expected one of \['channels', 'params', 'macs'\], but got 'flops'"),
        ({"group_reduction": "median"}, r"group_reduction: expected one of .*, but got 'median'"),
        ({"num_steps": 0}, r"num_steps: expected a positive integer, but got 0"),
        ({"num_steps": 2}, r"end_step: expected a value when num_steps > 1, but got None"),
        (
            {"start_step": 5, "end_step": 2, "num_steps": 2},
            r"end_step: expected at least start_step=5, but got 2",
        ),
        ({"start_step": 1, "end_epoch": 2}, r"expected one of the two forms"),
        ({"importance": "taylor"}, r"start_step: importance='taylor' needs gradients"),
        ({"round_to": 0}, r"round_to: expected None or a positive integer, but got 0"),
        ({"max_layer_ratio": 0.0}, r"max_layer_ratio: expected a fraction in \(0, 1\], but got 0.0"),
        ({"layer_types": ["Embedding"]}, r"layer_types: expected names from .*, but got \['Embedding'\]"),
        ({"ignore": ["re:("]}, r"ignore: invalid regular expression"),
    ],
)
def test_bad_arguments_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**arguments)


def test_schedule_past_training_warns(make_trainer):
    pruning = StructuredPruning(start_step=3)
    trainer = make_trainer(max_steps=3, limit_val_batches=0, callbacks=[pruning])
    with pytest.warns(UserWarning, match=r"end_step: the last pruning step runs at optimizer step 3"):
        trainer.fit(DigitsMLP(hidden=(16,)), DigitsDataModule(flatten=True))
    assert pruning.history == []
