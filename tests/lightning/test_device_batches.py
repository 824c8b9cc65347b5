"""data_on_device: the dataset stays on the training device and batches are made there, with the
same samples per batch as the DataLoader path, seeded augmentation, DDP shards, no host read."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from mdeq.lightning import CIFAR10DataModule, ClassificationModule, ConvergenceGuard, DigitsDataModule
from mdeq.lightning.data import DeviceBatches
from tests.core.test_host_syncs import HostReads
from tests.lightning.conftest import real_data_root

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def images(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def test_without_augmentation_the_batches_equal_the_dataloader_path():
    for dm_on, dm_off in [(DigitsDataModule(data_on_device=True, batch_size=50), DigitsDataModule(batch_size=50))]:
        dm_on.setup(), dm_off.setup()
        for epoch in (0, 1):
            on, off = dm_on.train_dataloader(), dm_off.train_dataloader()
            on.sampler.set_epoch(epoch), off.sampler.set_epoch(epoch)
            got, want = list(on), list(off)
            assert len(on) == len(off) == len(got) == len(want) == 26
            for (x1, y1), (x2, y2) in zip(got, want):
                assert torch.equal(y1, y2)
                torch.testing.assert_close(x1, x2, rtol=0, atol=1e-6)
        for split in ("val_dataloader", "test_dataloader"):
            for (x1, y1), (x2, y2) in zip(getattr(dm_on, split)(), getattr(dm_off, split)()):
                assert torch.equal(y1, y2) and torch.allclose(x1, x2, atol=1e-6)


def test_augmentation_is_a_zero_filled_translation_and_flip_per_sample():
    x, y = images(64)
    batches = DeviceBatches(x, y, 64, MEAN, STD, shuffle=False, augment=True, crop_padding=2, seed=3)
    aug, labels = next(iter(batches))
    assert torch.equal(labels, y)
    plain = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    padded = F.pad(x.float() / 255, [2] * 4)
    found = set()
    for i in range(64):  # each output is exactly one of the 5 x 5 x 2 candidates of the CPU path's rule
        hits = []
        for top in range(5):
            for left in range(5):
                crop = padded[i, :, top : top + 8, left : left + 8]
                for flip in (False, True):
                    cand = (crop.flip(-1) if flip else crop) - torch.tensor(MEAN).view(3, 1, 1)
                    if torch.allclose(cand / torch.tensor(STD).view(3, 1, 1), aug[i], atol=1e-6):
                        hits.append((top, left, flip))
        assert hits, f"sample {i} is no translation/flip of its image"
        found.add(hits[0])
    assert len(found) > 30 and {f for _, _, f in found} == {False, True}  # the draws vary per sample
    assert not torch.allclose(aug, plain)


def test_augmentation_is_seeded_by_seed_and_epoch():
    x, y = images()
    a = DeviceBatches(x, y, 16, shuffle=True, augment=True, seed=1)
    b = DeviceBatches(x, y, 16, shuffle=True, augment=True, seed=1)
    torch.manual_seed(0)
    first = [t[0] for t in a]
    torch.manual_seed(99)  # the global RNG plays no part
    assert all(torch.equal(p, q) for p, q in zip(first, (t[0] for t in b)))
    b.sampler.set_epoch(1)
    assert not all(torch.equal(p, q) for p, q in zip(first, (t[0] for t in b)))
    c = DeviceBatches(x, y, 16, shuffle=True, augment=True, seed=2)
    assert not torch.equal(first[0], next(iter(c))[0])


def test_ranks_take_interleaved_shards_of_the_same_permutation(monkeypatch: pytest.MonkeyPatch):
    """Under DDP rank r of W holds positions r, r + W, ... of the single-process batch (as the
    DataLoader path's sampler): the W local batches together are the global batch."""
    x, y = images(40)
    single = [t[1] for t in DeviceBatches(x, y, 8, shuffle=True, seed=5)]
    dist = torch.distributed
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        shards.append([t[1] for t in DeviceBatches(x, y, 4, shuffle=True, seed=5)])
    assert len(shards[0]) == len(shards[1]) == len(single) == 5
    for whole, r0, r1 in zip(single, *shards):
        assert torch.equal(torch.stack([r0, r1], 1).flatten(), whole)


def test_batches_read_nothing_on_the_host():
    x, y = images(64)
    batches = DeviceBatches(x, y, 16, MEAN, STD, shuffle=True, augment=True, seed=0)
    it = iter(batches)
    with HostReads() as mode:
        out = [next(it) for _ in range(4)]
    assert mode.count == 0, mode.ops
    assert all(b[0].shape == (16, 3, 8, 8) for b in out)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="num_workers to 0"):
        DigitsDataModule(data_on_device=True, num_workers=2)
    with pytest.raises(ValueError, match="data_on_device must be true or false"):
        DigitsDataModule(data_on_device="yes")
    x, y = images()
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        DeviceBatches(x[0], y, 4)
    with pytest.raises(ValueError, match="40 images but 39 labels"):
        DeviceBatches(x, y[:-1], 4)


def test_a_run_with_data_on_device_trains_like_the_dataloader_path():
    """The same seeded digits run twice (no augmentation: identical batches): the same weights."""

    def fit(on_device: bool) -> dict[str, torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        module = ClassificationModule(backbone="mdeq_digits", lr=2e-3, train_max_steps=6, eval_max_steps=10)
        trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2, callbacks=[ConvergenceGuard()])
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, data_on_device=on_device))
        return {k: v.clone() for k, v in module.state_dict().items()}

    on, off = fit(True), fit(False)
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.skipif(real_data_root() is None, reason="../shared/data not present: real-data tests skipped")
def test_real_cifar10_on_the_device_equals_the_dataloader_path():
    """CIFAR-10 read in place from ../shared/data (uint8 kept as such on the device)."""
    kw = dict(root=str(real_data_root()), batch_size=64, limit_train=600, limit_test=200)
    on, off = CIFAR10DataModule(data_on_device=True, **kw), CIFAR10DataModule(**kw)
    on.setup(), off.setup()
    assert on._splits["train"][0].dtype == torch.uint8
    for (x1, y1), (x2, y2) in zip(on.test_dataloader(), off.test_dataloader()):
        assert torch.equal(y1, y2)
        torch.testing.assert_close(x1, x2, rtol=0, atol=1e-6)
    augmented = CIFAR10DataModule(data_on_device=True, augment=True, **kw)
    augmented.setup()
    (xa, ya), (xp, yp) = next(iter(augmented.train_dataloader())), next(iter(on.train_dataloader()))
    assert xa.shape == (64, 3, 32, 32) and torch.equal(ya, yp) and not torch.allclose(xa, xp)
