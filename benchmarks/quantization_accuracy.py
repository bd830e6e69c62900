"""Test accuracy of the digits CNN: float, QAT converted to int8, and static PTQ to int8.

Usage: python benchmarks/quantization_accuracy.py [--seeds 0 1 2] [--epochs 15] [--recipes ...]

The float model is trained as in ``examples/configs/digits_baseline.yaml`` and tested after its
last epoch. Static PTQ calibrates it on 32 training batches (``examples/configs/digits_ptq.yaml``).
The QAT recipes, each converted to the int8 deploy modules:

* ``delayed``: one fit with the float model's budget, float for the first two thirds of the
  epochs, then QAT at a tenth of the learning rate with BatchNorm frozen halfway through the QAT
  phase and observers at three quarters (``examples/configs/digits_qat.yaml``). It is also
  compared with a float model trained with the same drop of the learning rate.
* ``scratch``: QAT from the first step with the same budget.
* ``finetune``: a second fit from the trained float model, a third of the epochs at a tenth of the
  learning rate.

Accuracies are those of the test split (359 images, so one image is 0.28 points).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from tabulate import tabulate

from lightning_weightlight.demo import DigitsCNN, DigitsDataModule
from lightning_weightlight.quantization import QuantizationAwareTraining, convert, quantize_model


def make_trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def evaluate_accuracy(model: torch.nn.Module, data: DigitsDataModule) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += labels.numel()
    return 100.0 * correct / total


RECIPES = ("delayed", "scratch", "finetune")
LR_SCALE = 0.1


class ScaleLearningRate(Callback):
    """Multiply the learning rates by ``factor`` once, at optimizer step ``step`` (the float reference)."""

    def __init__(self, step: int, factor: float) -> None:
        self.step = step
        self.factor = factor
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.done:
            self.done = True
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= self.factor


def delayed_start(epochs: int, steps_per_epoch: int) -> int:
    """Return the first QAT step of the one-fit recipe: two thirds of the epochs train in float."""
    return (2 * epochs // 3) * steps_per_epoch


def delayed_qat_callback(epochs: int, steps_per_epoch: int) -> QuantizationAwareTraining:
    """Build the one-fit recipe of ``examples/configs/digits_qat.yaml``, scaled to ``epochs``.

    With 15 epochs of 19 steps: float until step 190, BatchNorm frozen at 237, observers at 261.
    """
    start = delayed_start(epochs, steps_per_epoch)
    qat_steps = epochs * steps_per_epoch - start
    return QuantizationAwareTraining(
        start_step=start,
        start_lr_scale=LR_SCALE,
        freeze_bn_step=start + qat_steps // 2,
        freeze_observer_step=start + (3 * qat_steps) // 4,
    )


def measure(seed: int, epochs: int, recipes: list[str]) -> dict[str, float]:
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    steps_per_epoch = len(data.train_dataloader())

    L.seed_everything(seed)
    dense = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.002)
    make_trainer(epochs, []).fit(dense, data)
    row = {"seed": seed, "float": evaluate_accuracy(dense, data)}

    ptq = quantize_model(dense, "static", data.train_dataloader(), num_batches=32, progress=False)
    row["static PTQ int8"] = evaluate_accuracy(ptq.model, data)
    row["PTQ output SQNR (dB)"] = ptq.sqnr_db["output"]

    if "delayed" in recipes:
        L.seed_everything(seed)
        dropped = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.002)
        lr_drop = ScaleLearningRate(delayed_start(epochs, steps_per_epoch), LR_SCALE)
        make_trainer(epochs, [lr_drop]).fit(dropped, data)
        row["float, same LR drop"] = evaluate_accuracy(dropped, data)

        L.seed_everything(seed)
        delayed = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.002)
        make_trainer(epochs, [delayed_qat_callback(epochs, steps_per_epoch)]).fit(delayed, data)
        row["QAT in one fit, fake quant"] = evaluate_accuracy(delayed, data)
        row["QAT in one fit, int8"] = evaluate_accuracy(convert(delayed), data)

    if "scratch" in recipes:
        L.seed_everything(seed)
        scratch = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.002)
        make_trainer(epochs, [QuantizationAwareTraining(freeze_bn_step=200, freeze_observer_step=240)]).fit(
            scratch, data
        )
        row["QAT from scratch, fake quant"] = evaluate_accuracy(scratch, data)
        row["QAT from scratch, int8"] = evaluate_accuracy(convert(scratch), data)

    if "finetune" not in recipes:
        return row

    # Fine-tuning: the trained float model, a tenth of the learning rate, a third of the epochs.
    L.seed_everything(seed)
    finetuned = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.0002)
    finetuned.load_state_dict(dense.state_dict())
    finetune_epochs = max(1, epochs // 3)
    steps = finetune_epochs * len(data.train_dataloader())
    callback = QuantizationAwareTraining(freeze_bn_step=steps // 2, freeze_observer_step=(3 * steps) // 4)
    make_trainer(finetune_epochs, [callback]).fit(finetuned.train(), data)
    row["QAT fine-tuned, int8"] = evaluate_accuracy(convert(finetuned), data)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each model")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--recipes", nargs="+", choices=RECIPES, default=list(RECIPES), help="QAT recipes to measure"
    )
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        rows.append(measure(seed, args.epochs, args.recipes))
        print(rows[-1], flush=True)
    print(tabulate(rows, headers="keys", floatfmt=".2f"))


if __name__ == "__main__":
    main()
