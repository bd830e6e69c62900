"""A LightningModule written as a user writes one, for the pruning tests: own forward signature,
its own optimizer and LR scheduler, its own logging and dataloader."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class UserRegressor(L.LightningModule):
    """Two hidden Linear layers and a head, trained on a fixed synthetic regression set."""

    def __init__(
        self, optimizer: str = "adam", width: int = 32, samples: int = 64, batch_size: int = 8
    ) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.samples = samples
        self.batch_size = batch_size
        self.encoder = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 4)

    def forward(self, features: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.encoder(features)) * scale

    def training_step(self, batch, batch_idx):
        features, targets = batch
        loss = F.mse_loss(self(features, scale=1.0), targets)
        self.log("train/mse", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        elif self.optimizer_name == "adam-fused":
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-2, fused=True)
        elif self.optimizer_name == "rmsprop":
            optimizer = torch.optim.RMSprop(self.parameters(), lr=1e-3, momentum=0.9)
        elif self.optimizer_name == "drifting":
            optimizer = DriftingSGD(self.parameters(), lr=0.05)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(1234)
        features = torch.randn(self.samples, 16, generator=generator)
        targets = torch.randn(self.samples, 4, generator=generator)
        return DataLoader(TensorDataset(features, targets), batch_size=self.batch_size, shuffle=False)


class DriftingSGD(torch.optim.SGD):
    """SGD that also adds 0.01 to every weight after its step: an optimizer that regrows zeros."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(0.01)
        return loss


class TiedEmbeddingModel(UserRegressor):
    """A model whose output layer shares its weight with an embedding, to test counting each tensor once."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(8, 16)
        self.unembed = nn.Linear(16, 8, bias=False)
        self.unembed.weight = self.embedding.weight

    def forward(self, features: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        logits = self.unembed(features)
        return super().forward(features + logits.mean() * 0, scale=scale)
