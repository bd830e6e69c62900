"""WeightPruning on a real Trainer: exact counts, mask invariants, clean checkpoints, resume, logs."""

from __future__ import annotations

import csv
import logging
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_weightlight.pruning import Iterative, OneShot, PolynomialDecay, WeightPruning
from lightning_weightlight.selection import NoLayerMatchedError
from tests.pruning_models import TiedEmbeddingModel, UserRegressor

HIDDEN = ("encoder.0.weight", "encoder.2.weight")
# The resume tests stop at an epoch boundary (8 batches per epoch), between two pruning events.
# Lightning 2.6 restarts a plain DataLoader's epoch when it resumes mid-epoch, so only a checkpoint
# at an epoch boundary replays the same batches as the uninterrupted run.
CHECKPOINT_STEP = 8


def callback_masks(pruning: WeightPruning) -> dict[str, torch.Tensor]:
    return {name: mask.clone() for name, mask in pruning.state_dict()["masks"].items()}


def zeros(tensor: torch.Tensor) -> int:
    return int((tensor == 0).sum())


class InvariantChecker(Callback):
    """Record, at every step, whether pruned gradients and pruned weights were zero."""

    def __init__(self, pruning: WeightPruning) -> None:
        self.pruning = pruning
        self.grad_checks: list[bool] = []
        self.weight_checks: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, mask in self.pruning.state_dict()["masks"].items():
            grad = pl_module.get_parameter(name).grad
            self.grad_checks.append(bool((grad[~mask] == 0).all()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.pruning.state_dict()["masks"].items():
            self.weight_checks.append(bool((pl_module.get_parameter(name)[~mask] == 0).all()))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1x4", "4x1", "8x1"])
def test_layer_scope_exact_counts_after_fit(make_trainer, pattern):
    model = UserRegressor()
    schedule = PolynomialDecay(0.5, begin_step=2, end_step=10, every_n_steps=3)
    pruning = WeightPruning(schedule=schedule, pattern=pattern, exclude_head=True)
    make_trainer(max_steps=16, callbacks=[pruning]).fit(model)
    unit = {"unstructured": 1, "2:4": 1, "1x4": 4, "4x1": 4, "8x1": 8}[pattern]
    for name in HIDDEN:
        weight = model.get_parameter(name)
        expected = round(0.5 * weight.numel() // unit) * unit
        assert zeros(weight) == expected, name
        assert int((~pruning.state_dict()["masks"][name]).sum()) == expected
    assert zeros(model.head.weight) == 0


def test_global_scope_counts_across_layers(make_trainer):
    model = UserRegressor()
    pruning = WeightPruning(sparsity=0.7, scope="global")
    make_trainer(max_steps=3, callbacks=[pruning]).fit(model)
    names = [*HIDDEN, "head.weight"]
    total = sum(model.get_parameter(name).numel() for name in names)
    assert sum(zeros(model.get_parameter(name)) for name in names) == round(0.7 * total)
    assert pruning.global_sparsity() == round(0.7 * total) / total
    per_layer = pruning.layer_sparsity()
    assert len(set(per_layer.values())) > 1


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adam-fused", "rmsprop", "drifting"])
def test_pruned_weights_and_grads_stay_zero(make_trainer, optimizer):
    model = UserRegressor(optimizer=optimizer)
    params_before = {name: param for name, param in model.named_parameters()}
    pruning = WeightPruning(schedule=Iterative(0.6, num_events=3, every_n_steps=2, begin_step=1))
    checker = InvariantChecker(pruning)
    make_trainer(max_steps=12, callbacks=[pruning, checker]).fit(model)
    assert checker.grad_checks
    assert all(checker.grad_checks)
    assert all(checker.weight_checks)
    for name, param in model.named_parameters():
        assert param is params_before[name], name
    for name in HIDDEN:
        assert zeros(model.get_parameter(name)) == round(0.6 * model.get_parameter(name).numel())


@pytest.mark.parametrize(("optimizer", "key"), [("adam", "exp_avg"), ("sgd", "momentum_buffer")])
def test_momentum_of_pruned_entries_is_zeroed(make_trainer, optimizer, key):
    # Dense steps first fill the momentum; pruning then zeroes it at the pruned entries.
    model = UserRegressor(optimizer=optimizer)
    pruning = WeightPruning(schedule=OneShot(0.6, step=4))
    trainer = make_trainer(max_steps=8, callbacks=[pruning])
    trainer.fit(model)
    state = trainer.optimizers[0].state
    for name, mask in pruning.state_dict()["masks"].items():
        momentum = state[model.get_parameter(name)][key]
        assert int((momentum[~mask] != 0).sum()) == 0, name
        assert int((momentum[mask] != 0).sum()) > 0, name


def test_no_hooks_and_clean_state_dict(make_trainer, tmp_path):
    model = UserRegressor()
    keys_before = list(model.state_dict())
    pruning = WeightPruning(sparsity=0.5)
    trainer = make_trainer(max_steps=4, callbacks=[pruning])
    trainer.fit(model)
    assert list(model.state_dict()) == keys_before
    assert list(dict(model.named_buffers())) == []
    for module in model.modules():
        assert not module._forward_pre_hooks
        assert not module._forward_hooks
        assert not module._backward_hooks
    assert not trainer.optimizers[0]._optimizer_step_post_hooks

    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    fresh = UserRegressor()
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=True)
    features = torch.randn(5, 16)
    assert torch.equal(fresh(features), model(features))
    loaded = UserRegressor.load_from_checkpoint(path)
    assert torch.equal(loaded(features), model(features))


def test_bias_pruned_only_when_asked(make_trainer):
    model = UserRegressor()
    make_trainer(max_steps=2, callbacks=[WeightPruning(sparsity=0.5)]).fit(model)
    assert zeros(model.encoder[0].bias) == 0

    model = UserRegressor()
    pruning = WeightPruning(sparsity=0.5, prune_bias=True)
    make_trainer(max_steps=2, callbacks=[pruning]).fit(model)
    assert zeros(model.encoder[0].bias) == round(0.5 * model.encoder[0].bias.numel())
    assert "encoder.0.bias" in pruning.layer_sparsity()


def test_gradient_accumulation_does_not_stretch_schedule(make_trainer):
    model = UserRegressor()
    seen: list[tuple[int, int, float]] = []

    class Recorder(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch_idx, trainer.global_step, pruning.global_sparsity()))

    pruning = WeightPruning(schedule=OneShot(0.5, step=3))
    make_trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[pruning, Recorder()]).fit(model)
    # Optimizer step 3 is taken after batches 6 and 7, so the event happens as batch 6 starts.
    first_pruned = next(entry for entry in seen if entry[2] > 0)
    assert first_pruned[:2] == (6, 3)
    assert first_pruned[2] == pytest.approx(0.5)


