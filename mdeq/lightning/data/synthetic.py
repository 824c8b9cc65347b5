"""Synthetic data for tests and smoke runs: learnable, seeded, any shape."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from mdeq.lightning.data.base import ClassificationDataModule, EpochSeededSampler


class SyntheticDataModule(ClassificationDataModule):
    """Gaussian images whose label is the argmax of a fixed random linear map of the image."""

    def __init__(self, num_train: int = 256, num_test: int = 64, input_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10, **kwargs) -> None:
        super().__init__(normalize=False, **kwargs)
        self.num_train, self.num_test = num_train, num_test
        self.input_shape = tuple(input_shape)  # type: ignore[assignment]
        self.num_classes = num_classes
        self.scale = 1.0

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        n = self.num_train + self.num_test
        x = torch.randn(n, *self.input_shape, generator=g)
        w = torch.randn(x[0].numel(), self.num_classes, generator=g)
        y = (x.flatten(1) @ w).argmax(1)
        return x[: self.num_train], y[: self.num_train], x[self.num_train :], y[self.num_train :]


class LinearToyDataModule(pl.LightningDataModule):
    """The classic DEQ toy: train on x = 1..10 with y = slope * x; validate/test on points that
    include negatives (x = -5 should give -10 for slope 2)."""

    def __init__(self, slope: float = 2.0, batch_size: int = 10) -> None:
        super().__init__()
        self.slope, self.batch_size = slope, batch_size

    def setup(self, stage: str | None = None) -> None:
        x = torch.arange(1.0, 11.0).unsqueeze(1)
        x_test = torch.tensor([[-5.0], [0.0], [3.5], [12.0]])
        self.train_set = TensorDataset(x, self.slope * x)
        self.test_set = TensorDataset(x_test, self.slope * x_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=EpochSeededSampler(self.train_set))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=len(self.test_set))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
