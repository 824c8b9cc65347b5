"""A dataset kept on the training device as uint8, batched and augmented there.

For small image datasets (CIFAR-10 is 150 MiB as uint8) the usual DataLoader path costs more
than the model on a GPU: worker processes decode and augment per item, and every batch is
copied from the host. :class:`DeviceBatches` holds the images once on the device and makes each
batch with a gather, a random translation and flip drawn per sample on the device, and the
normalisation: no worker, no host copy, no host read per step.

The batches hold the same samples as the DataLoader path's: the indices come from the same
:class:`~mdeq.lightning.data.sampler.EpochSeededSampler` (seeded permutation per epoch, rank r of W
takes every W-th index), which Lightning re-seeds at every epoch through ``.sampler.set_epoch``.
Augmentation draws come from a generator on the device seeded by (seed, epoch, rank), so a run
resumed at an epoch boundary sees the batches of an uninterrupted run.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from mdeq.lightning.data.sampler import EpochSeededSampler


class DeviceBatches:
    """Batches of ``images`` (N x C x H x W, best uint8) and ``labels``, made on ``images.device``.

    ``augment``: translate each image by up to ``crop_padding`` pixels in each direction (the
    uncovered border is zero, as a zero-padded random crop) and, with ``flip``, mirror it
    horizontally with probability 1/2. Then ``(x / scale - mean) / std``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        scale: float = 255.0,
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
    ) -> None:
        if images.ndim != 4 or images.is_complex():
            raise ValueError(f"DeviceBatches holds real images of shape (N, C, H, W) (uint8 keeps them small), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 pixels, got {crop_padding}")
        self.images, self.labels = images, labels.long().to(images.device)
        self.batch_size, self.scale, self.seed = batch_size, float(scale), seed
        self.augment, self.pad, self.flip = augment, crop_padding, flip
        c = images.shape[1]
        self.mean = torch.tensor(list(mean) if mean is not None else [0.0] * c, device=images.device).view(1, c, 1, 1)
        self.std = torch.tensor(list(std) if std is not None else [1.0] * c, device=images.device).view(1, c, 1, 1)
        # Lightning calls .sampler.set_epoch(epoch) at every epoch (and shards it under DDP)
        self.sampler = EpochSeededSampler(range(len(images)), seed=seed, shuffle=shuffle)  # type: ignore[arg-type]
        self.batch_sampler = None  # (what Lightning inspects on a loader: the indices come from .sampler alone)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long).to(self.device, non_blocking=True)  # once per epoch
        generator = None
        if self.augment:
            generator = torch.Generator(device=self.device)
            generator.manual_seed((self.seed * 1_000_003 + self.sampler.epoch) * 1_009 + self.sampler.rank)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if generator is not None:
                x = self._augmented(x, generator)
            yield (x.float() / self.scale - self.mean) / self.std, self.labels[idx]

    def _augmented(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random translation (zero fill) and horizontal flip per sample: one gather, no host read."""
        n, c, h, w = x.shape
        p = self.pad
        dev = x.device
        shift = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=dev)
        rows = shift[0, :, None] + torch.arange(h, device=dev)  # rows of the zero-padded image
        cols = torch.arange(w, device=dev).expand(n, w)
        if self.flip:
            flipped = torch.rand(n, generator=generator, device=dev) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(-1), cols)
        cols = shift[1, :, None] + cols
        padded = torch.nn.functional.pad(x, [p, p, p, p]) if p else x
        return padded[
            torch.arange(n, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
