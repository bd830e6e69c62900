"""QAT beside WeightPruning in one fit, in either callback order: int8 weights keep the pruned zeros."""

from __future__ import annotations

import pytest
import torch

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.kernels import layers
from lightning_weightlight.pruning import WeightPruning
from lightning_weightlight.quantization import QuantizationAwareTraining, convert


def int8_weight(module) -> torch.Tensor:
    if isinstance(module, (layers.SparseInt8Linear, layers.SparseInt8Conv2d)):
        return module.q_weight()
    return module.weight


@pytest.mark.parametrize("qat_first", [True, False])
def test_pruned_zeros_survive_qat_and_conversion(make_trainer, qat_first):
    torch.manual_seed(0)
    model = DigitsCNN(channels=[8, 16], hidden=32)
    pruning = WeightPruning(sparsity=0.6, exclude_head=True)
    qat = QuantizationAwareTraining(freeze_bn_step=4)
    callbacks = [qat, pruning] if qat_first else [pruning, qat]
    make_trainer(max_steps=8, callbacks=callbacks, limit_val_batches=0).fit(
        model, DigitsDataModule(batch_size=32)
    )
    model.eval()

    masks = {name: mask.clone() for name, mask in pruning.state_dict()["masks"].items()}
    assert set(masks) == {"features.0.conv.weight", "features.1.conv.weight", "classifier.0.weight"}
    deployed = convert(model, sparse="auto")
    for name, mask in masks.items():
        module = deployed.get_submodule(name.removesuffix(".weight"))
        weight = int8_weight(module).reshape(mask.shape[0], -1)
        pruned = ~mask.reshape(mask.shape[0], -1)
        assert int(pruned.sum()) == round(0.6 * mask.numel()), name
        assert not weight[pruned].any(), name
    assert isinstance(deployed.features[0].conv, layers.SparseInt8Conv2d)
