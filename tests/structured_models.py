"""Models for the structured pruning tests, written the way users write LightningModules."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class ResidualCNN(L.LightningModule):
    """A digits CNN with a residual block and a 1-output-channel convolution.

    ``squeeze`` maps the ``expand`` channels to one 8x8 map, which ``spatial`` projects onto the
    pooled features; ``head`` is the output layer. SGD with a StepLR schedule.
    """

    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.squeeze = nn.Conv2d(2 * width, 1, 1)
        self.spatial = nn.Linear(64, 2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(images)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.expand(x))
        spatial = self.spatial(self.squeeze(x).flatten(1))
        return self.head(x.mean(dim=(2, 3)) + spatial)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def test_step(self, batch, batch_idx):
        images, labels = batch
        accuracy = (self(images).argmax(1) == labels).float().mean()
        self.log("test_accuracy", accuracy)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TokenMLP(L.LightningModule):
    """A transformer-style block over the 8 rows of a digit as 8 tokens of 8 features.

    ``embed`` -> pre-norm MLP block (``norm``, ``fc1``, GELU, ``fc2``) with a residual addition ->
    ``head`` over the mean token. The training batch is a dict, so tracing needs
    ``example_input_array``. Adam without a scheduler.
    """

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)
        self.example_input_array = torch.zeros(1, 8, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(dim=1))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["tokens"]), batch["label"])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class ChainMLP(nn.Module):
    """Three chained Linear layers: 64 -> hidden -> hidden -> 10."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DictDigits(torch.utils.data.Dataset):
    """Random digit-shaped samples as dicts, as some user datasets return them."""

    def __init__(self, size: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randn(size, 8, 8, generator=generator)
        self.labels = torch.randint(0, 10, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[index], "label": self.labels[index]}
