"""``DigitsDataModule``: scikit-learn's bundled 8x8 handwritten digits, no download needed."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(L.LightningDataModule):
    """The 1,797 handwritten digits of ``sklearn.datasets.load_digits`` as 1x8x8 float images.

    The split into train, validation and test sets is stratified by class and fixed by ``seed``.
    Pixels are scaled to [0, 1] and then standardised with the mean and standard deviation of the
    training pixels.

    Args:
        batch_size: Samples per batch in every dataloader.
        val_fraction: Share of the samples held out for validation.
        test_fraction: Share of the samples held out for testing.
        seed: Seed of the split; the same seed always gives the same three sets.
        normalize: Standardise pixels with the training statistics.
        num_workers: Worker processes of each dataloader.
        flatten: Give 64-element vectors instead of 1x8x8 images.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), labels.dtype
        ((32, 1, 8, 8), torch.int64)
    """

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        normalize: bool = True,
        num_workers: int = 0,
        flatten: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, but got {batch_size}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}: expected a value in (0, 1), but got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction: expected less than 1 so that training data remains, "
                f"but got {val_fraction} + {test_fraction}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers: expected 0 or more, but got {num_workers}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.normalize = normalize
        self.num_workers = num_workers
        self.flatten = flatten
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _split_indices(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        train, val, test = [], [], []
        for cls in range(self.num_classes):
            members = rng.permutation(np.flatnonzero(labels == cls))
            n_test = round(len(members) * self.test_fraction)
            n_val = round(len(members) * self.val_fraction)
            test.append(members[:n_test])
            val.append(members[n_test : n_test + n_val])
            train.append(members[n_test + n_val :])
        return tuple(np.sort(np.concatenate(part)) for part in (train, val, test))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        train_idx, val_idx, test_idx = self._split_indices(digits.target)

        if self.normalize:
            train_pixels = images[torch.from_numpy(train_idx)]
            mean, std = train_pixels.mean(), train_pixels.std()
            images = (images - mean) / std
        images = images.reshape(-1, 64) if self.flatten else images.unsqueeze(1)

        def subset(idx: np.ndarray) -> TensorDataset:
            index = torch.from_numpy(idx)
            return TensorDataset(images[index], labels[index])

        self.train_set = subset(train_idx)
        self.val_set = subset(val_idx)
        self.test_set = subset(test_idx)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("DigitsDataModule: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
