"""Reference digit classifiers: a small CNN and an MLP, both plain LightningModules."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def _check_widths(name: str, widths: Sequence[int]) -> list[int]:
    widths = list(widths)
    if not widths or any(int(w) != w or w < 1 for w in widths):
        raise ValueError(f"{name}: expected a non-empty list of positive integers, but got {widths}")
    return [int(w) for w in widths]


class DigitsClassifier(L.LightningModule):
    """Shared training logic: cross-entropy, Adam or SGD, and accuracy through torchmetrics.

    Subclasses build ``self.features`` and ``self.classifier``. Logs ``train_loss``,
    ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc``.
    """

    def __init__(
        self, lr: float = 1e-3, weight_decay: float = 0.0, optimizer: str = "adam", num_classes: int = 10
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr: expected a positive learning rate, but got {lr}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adam' or 'sgd', but got {optimizer!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.num_classes = num_classes
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.val_acc(logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("test_loss", F.cross_entropy(logits, labels))
        self.test_acc(logits, labels)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        return self(images).argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DigitsCNN(DigitsClassifier):
    """Convolution, BatchNorm and ReLU blocks over 1x8x8 digits, then a two-layer head.

    Layer names: ``features.{0,1,2}.conv``/``.bn`` for the blocks (pooling after the second and
    the last), ``classifier.0`` (hidden Linear) and ``classifier.2`` (the output head).

    Args:
        channels: Output channels of each convolution block.
        hidden: Width of the hidden Linear layer of the head.
        dropout: Dropout before the output layer.
        lr: Learning rate.
        weight_decay: L2 penalty of the optimizer.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        hidden: int = 64,
        dropout: float = 0.1,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        channels = _check_widths("channels", channels)
        if len(channels) > 3:
            raise ValueError(f"channels: expected at most 3 blocks for 8x8 images, but got {channels}")
        if hidden < 1:
            raise ValueError(f"hidden: expected a positive integer, but got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), but got {dropout}")
        self.save_hyperparameters()

        blocks, size, in_channels = [], 8, 1
        for index, out_channels in enumerate(channels):
            block = nn.Sequential()
            block.add_module("conv", nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
            block.add_module("bn", nn.BatchNorm2d(out_channels))
            block.add_module("relu", nn.ReLU())
            if index >= 1:
                block.add_module("pool", nn.MaxPool2d(2))
                size //= 2
            blocks.append(block)
            in_channels = out_channels
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * size * size, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )
        self.example_input_array = torch.zeros(1, 1, 8, 8)


class DigitsMLP(DigitsClassifier):
    """Fully connected classifier over the 64 pixels of a digit.

    Layer names: ``features.1``, ``features.4``, ... for the hidden Linear layers and ``classifier``
    for the head.

    Args:
        hidden: Widths of the hidden layers.
        dropout: Dropout after each hidden layer.
        lr: Learning rate.
        weight_decay: L2 penalty of the optimizer.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
    """

    def __init__(
        self,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.1,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        hidden = _check_widths("hidden", hidden)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), but got {dropout}")
        self.save_hyperparameters()

        layers: list[nn.Module] = [nn.Flatten()]
        in_features = 64
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
            in_features = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, 10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)
