"""DistillationModule on a real Trainer: frozen teachers, checkpoints, features, caching, bad input."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.distillation import (
    DistillationModule,
    FeaturePair,
    IndexedDataset,
    kl_distillation_loss,
    student_state_dict,
)


class TaggedClassifier(L.LightningModule):
    """A model as a user writes one: keyword arguments in forward, a dict output, a scheduler."""

    def __init__(self, width: int = 16, classes: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.head = nn.Linear(width, classes)
        self.lr = lr
        self.seen_epochs = 0
        self.example_input_array = (torch.zeros(2, 6), torch.ones(2, 1))

    def forward(self, features: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.body(features if scale is None else features * scale)
        return {"logits": self.head(hidden), "hidden": hidden}

    def training_step(self, batch, batch_idx):
        features, scale, labels = batch
        loss = F.cross_entropy(self(features, scale=scale)["logits"], labels)
        self.log("my_train_loss", loss)
        return {"loss": loss, "batch_idx": batch_idx}

    def validation_step(self, batch, batch_idx):
        features, scale, labels = batch
        logits = self(features, scale=scale)["logits"]
        self.log("my_val_acc", (logits.argmax(1) == labels).float().mean())

    def on_train_epoch_end(self) -> None:
        self.seen_epochs += 1
        self.log("my_epochs", float(self.seen_epochs))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def tagged_loader(samples: int = 48, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(samples, 6, generator=generator)
    scale = torch.ones(samples, 1)
    labels = (features[:, 0] > 0).long() + (features[:, 1] > 0).long()
    return DataLoader(TensorDataset(features, scale, labels), batch_size=batch_size, shuffle=shuffle)


def teacher_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in state.items()}


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    return datamodule


def small_student() -> DigitsCNN:
    return DigitsCNN(channels=[4, 8, 8], hidden=16)


def test_teacher_frozen_and_bit_identical_after_fit(make_trainer, digits):
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    teacher.train()
    before = teacher_copy(teacher.state_dict())
    module = DistillationModule(small_student(), teacher)
    trainer = make_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(module, digits)

    after = teacher.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert not teacher.training
    assert all(not parameter.requires_grad for parameter in teacher.parameters())
    module.train()
    assert not teacher.training
    assert module.student.training


def test_teacher_outside_parameters_optimizer_and_state_dict(make_trainer, digits):
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    module = DistillationModule(small_student(), teacher)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, digits)

    teacher_ids = {id(parameter) for parameter in teacher.parameters()}
    optimized = {
        id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]
    }
    assert not teacher_ids & {id(parameter) for parameter in module.parameters()}
    assert not teacher_ids & optimized
    assert optimized == {id(parameter) for parameter in module.student.parameters()}
    assert all(key.startswith("student.") for key in module.state_dict())


def test_teacher_follows_dtype_of_module():
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    module = DistillationModule(small_student(), teacher)
    module.double()
    assert next(teacher.parameters()).dtype == torch.float64
    assert next(module.student.parameters()).dtype == torch.float64


def test_loss_is_alpha_mix_of_student_and_kl(make_trainer):
    torch.manual_seed(0)
    student, teacher = TaggedClassifier(width=8), TaggedClassifier(width=12)
    module = DistillationModule(student, teacher, alpha=0.3, temperature=2.0, output="logits")

    class CheckLoss(L.Callback):
        checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

        def on_before_backward(self, trainer, pl_module, loss):
            features, scale, labels = self.batch
            with torch.no_grad():
                student_logits = student(features, scale=scale)["logits"]
                teacher_logits = teacher(features, scale=scale)["logits"]
            expected = 0.3 * F.cross_entropy(student_logits, labels) + 0.7 * kl_distillation_loss(
                student_logits, teacher_logits, 2.0
            )
            assert abs(loss.item() - expected.item()) < 1e-6
            self.checked += 1

    check = CheckLoss()
    make_trainer(max_epochs=1, callbacks=[check]).fit(module, tagged_loader())
    assert check.checked == 3


def test_user_module_keeps_metric_names_and_hooks(make_trainer):
    student = TaggedClassifier()
    module = DistillationModule(student, TaggedClassifier(width=24), output="logits")
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, tagged_loader(), tagged_loader())

    metrics = trainer.callback_metrics
    for name in ("my_train_loss", "my_val_acc", "my_epochs", "distill/student_loss", "distill/kl_loss"):
        assert name in metrics, name
    for name in ("distill/total_loss", "distill/train_agreement", "distill/val_agreement"):
        assert name in metrics, name
    assert student.seen_epochs == 2
    assert metrics["my_epochs"].item() == 2.0
    # The StepLR of the student ran: 6 steps with step_size 2 halve the rate three times.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)


def test_checkpoint_loads_into_fresh_student(make_trainer, digits, tmp_path):
    module = DistillationModule(small_student(), DigitsCNN(channels=[8, 16, 16], hidden=32))
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)
    path = tmp_path / "distilled.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert "distillation_teachers" not in checkpoint
    fresh = small_student()
    fresh.load_state_dict(student_state_dict(path), strict=True)
    for key, value in module.student.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert checkpoint["hyper_parameters"]["alpha"] == 0.1


def test_save_teacher_stores_and_restores_teacher(make_trainer, digits, tmp_path):
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    module = DistillationModule(small_student(), teacher, save_teacher=True)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, digits)
    path = tmp_path / "with_teacher.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint["distillation_teachers"][0]) == set(teacher.state_dict())
    assert not any(key.startswith("teacher") for key in checkpoint["state_dict"])

    other_teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    restored = DistillationModule(small_student(), other_teacher, save_teacher=True)
    restored.on_load_checkpoint(checkpoint)
    for key, value in teacher.state_dict().items():
        assert torch.equal(other_teacher.state_dict()[key], value), key


def test_resume_continues_with_projections(make_trainer, digits, tmp_path):
    def build() -> DistillationModule:
        torch.manual_seed(0)
        return DistillationModule(
            small_student(),
            DigitsCNN(channels=[8, 16, 16], hidden=32),
            features=[FeaturePair(student="features.1", teacher="features.1")],
        )

    first = build()
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(first, digits)
    path = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(path)

    resumed = build()
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(resumed, digits, ckpt_path=path)
    assert trainer.global_step == 6
    assert "projections.0.weight" in resumed.state_dict()


def test_feature_pairs_get_projections_and_train(make_trainer, digits):
    torch.manual_seed(0)
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    module = DistillationModule(
        small_student(),
        teacher,
        features=[
            FeaturePair(student="features.1", teacher="features.1", weight=0.5),
            {"student": "classifier.1", "teacher": "classifier.1", "loss": "cosine"},
            FeaturePair(student="features.0.conv", teacher="features.0.conv"),
        ],
    )
    assert isinstance(module.projections["0"], nn.Conv2d)
    assert tuple(module.projections["0"].weight.shape) == (16, 8, 1, 1)
    assert isinstance(module.projections["1"], nn.Linear)
    assert tuple(module.projections["1"].weight.shape) == (32, 16)
    assert tuple(module.projections["2"].weight.shape) == (8, 4, 1, 1)
    initial = module.projections["0"].weight.detach().clone()

    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)

    assert not torch.equal(module.projections["0"].weight, initial)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.projections.parameters()} <= optimized
    for name in ("features.1", "classifier.1", "features.0.conv"):
        assert f"distill/feature_loss/{name}" in trainer.callback_metrics
    exported = module.export_student()
    assert not any("projection" in key for key in exported.state_dict())
    for model in (module.student, teacher):
        for submodule in model.modules():
            assert not submodule._forward_hooks, submodule
            assert not submodule._forward_pre_hooks, submodule


def test_projections_join_scheduler(make_trainer):
    student, teacher = TaggedClassifier(width=8), TaggedClassifier(width=12)
    module = DistillationModule(
        student, teacher, output="logits", features=[FeaturePair(student="body", teacher="body")]
    )
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, tagged_loader())
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2
    assert groups[1]["lr"] == groups[0]["lr"] == pytest.approx(0.05 * 0.5)


def test_weighted_teachers_average_losses(make_trainer):
    torch.manual_seed(0)
    student = TaggedClassifier(width=8)
    teachers = [TaggedClassifier(width=12), TaggedClassifier(width=20)]
    module = DistillationModule(student, teachers, teacher_weights=[3.0, 1.0], alpha=0.0, output="logits")
    assert module.teacher_weights == [0.75, 0.25]

    class CheckLoss(L.Callback):
        checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

        def on_before_backward(self, trainer, pl_module, loss):
            features, scale, _ = self.batch
            with torch.no_grad():
                student_logits = student(features, scale=scale)["logits"]
                losses = [
                    kl_distillation_loss(student_logits, t(features, scale=scale)["logits"], 3.0)
                    for t in teachers
                ]
            assert abs(loss.item() - (0.75 * losses[0] + 0.25 * losses[1]).item()) < 1e-6
            self.checked += 1

    check = CheckLoss()
    make_trainer(max_epochs=1, callbacks=[check]).fit(module, tagged_loader())
    assert check.checked == 3


class CountingTeacher(TaggedClassifier):
    def __init__(self) -> None:
        super().__init__(width=12)
        self.samples_seen = 0

    def forward(self, features, scale=None):
        self.samples_seen += features.shape[0]
        return super().forward(features, scale)


def test_cached_teacher_logits_run_teacher_once_per_sample(make_trainer):
    teacher = CountingTeacher()
    module = DistillationModule(
        TaggedClassifier(width=8), teacher, output="logits", cache_teacher_logits=True
    )
    dataset = IndexedDataset(tagged_loader().dataset)
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = make_trainer(max_epochs=3)
    trainer.fit(module, loader)
    # 48 samples in one pass, then everything comes from the cache.
    assert teacher.samples_seen == 48 + 2  # plus the 2-row example_input_array probe
    assert len(module._logit_cache) == 48


def test_cached_teacher_logits_reject_plain_batches(make_trainer):
    module = DistillationModule(
        TaggedClassifier(width=8), TaggedClassifier(width=12), output="logits", cache_teacher_logits=True
    )
    with pytest.raises(ValueError, match="IndexedDataset"):
        make_trainer(max_epochs=1).fit(module, tagged_loader())


def test_teacher_from_lightning_checkpoint(make_trainer, digits, tmp_path):
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(teacher, digits)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)

    by_class = DistillationModule(
        small_student(),
        teacher_class_path="lightning_weightlight.demo.DigitsCNN",
        teacher_checkpoint=str(path),
    )
    by_module = DistillationModule(
        small_student(), DigitsCNN(channels=[8, 16, 16], hidden=32), teacher_checkpoint=str(path)
    )
    for loaded in (by_class.teachers[0], by_module.teachers[0]):
        assert not loaded.training
        for key, value in teacher.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


class NoForwardStudent(TaggedClassifier):
    def training_step(self, batch, batch_idx):
        features, _, labels = batch
        return F.cross_entropy(self.head(self.body(features)), labels)


def test_student_without_forward_call_raises(make_trainer):
    module = DistillationModule(NoForwardStudent(), TaggedClassifier(), output="logits")
    with pytest.raises(RuntimeError, match=re.escape("self(...)")):
        make_trainer(max_epochs=1).fit(module, tagged_loader())


class ManualStudent(TaggedClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, r"alpha: expected a value in \[0, 1\], but got 1.5"),
        ({"alpha": -0.1}, r"alpha: .* but got -0.1"),
        ({"temperature": 0.0}, "temperature: expected a value greater than 0, but got 0.0"),
        ({"logit_loss": "l1"}, "logit_loss: .*'l1'"),
        ({"teacher_weights": [1.0, 1.0]}, r"teacher_weights: expected 1 .* \[1.0, 1.0\]"),
        ({"features": [FeaturePair(student="body.7", teacher="body")]}, "layer 'body.7' not found"),
        ({"features": [FeaturePair(student="body", teacher="neck")]}, "layer 'neck' not found"),
        ({"features": [FeaturePair(student="body", teacher="body", loss="l1")]}, r"features\[0\].loss"),
        ({"features": [FeaturePair(student="body", teacher="body", teacher_index=1)]}, "teacher_index"),
        (
            {"features": [FeaturePair(student="body", teacher="body")], "cache_teacher_logits": True},
            "cache_teacher_logits",
        ),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationModule(TaggedClassifier(), TaggedClassifier(width=12), output="logits", **kwargs)


def test_mismatched_output_shapes_raise_before_training():
    with pytest.raises(ValueError, match=re.escape("shape (2, 3) on example_input_array, but got (2, 5)")):
        DistillationModule(TaggedClassifier(), TaggedClassifier(classes=5), output="logits")


def test_manual_optimization_student_rejected():
    with pytest.raises(ValueError, match="automatic_optimization=False"):
        DistillationModule(ManualStudent(), TaggedClassifier(), output="logits")


def test_missing_teacher_rejected():
    with pytest.raises(ValueError, match=re.escape("teacher: expected an nn.Module")):
        DistillationModule(TaggedClassifier())
    with pytest.raises(FileNotFoundError, match=re.escape("missing.ckpt")):
        DistillationModule(TaggedClassifier(), TaggedClassifier(), teacher_checkpoint="missing.ckpt")


class SelfFeedingClassifier(TaggedClassifier):
    def train_dataloader(self) -> DataLoader:
        return tagged_loader()

    def val_dataloader(self) -> DataLoader:
        return tagged_loader(samples=16)


def test_student_dataloaders_are_used(make_trainer):
    module = DistillationModule(SelfFeedingClassifier(), TaggedClassifier(width=12), output="logits")
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module)
    assert trainer.global_step == 3
    assert "my_val_acc" in trainer.callback_metrics


def test_student_without_dataloaders_keeps_defaults():
    module = DistillationModule(TaggedClassifier(), TaggedClassifier(width=12), output="logits")
    assert "train_dataloader" not in vars(module)
    assert "on_train_epoch_end" in vars(module)
