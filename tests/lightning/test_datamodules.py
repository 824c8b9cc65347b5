"""DataModules: the embedded digits, real datasets when present, clear errors when absent."""

from __future__ import annotations

import pytest
import torch

from mdeq.lightning import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from mdeq.lightning.data import EpochSeededSampler
from tests.lightning.conftest import real_data_root


def test_digits_split_is_seeded_and_normalised():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    a.setup(), b.setup()
    assert len(a.train_set) + len(a.val_set) == 1437 and len(a.test_set) == 360
    assert a.train_set.indices == b.train_set.indices
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long
    xs = torch.stack([a.test_set[i][0] for i in range(len(a.test_set))])
    assert abs(float(xs.mean())) < 0.1 and abs(float(xs.std()) - 1) < 0.1
    c = DigitsDataModule(seed=1)
    c.setup()
    assert c.train_set.indices != a.train_set.indices


def test_sampler_depends_on_seed_and_epoch_only():
    s = EpochSeededSampler(list(range(50)), seed=3)
    torch.manual_seed(123)
    first = list(s)
    torch.manual_seed(999)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(50))


@pytest.mark.parametrize("cls, folder", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST"), (CIFAR10DataModule, "CIFAR")])
def test_missing_dataset_names_path_and_fix(cls, folder, tmp_path):
    dm = cls(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=rf"{folder}.*not found.*nowhere.*MDEQ_DATA"):
        dm.setup()


@pytest.mark.skipif(real_data_root() is None, reason="../shared/data not present: real-data tests skipped")
@pytest.mark.parametrize("cls, shape, mean", [(MNISTDataModule, (1, 28, 28), 0.1307), (FashionMNISTDataModule, (1, 28, 28), 0.2860)])
def test_real_mnist_like_data(cls, shape, mean):
    dm = cls(root=str(real_data_root()), val_fraction=0.0, normalize=False)
    dm.setup()
    assert len(dm.train_set) == 60000 and len(dm.test_set) == 10000
    x, y = dm.test_set[0]
    assert x.shape == shape
    train_mean = float(dm.train_set.dataset.images.float().mean() / 255)
    assert abs(train_mean - mean) < 1e-3
    assert torch.bincount(dm.test_set.labels, minlength=10).min() >= 800


@pytest.mark.skipif(real_data_root() is None, reason="../shared/data not present: real-data tests skipped")
def test_real_cifar10_from_the_archive():
    dm = CIFAR10DataModule(root=str(real_data_root()), val_fraction=0.0, normalize=False)
    dm.setup()
    assert len(dm.train_set) == 50000 and len(dm.test_set) == 10000
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
    mean = dm.test_set.images.float().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(mean, torch.tensor([0.4942, 0.4851, 0.4504]), atol=2e-3, rtol=0)


def test_cifar_augmentation_changes_images_but_not_labels():
    dm = SyntheticDataModule(input_shape=(3, 32, 32), augment=True)
    dm.setup()
    ds = dm.train_set.dataset
    torch.manual_seed(0)
    a = ds[0][0]
    torch.manual_seed(1)
    b = ds[0][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b) and ds[0][1] == ds[0][1]
