"""LightningDataModules: digits (embedded default), MNIST, Fashion-MNIST, CIFAR-10, synthetic."""

from mdeq.lightning.data.base import (
    ClassificationDataModule,
    DatasetNotFoundError,
    EpochSeededSampler,
    default_cache_dir,
    default_data_root,
)
from mdeq.lightning.data.device_resident import DeviceBatches
from mdeq.lightning.data.digits import DigitsDataModule
from mdeq.lightning.data.synthetic import LinearToyDataModule, SyntheticDataModule
from mdeq.lightning.data.torchvision_sets import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DatasetNotFoundError",
    "DeviceBatches",
    "DigitsDataModule",
    "EpochSeededSampler",
    "FashionMNISTDataModule",
    "LinearToyDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "default_cache_dir",
    "default_data_root",
]
