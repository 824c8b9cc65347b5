"""Shared DataModule machinery: tasks, seeded splits, loaders (DataLoader or on the device)."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from mdeq.data.normalized import NormalizedTensorDataset
from mdeq.lightning.data.device_resident import DeviceBatches
from mdeq.lightning.data.sampler import EpochSeededSampler  # noqa: F401 (re-exported)
from mdeq.data.sources import DatasetNotFoundError, default_cache_dir, default_data_root  # noqa: F401 (re-exported)
from mdeq.data.tasks import Task, get_task


class ClassificationDataModule(pl.LightningDataModule):
    """Base for image classification data: train/val/test datasets, seeded split, loaders.

    ``augment`` turns on random crops (zero padding ``crop_padding``) and, with ``flip``, random
    horizontal flips (right for CIFAR, wrong for digits).

    ``data_on_device=True`` keeps the images on the training device (as read: uint8 for the image
    files) and makes every batch there (:class:`~mdeq.lightning.data.device_resident.DeviceBatches`:
    the same samples per batch as the DataLoader path, augmentation drawn on the device, no worker
    and no host copy per step); the GPU recipes use it. ``num_workers`` must then be 0.

    A DataModule of a registered task (:mod:`mdeq.data.tasks`) names it in its class statement,
    ``class MNISTDataModule(ClassificationDataModule, task="mnist")``: normalisation, input shape,
    classes and the file reader come from the task, declared once. Others implement :meth:`load`
    returning (train_images, train_labels, test_images, test_labels) and set
    ``mean``/``std``/``num_classes``/``input_shape``.
    """

    task: ClassVar[Task | None] = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    num_classes: int = 10
    input_shape: tuple[int, ...] = (1, 28, 28)
    scale: float = 255.0

    def __init_subclass__(cls, task: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if task is not None:
            t = get_task(task)
            cls.task = t
            cls.mean, cls.std, cls.input_shape, cls.scale = t.mean, t.std, t.input_shape, t.scale
            cls.num_classes = t.num_classes or 0

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        normalize: bool = True,
        augment: bool = False,
        limit_train: int | None = None,
        limit_test: int | None = None,
        crop_padding: int = 4,
        flip: bool = True,
        data_on_device: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(data_on_device, bool):
            raise ValueError(f"data_on_device must be true or false, got {data_on_device!r}")
        if data_on_device and num_workers:
            raise ValueError(
                f"data_on_device=True makes the batches on the training device, where worker processes cannot help; "
                f"set num_workers to 0 (got {num_workers})"
            )
        self.data_on_device = data_on_device
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}  # data_on_device: split -> (images, labels) as read
        self.crop_padding, self.flip = crop_padding, flip
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 pixels, got {crop_padding}")
        for what, n in (("limit_train", limit_train), ("limit_test", limit_test)):
            if n is not None and n < 1:
                raise ValueError(f"{what} must be a positive number of images (or None for all), got {n}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.normalize = normalize
        self.augment = augment
        self.limit_train = limit_train
        self.limit_test = limit_test
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The arrays, read by the task's reader (from ``root``/``cache_dir`` where the module has them)."""
        if self.task is None:  # pragma: no cover - abstract
            raise NotImplementedError(f"{type(self).__name__} names no task; implement load()")
        return self.task.read(getattr(self, "root", None), getattr(self, "cache_dir", None), seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_tr, y_tr, x_te, y_te = self.load()
        if self.limit_train is not None:
            x_tr, y_tr = x_tr[: self.limit_train], y_tr[: self.limit_train]
        if self.limit_test is not None:
            x_te, y_te = x_te[: self.limit_test], y_te[: self.limit_test]
        mean, std = (self.mean, self.std) if self.normalize else (None, None)
        train_full = NormalizedTensorDataset(
            x_tr, y_tr, mean, std, augment=self.augment, scale=self.scale, crop_padding=self.crop_padding, flip=self.flip
        )
        eval_train = NormalizedTensorDataset(x_tr, y_tr, mean, std, augment=False, scale=self.scale)
        n_val = int(round(self.val_fraction * len(y_tr)))
        perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.train_set = Subset(train_full, train_idx)
        self.val_set = Subset(eval_train, val_idx) if n_val else None
        self.test_set = NormalizedTensorDataset(x_te, y_te, mean, std, augment=False, scale=self.scale)
        if self.data_on_device:
            train_rows, val_rows = torch.tensor(train_idx, dtype=torch.long), torch.tensor(val_idx, dtype=torch.long)
            self._splits = {"train": (x_tr[train_rows], y_tr[train_rows]), "test": (x_te, y_te)}
            if n_val:
                self._splits["val"] = (x_tr[val_rows], y_tr[val_rows])

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _device_batches(self, split: str, train: bool) -> DeviceBatches:
        images, labels = self._splits[split]
        device = self._device()
        if images.device != device:  # moved once, then kept there
            images, labels = images.to(device), labels.to(device)
            self._splits[split] = (images, labels)
        mean, std = (self.mean, self.std) if self.normalize else (None, None)
        return DeviceBatches(
            images, labels, self.batch_size if train else self.eval_batch_size, mean, std, scale=self.scale, shuffle=train,
            augment=train and self.augment, crop_padding=self.crop_padding, flip=self.flip, seed=self.seed,
        )

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        sampler = EpochSeededSampler(ds, seed=self.seed, shuffle=train)
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        if self.data_on_device:
            return self._device_batches("train", train=True)
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._device_batches("val", train=False) if self.data_on_device else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None, "call setup() first"
        if self.data_on_device:
            return self._device_batches("test", train=False)
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def describe(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "input_shape": self.input_shape, "mean": self.mean, "std": self.std}