def test_epoch_arguments_convert_to_steps(make_trainer):
    model = UserRegressor()  # 64 samples in batches of 8: 8 batches, 4 optimizer steps per epoch
    pruning = WeightPruning(schedule=OneShot(0.5, epoch=1))
    steps: list[int] = []

    class Recorder(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if pruning.global_sparsity() > 0 and not steps:
                steps.append(trainer.global_step)

    make_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[pruning, Recorder()]).fit(model)
    assert steps == [4]


def test_weight_tying_counted_once(make_trainer):
    model = TiedEmbeddingModel()
    pruning = WeightPruning(sparsity=0.5, types=["Embedding", "Linear"], include=["embedding", "unembed"])
    with pytest.warns(UserWarning, match=r"unembed.weight is the same tensor as embedding.weight"):
        make_trainer(max_steps=2, callbacks=[pruning]).fit(model)
    assert list(pruning.layer_sparsity()) == ["embedding.weight"]
    assert zeros(model.embedding.weight) == 64
    assert pruning.global_sparsity() == 0.5


def test_logs_per_layer_sparsity_and_summary(make_trainer, tmp_path, caplog):
    model = UserRegressor()
    pruning = WeightPruning(schedule=Iterative(0.5, num_events=2, every_n_steps=3), exclude_head=True)
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO, logger="lightning_weightlight"):
        make_trainer(max_steps=8, logger=logger, callbacks=[pruning]).fit(model)
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("weight_pruning/global_sparsity")]
    assert [int(row["step"]) for row in rows] == [0, 3]
    total = sum(model.get_parameter(name).numel() for name in HIDDEN)
    final = rows[-1]
    assert float(final["weight_pruning/global_sparsity"]) == pytest.approx(
        sum(round(0.5 * model.get_parameter(name).numel()) for name in HIDDEN) / total
    )
    for name in HIDDEN:
        assert float(final[f"weight_pruning/{name}"]) == pytest.approx(0.5)
    summary = [record.getMessage() for record in caplog.records if "end of fit" in record.getMessage()]
    assert len(summary) == 1
    assert re.search(r"encoder\.0\.weight\s*\|\s*32x16\s*\|\s*256\s*\|\s*512", summary[0])
    assert re.search(r"total\s*\|\s*\|\s*768\s*\|\s*1536\s*\|\s*0\.5000", summary[0])


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_resume_matches_uninterrupted_run(make_trainer, tmp_path, criterion):
    def build() -> tuple[UserRegressor, WeightPruning]:
        L.seed_everything(0)
        schedule = PolynomialDecay(0.75, begin_step=1, end_step=13, every_n_steps=2)
        return UserRegressor(), WeightPruning(schedule=schedule, criterion=criterion, seed=3)

    model, pruning = build()
    make_trainer(max_steps=16, callbacks=[pruning]).fit(model)

    interrupted_model, interrupted = build()
    saver = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1
    )
    make_trainer(max_steps=16, callbacks=[interrupted, saver], enable_checkpointing=True).fit(
        interrupted_model
    )
    (path,) = (tmp_path / "checkpoints").glob(f"*step={CHECKPOINT_STEP}.ckpt")

    resumed_model, resumed = build()
    make_trainer(max_steps=16, callbacks=[resumed]).fit(resumed_model, ckpt_path=path)
    for name, mask in callback_masks(pruning).items():
        assert torch.equal(callback_masks(resumed)[name], mask), name
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_same_callback_serves_two_fits(make_trainer):
    pruning = WeightPruning(schedule=OneShot(0.5, step=1), criterion="random", seed=5)
    first_model = UserRegressor()
    make_trainer(max_steps=3, callbacks=[pruning]).fit(first_model)
    first_masks = callback_masks(pruning)

    second_model = UserRegressor()
    second_model.load_state_dict(UserRegressor().state_dict())
    make_trainer(max_steps=3, callbacks=[pruning]).fit(second_model)
    assert callback_masks(pruning).keys() == first_masks.keys()
    for name, mask in first_masks.items():
        assert torch.equal(callback_masks(pruning)[name], mask), name
        assert zeros(second_model.get_parameter(name)) == round(0.5 * mask.numel())


