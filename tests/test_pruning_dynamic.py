"""DynamicPruning on a real Trainer: constant sparsity while the mask moves, RigL scores, resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_weightlight.pruning import DynamicPruning, PolynomialDecay
from tests.pruning_models import UserRegressor

HIDDEN = ("encoder.0.weight", "encoder.2.weight")


def masks_of(pruning: DynamicPruning) -> dict[str, torch.Tensor]:
    return {name: mask.clone() for name, mask in pruning.state_dict()["masks"].items()}


class MaskHistory(Callback):
    """Record the callback's masks and the weights' zeros after every optimizer step."""

    def __init__(self, pruning: DynamicPruning) -> None:
        self.pruning = pruning
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.weights_match: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = masks_of(self.pruning)
        self.masks[trainer.global_step] = masks
        for name, mask in masks.items():
            self.weights_match.append(bool((pl_module.get_parameter(name)[~mask] == 0).all()))


@pytest.mark.parametrize("regrowth", ["gradient", "random"])
@pytest.mark.parametrize("pattern", ["unstructured", "1x4"])
def test_sparsity_constant_while_mask_moves(make_trainer, regrowth, pattern):
    model = UserRegressor()
    pruning = DynamicPruning(
        sparsity=0.75,
        update_every_n_steps=3,
        drop_fraction=0.5,
        stop_step=12,
        regrowth=regrowth,
        pattern=pattern,
        exclude_head=True,
    )
    history = MaskHistory(pruning)
    make_trainer(max_steps=16, callbacks=[pruning, history]).fit(model)
    for step, masks in history.masks.items():
        for name in HIDDEN:
            assert int((~masks[name]).sum()) == round(0.75 * masks[name].numel()), (step, name)
    assert all(history.weights_match)
    # Updates run at global steps 3, 6 and 9, just before those optimizer steps, so the recorder sees
    # them at the end of the batch, when the global step has moved on to 4, 7 and 10.
    assert torch.equal(history.masks[2][HIDDEN[0]], history.masks[3][HIDDEN[0]])
    assert not torch.equal(history.masks[3][HIDDEN[0]], history.masks[4][HIDDEN[0]])
    assert torch.equal(history.masks[10][HIDDEN[0]], history.masks[16][HIDDEN[0]])
    assert pruning.global_sparsity() == pytest.approx(0.75)


def test_rigl_regrows_largest_gradients(make_trainer):
    model = UserRegressor()
    pruning = DynamicPruning(
        sparsity=0.8, update_every_n_steps=4, drop_fraction=0.3, stop_step=100, include="encoder.2"
    )
    observed: dict[str, torch.Tensor] = {}

    class GradientSpy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                observed["before"] = masks_of(pruning)["encoder.2.weight"]

    class AfterUpdate(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 4:
                observed["after"] = masks_of(pruning)["encoder.2.weight"]

    class DenseGradient(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 4:
                observed["grad"] = pl_module.encoder[2].weight.grad.detach().clone()

    make_trainer(max_steps=5, callbacks=[GradientSpy(), DenseGradient(), pruning, AfterUpdate()]).fit(model)
    before, after, grad = observed["before"], observed["after"], observed["grad"].abs()
    grown = after & ~before
    assert int(grown.sum()) > 0
    # Every regrown entry has a gradient at least as large as any entry still pruned.
    still_pruned = ~after
    assert float(grad[grown].min()) >= float(grad[still_pruned].max())


def test_follows_schedule_then_moves(make_trainer):
    model = UserRegressor()
    schedule = PolynomialDecay(0.6, begin_step=0, end_step=6, every_n_steps=2)
    pruning = DynamicPruning(schedule=schedule, update_every_n_steps=4, stop_step=12, exclude_head=True)
    make_trainer(max_steps=14, callbacks=[pruning]).fit(model)
    for name in HIDDEN:
        mask = pruning.state_dict()["masks"][name]
        assert int((~mask).sum()) == round(0.6 * mask.numel())


@pytest.mark.parametrize("regrowth", ["gradient", "random"])
def test_resume_matches_uninterrupted_run(make_trainer, tmp_path, regrowth):
    def build() -> tuple[UserRegressor, DynamicPruning]:
        L.seed_everything(0)
        pruning = DynamicPruning(
            sparsity=0.7, update_every_n_steps=3, stop_step=14, regrowth=regrowth, seed=11
        )
        return UserRegressor(), pruning

    model, pruning = build()
    make_trainer(max_steps=16, callbacks=[pruning]).fit(model)

    interrupted_model, interrupted = build()
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=8, save_top_k=-1)
    make_trainer(max_steps=16, callbacks=[interrupted, saver], enable_checkpointing=True).fit(
        interrupted_model
    )
    (path,) = (tmp_path / "checkpoints").glob("*step=8.ckpt")

    resumed_model, resumed = build()
    make_trainer(max_steps=16, callbacks=[resumed]).fit(resumed_model, ckpt_path=path)
    for name, mask in masks_of(pruning).items():
        assert torch.equal(masks_of(resumed)[name], mask), name
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_default_stop_step_is_three_quarters_of_training(make_trainer):
    pruning = DynamicPruning(sparsity=0.5, update_every_n_steps=2)
    make_trainer(max_steps=20, callbacks=[pruning]).fit(UserRegressor())
    assert pruning.state_dict()["stop_step"] == 15


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"sparsity": 0.5, "pattern": "2:4"},
            r"pattern: expected 'unstructured' or a block such as '1x4', but got '2:4'",
        ),
        (
            {"sparsity": 0.5, "drop_fraction": 0.0},
            r"drop_fraction: expected a value in \(0, 1\], but got 0.0",
        ),
        (
            {"sparsity": 0.5, "drop_fraction": 1.5},
            r"drop_fraction: expected a value in \(0, 1\], but got 1.5",
        ),
        (
            {"sparsity": 0.5, "update_every_n_steps": 0},
            r"update_every_n_steps: expected an integer >= 1, but got 0",
        ),
        (
            {"sparsity": 0.5, "regrowth": "momentum"},
            r"regrowth: expected one of \['gradient', 'random'\], but got 'momentum'",
        ),
        ({"sparsity": 1.2}, r"sparsity: expected a sparsity in \[0, 1\), but got 1.2"),
        ({"sparsity": 0.5, "stop_step": 0}, r"stop_step: expected an integer >= 1, but got 0"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicPruning(**kwargs)
