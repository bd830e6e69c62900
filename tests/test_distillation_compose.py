"""DistillationModule beside WeightPruning, StructuredPruning and QuantizationAwareTraining.

The callbacks see the DistillationModule, where the student's layers are named
``student.<name>``; their patterns use the student's own names, through ``compression_target``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.distillation import DistillationModule, compression_target, student_state_dict

pruning = pytest.importorskip("lightning_weightlight.pruning")
structured = pytest.importorskip("lightning_weightlight.pruning.structured")
quantization = pytest.importorskip("lightning_weightlight.quantization")


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    return datamodule


def distiller() -> tuple[DistillationModule, DigitsCNN, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    teacher = DigitsCNN(channels=[8, 16, 16], hidden=32)
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    return DistillationModule(DigitsCNN(channels=[8, 8, 8], hidden=16), teacher), teacher, before


def assert_teacher_unchanged(teacher: DigitsCNN, before: dict[str, torch.Tensor]) -> None:
    assert type(teacher.features[0].conv) is nn.Conv2d
    for key, value in teacher.state_dict().items():
        assert torch.equal(before[key], value), key


def test_compression_target_is_student():
    module, _, _ = distiller()
    assert compression_target(module) is module.student
    plain = DigitsCNN()
    assert compression_target(plain) is plain


def zero_count(module: nn.Module) -> int:
    return int((module.weight == 0).sum())


def test_weight_pruning_prunes_student_only(make_trainer, digits, tmp_path):
    module, teacher, before = distiller()
    callback = pruning.WeightPruning(sparsity=0.5, include="features.*")
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, digits)

    for index in range(3):
        conv = module.student.features[index].conv
        assert zero_count(conv) == round(0.5 * conv.weight.numel())
    assert zero_count(module.student.classifier[0]) == 0
    assert_teacher_unchanged(teacher, before)

    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    fresh = DigitsCNN(channels=[8, 8, 8], hidden=16)
    fresh.load_state_dict(student_state_dict(path), strict=True)
    assert zero_count(fresh.features[1].conv) == round(0.5 * fresh.features[1].conv.weight.numel())


def test_qat_swaps_student_layers_only(make_trainer, digits):
    module, teacher, before = distiller()
    callback = quantization.QuantizationAwareTraining(include="features.*")
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, digits)

    assert type(module.student.features[0].conv) is not nn.Conv2d
    assert type(module.student.classifier[0]) is nn.Linear
    assert torch.isfinite(trainer.callback_metrics["distill/total_loss"])
    assert_teacher_unchanged(teacher, before)


def test_structured_pruning_shrinks_student_only(make_trainer, digits):
    module, teacher, before = distiller()
    callback = structured.StructuredPruning(amount=0.5, importance="l1", ignore="classifier.*", strict=True)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, digits)

    assert [module.student.features[i].conv.out_channels for i in range(3)] == [4, 4, 4]
    assert module.student.classifier[0].out_features == 16
    assert module.student.classifier[3].out_features == 10
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    assert_teacher_unchanged(teacher, before)
