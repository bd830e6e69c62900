"""Test accuracy of the digits CNN: float, QAT converted to int8, and static PTQ to int8.

Usage: python benchmarks/quantization_accuracy.py [--seeds 0 1 2] [--epochs 15]

The float model is trained as in ``examples/configs/digits_baseline.yaml``. Static PTQ calibrates
it on 32 training batches (``examples/configs/digits_ptq.yaml``). QAT from scratch trains a fresh
model with the same budget and the settings of ``examples/configs/digits_qat.yaml``; QAT
fine-tuning continues from the trained float model for a third of the epochs at a tenth of the
learning rate. Both QAT models are converted to the int8 deploy modules. Accuracies are those of
the test split (359 images, so one image is 0.28 points).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
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


def qat_callback() -> QuantizationAwareTraining:
    """Build the QAT callback with the settings of ``examples/configs/digits_qat.yaml``."""
    return QuantizationAwareTraining(freeze_bn_step=200, freeze_observer_step=240)


def measure(seed: int, epochs: int) -> dict[str, float]:
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")

    L.seed_everything(seed)
    dense = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.002)
    make_trainer(epochs, []).fit(dense, data)
    float_acc = evaluate_accuracy(dense, data)

    ptq = quantize_model(dense, "static", data.train_dataloader(), num_batches=32, progress=False)
    ptq_acc = evaluate_accuracy(ptq.model, data)

    L.seed_everything(seed)
    scratch = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.002)
    make_trainer(epochs, [qat_callback()]).fit(scratch, data)
    scratch_fake_acc = evaluate_accuracy(scratch, data)
    scratch_int8_acc = evaluate_accuracy(convert(scratch), data)

    # Fine-tuning: the trained float model, a tenth of the learning rate, a third of the epochs.
    L.seed_everything(seed)
    finetuned = DigitsCNN(channels=[16, 32, 64], hidden=64, lr=0.0002)
    finetuned.load_state_dict(dense.state_dict())
    finetune_epochs = max(1, epochs // 3)
    steps = finetune_epochs * len(data.train_dataloader())
    callback = QuantizationAwareTraining(freeze_bn_step=steps // 2, freeze_observer_step=(3 * steps) // 4)
    make_trainer(finetune_epochs, [callback]).fit(finetuned.train(), data)
    finetune_int8_acc = evaluate_accuracy(convert(finetuned), data)
    return {
        "seed": seed,
        "float": float_acc,
        "static PTQ int8": ptq_acc,
        "PTQ output SQNR (dB)": ptq.sqnr_db["output"],
        "QAT from scratch, fake quant": scratch_fake_acc,
        "QAT from scratch, int8": scratch_int8_acc,
        "QAT fine-tuned, int8": finetune_int8_acc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each model")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        rows.append(measure(seed, args.epochs))
        print(rows[-1], flush=True)
    print(tabulate(rows, headers="keys", floatfmt=".2f"))


if __name__ == "__main__":
    main()
