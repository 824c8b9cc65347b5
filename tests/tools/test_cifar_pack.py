"""tools/gpu/cifar_pack.py: CIFAR-10 in two shards that unpack bit-identical, or not at all."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.lightning.conftest import real_data_root

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu" / "cifar_pack.py"


def _load():
    spec = importlib.util.spec_from_file_location("cifar_pack", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cifar_pack"] = module
    spec.loader.exec_module(module)
    return module


cp = _load()


def smooth_images(n: int, seed: int = 0, h: int = 32, w: int = 32) -> np.ndarray:
    """Image-like arrays (smooth colour fields with noise, edges at 0 and 255)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, (n, 3, 1, 1)) + rng.uniform(-6, 6, (n, 3, 1, 1)) * (xx + yy) + rng.normal(0, 4, (n, 3, h, w))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(7, 3, 32, 32), (5, 3, 1, 1), (4, 3, 3, 9), (3, 3, 9, 2)])
def test_codec_round_trip_is_exact_for_any_bytes(shape):
    rng = np.random.default_rng(1)
    for images in (rng.integers(0, 256, shape, dtype=np.uint8), np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)):
        n, _, h, w = shape
        assert np.array_equal(cp.decode(cp.encode(images), n, h, w), images)


def test_codec_refuses_what_it_cannot_encode():
    with pytest.raises(ValueError, match="uint8"):
        cp.encode(np.zeros((2, 3, 4, 4), np.int16))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        cp.encode(np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(cp.PackError, match="expected"):
        cp.decode(b"\x00" * 10, 2, 4, 4)


def test_shards_unpack_to_cifar_batch_files_that_the_library_reads(tmp_path):
    from mdeq.data.sources import read_cifar10

    batches = {name: (smooth_images(20, seed=i), np.arange(20, dtype=np.uint8) % 10) for i, name in enumerate(cp.SHARDS["a"] + cp.SHARDS["b"])}
    shards = []
    for shard, names in cp.SHARDS.items():
        path = tmp_path / f"cifar10.{shard}.pack"
        cp.pack_shard(((n, *batches[n]) for n in names), path)
        shards.append(path)
    raw = sum(b[0].nbytes for b in batches.values())
    assert sum(p.stat().st_size for p in shards) < 0.6 * raw  # the predictor pays off even on small images
    folder = cp.unpack(shards, tmp_path / "data")
    assert folder.name == "cifar-10-batches-py"
    x_tr, y_tr, x_te, y_te = read_cifar10(tmp_path / "data", tmp_path / "cache")
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(x_tr.numpy(), train) and np.array_equal(x_te.numpy(), batches["test_batch"][0])
    assert y_tr.tolist() == [int(v) for i in range(1, 6) for v in batches[f"data_batch_{i}"][1]]


def _shard(tmp_path: Path) -> Path:
    path = tmp_path / "s.pack"
    cp.pack_shard([("data_batch_1", smooth_images(6), np.arange(6, dtype=np.uint8))], path)
    return path


def test_a_corrupt_truncated_or_foreign_shard_is_refused_by_name(tmp_path):
    path = _shard(tmp_path)
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.pack"
    flipped.write_bytes(bytes(data[:-5]) + bytes([data[-5] ^ 1]) + bytes(data[-4:]))
    truncated = tmp_path / "truncated.pack"
    truncated.write_bytes(bytes(data[:-100]))
    foreign = tmp_path / "foreign.pack"
    foreign.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    for bad, msg in ((flipped, "body SHA-256"), (truncated, "body SHA-256"), (foreign, "bad magic")):
        with pytest.raises(cp.PackError, match=msg):
            cp.read_shard(bad)
    assert cp.main(["unpack", str(flipped), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out" / "cifar-10-batches-py" / "data_batch_1").exists()


def test_arrays_that_differ_from_the_recorded_originals_are_refused(tmp_path):
    """The header's per-batch SHA-256 is of the original arrays: a shard whose body decodes to
    anything else (here: a header from other images) does not unpack."""
    path = _shard(tmp_path)
    data = path.read_bytes()
    (n,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    header["batches"][0]["sha256"] = cp._sha256(smooth_images(6, seed=9), np.arange(6, dtype=np.uint8))
    raw = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(cp.MAGIC + struct.pack("<I", len(raw)) + raw + data[12 + n :])
    with pytest.raises(cp.PackError, match="does not unpack to the original arrays"):
        cp.read_shard(path)
    header["version"] = 99
    raw = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(cp.MAGIC + struct.pack("<I", len(raw)) + raw + data[12 + n :])
    with pytest.raises(cp.PackError, match="version 99"):
        cp.read_shard(path)


@pytest.mark.skipif(real_data_root() is None, reason="../shared/data not present: real-data tests skipped")
def test_real_cifar_images_compress_to_fit_two_device_calls(tmp_path):
    """On 3,000 real training images: exact round trip and under 4.5 bits per value (the full
    train + test split then fits two shards of about 51 MB; a device call carries 64 MiB)."""
    from mdeq.data.sources import default_cache_dir, read_cifar10

    x, y, _, _ = read_cifar10(real_data_root(), default_cache_dir())
    images, labels = x[:3000].numpy(), y[:3000].numpy().astype(np.uint8)
    path = tmp_path / "real.pack"
    cp.pack_shard([("data_batch_1", images, labels)], path, preset=6)
    assert path.stat().st_size * 8 / images.size < 4.5
    [(name, back, back_labels)] = cp.read_shard(path)
    assert name == "data_batch_1" and np.array_equal(back, images) and np.array_equal(back_labels, labels)
