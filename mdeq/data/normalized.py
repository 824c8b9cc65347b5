"""Images held as one tensor, normalised (and optionally augmented) per item."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


class NormalizedTensorDataset(Dataset):
    """Images (uint8 or float, N x C x H x W) and labels; normalisation and optional CIFAR-style
    augmentation (random crop with padding, horizontal flip) applied per item."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        augment: bool = False,
        scale: float = 255.0,
        crop_padding: int = 4,
        flip: bool = True,
    ) -> None:
        self.images, self.labels = images, labels.long()
        self.flip = flip
        c = images.shape[1]
        self.mean = torch.tensor(mean if mean is not None else [0.0] * c).view(c, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * c).view(c, 1, 1)
        self.scale, self.augment, self.pad = scale, augment, crop_padding

    def __len__(self) -> int:
        return len(self.labels)

    def normalized(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor]:
        """Images ``start:stop`` normalised as one batch (no augmentation), with their labels."""
        x = self.images[start:stop].float() / self.scale
        return (x - self.mean) / self.std, self.labels[start:stop]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].float() / self.scale
        if self.augment:
            h, w = x.shape[1:]
            padded = torch.nn.functional.pad(x, [self.pad] * 4)
            top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
            x = padded[:, top : top + h, left : left + w]
            if self.flip and bool(torch.rand(()) < 0.5):
                x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]