def test_rewind_resets_survivors_to_recorded_step(make_trainer):
    model = UserRegressor()
    recorded: dict[str, torch.Tensor] = {}
    at_rewind: dict[str, bool] = {}

    class BeforePruning(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                recorded.update({name: pl_module.get_parameter(name).detach().clone() for name in HIDDEN})

    class AfterPruning(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                masks = pruning.state_dict()["masks"]
                for name in HIDDEN:
                    weight = pl_module.get_parameter(name).detach()
                    at_rewind[name] = torch.equal(weight, recorded[name] * masks[name])

    # Events at steps 3 and 7; the last one rewinds the survivors to their values at step 2.
    schedule = Iterative(0.5, num_events=2, every_n_steps=4, begin_step=3)
    pruning = WeightPruning(schedule=schedule, rewind_step=2, exclude_head=True)
    make_trainer(max_steps=9, callbacks=[BeforePruning(), pruning, AfterPruning()]).fit(model)
    assert at_rewind == {name: True for name in HIDDEN}
    assert pruning.state_dict()["rewound"] is True
    for name in HIDDEN:
        assert zeros(model.get_parameter(name)) == round(0.5 * model.get_parameter(name).numel())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity: expected a sparsity in \[0, 1\), but got 1.0"),
        ({"sparsity": -0.5}, r"sparsity: expected a sparsity in \[0, 1\), but got -0.5"),
        ({}, r"sparsity, schedule: expected exactly one of them, but got sparsity=None and schedule=None"),
        ({"sparsity": 0.5, "schedule": OneShot(0.5)}, r"expected exactly one of them"),
        ({"sparsity": 0.5, "pattern": "4:2"}, r"pattern: expected N:M with 0 < N < M, but got '4:2'"),
        (
            {"sparsity": 0.8, "pattern": "2:4"},
            r"pattern 2:4 allows a sparsity of at most 0.5, but the schedule reaches 0.8",
        ),
        (
            {"sparsity": 0.5, "criterion": "l2"},
            r"criterion: expected one of \['magnitude', 'random'\], but got 'l2'",
        ),
        (
            {"sparsity": 0.5, "scope": "model"},
            r"scope: expected one of \['layer', 'global'\], but got 'model'",
        ),
        ({"sparsity": 0.5, "types": ["LSTM"]}, r"types: expected names from .* but got unknown \['LSTM'\]"),
        ({"sparsity": 0.5, "include": "re:(["}, r"include: invalid regular expression 're:\(\['"),
        (
            {"sparsity": 0.5, "pattern": "1x4", "prune_bias": True},
            r"prune_bias: expected False with pattern 1x4",
        ),
        ({"sparsity": 0.5, "rewind_step": -1}, r"rewind_step: expected an integer >= 0, but got -1"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightPruning(**kwargs)


def test_pattern_matching_no_layer_raises_in_setup(make_trainer):
    pruning = WeightPruning(sparsity=0.5, include="decoder.*")
    with pytest.raises(NoLayerMatchedError, match=r"include: pattern 'decoder\.\*' matches no layer"):
        make_trainer(max_steps=1, callbacks=[pruning]).fit(UserRegressor())


def test_block_misfit_raises_in_setup(make_trainer):
    pruning = WeightPruning(sparsity=0.5, pattern="16x16")
    with pytest.raises(
        ValueError, match=r"pattern: layer 'head' cannot take 16x16: block 16x16 does not divide"
    ):
        make_trainer(max_steps=1, callbacks=[pruning]).fit(UserRegressor())


def test_block_misfit_skipped_without_strict(make_trainer):
    model = UserRegressor()
    pruning = WeightPruning(sparsity=0.5, pattern="16x16", strict=False)
    with pytest.warns(UserWarning, match=r"WeightPruning skips head.weight"):
        make_trainer(max_steps=1, callbacks=[pruning]).fit(model)
    assert list(pruning.layer_sparsity()) == ["encoder.0.weight", "encoder.2.weight"]


def test_rewind_after_last_event_raises(make_trainer):
    pruning = WeightPruning(schedule=OneShot(0.5, step=2), rewind_step=2)
    with pytest.raises(
        ValueError, match=r"rewind_step: expected a step before the last pruning event at step 2"
    ):
        make_trainer(max_steps=3, callbacks=[pruning]).fit(UserRegressor())


def test_event_at_last_step_applied_at_end(make_trainer):
    model = UserRegressor()
    pruning = WeightPruning(schedule=OneShot(0.5, step=4))
    with pytest.warns(UserWarning, match=r"the last pruning event is at step 4, but training stops after 4"):
        make_trainer(max_steps=4, callbacks=[pruning]).fit(model)
    assert zeros(model.encoder[0].weight) == 256


@pytest.mark.parametrize(("optimizer", "hinted"), [("adam", True), ("adam-fused", False), ("sgd", False)])
def test_hint_for_unfused_adam_on_cpu(make_trainer, caplog, optimizer, hinted):
    with caplog.at_level(logging.INFO, logger="lightning_weightlight"):
        trainer = make_trainer(max_steps=2, callbacks=[WeightPruning(sparsity=0.5)])
        trainer.fit(UserRegressor(optimizer=optimizer))
    hints = [record.getMessage() for record in caplog.records if "fused=True" in record.getMessage()]
    assert len(hints) == int(hinted)
    if hinted:
        assert hints[0].startswith("WeightPruning: AdamW runs its unfused step on CPU parameters")
