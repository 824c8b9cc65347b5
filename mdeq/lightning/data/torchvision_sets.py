"""MNIST, Fashion-MNIST and CIFAR-10 from local files (never downloaded at run time; the readers
are in :mod:`mdeq.data.sources`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdeq.lightning.data.base import ClassificationDataModule, default_cache_dir, default_data_root


class _RootedDataModule(ClassificationDataModule):
    """A DataModule whose task reads files under ``root`` (default ``$MDEQ_DATA`` or ``./data``)."""

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root) if root is not None else default_data_root()


class MNISTDataModule(_RootedDataModule, task="mnist"):
    """MNIST from ``root/MNIST/raw`` (60,000 train / 10,000 test, 28x28)."""


class FashionMNISTDataModule(_RootedDataModule, task="fashion_mnist"):
    """Fashion-MNIST from ``root/FashionMNIST/raw`` (60,000 train / 10,000 test, 28x28)."""


class CIFAR10DataModule(_RootedDataModule, task="cifar10"):
    """CIFAR-10 from ``root/cifar-10-batches-py/`` or an archive ``root/CIFAR10/cifar-10-batches-py.tar.xz``
    (or ``root/cifar-10-python.tar.gz``), unpacked once into ``cache_dir``. Batch files are read
    directly (the pickles hold only arrays, lists and strings), so rebuilt copies whose md5s
    differ from torchvision's list load too."""

    def __init__(self, root: str | None = None, cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
