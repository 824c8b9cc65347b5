"""Lossless CIFAR-10 packer: the 60,000 images in two shards small enough for one device call each.

A device call carries at most 64 MiB; CIFAR-10's tar.xz is 124 MiB and plain xz of the raw arrays
does not fit two calls either. Per image and plane this packer applies

1. a reversible colour transform: G, (R - G) mod 256, (B - G) mod 256 (the colour planes are
   strongly correlated, their differences are small);
2. the LOCO-I / JPEG-LS median edge detector as pixel predictor (left a, up b, up-left c:
   min(a, b) if c >= max(a, b), max(a, b) if c <= min(a, b), else a + b - c; the first row predicts
   from the left, the first column from above), residual mod 256, zigzag-mapped so that small
   errors of either sign are small bytes;
3. xz of the residual planes (plane-major).

Unpacking runs the predictor in the same order over the decoded pixels (one vectorised step per
pixel position over all images), undoes the transform, and checks the SHA-256 of every array
against the one recorded from the original at packing time: a shard either unpacks bit-identical
or raises. The unpacked files are CIFAR-10's own batch layout (``cifar-10-batches-py/``), which
:func:`mdeq.data.sources.read_cifar10` reads, so the training path does not change.

    python tools/gpu/cifar_pack.py pack --root ../shared/data --out .carry        # two shards
    python tools/gpu/cifar_pack.py unpack .carry/cifar10.a.pack .carry/cifar10.b.pack --out /tmp/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import pickle
import struct
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

MAGIC = b"MDEQPACK"
VERSION = 1
# Which CIFAR-10 batch files go into which shard: about 30,000 images each.
SHARDS: dict[str, tuple[str, ...]] = {
    "a": ("data_batch_1", "data_batch_2", "data_batch_3"),
    "b": ("data_batch_4", "data_batch_5", "test_batch"),
}


class PackError(ValueError):
    """A shard is corrupt, truncated, of another version, or does not unpack to its recorded hash."""


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _colour_planes(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 RGB -> (3, N, H, W) uint8 planes G, R-G, B-G (mod 256)."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return np.stack([g, r - g, b - g])  # uint8 arithmetic wraps mod 256


def _rgb(planes: np.ndarray) -> np.ndarray:
    g, rg, bg = planes
    return np.stack([rg + g, g, bg + g], axis=1)


def _prediction(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The median edge detector on int16 neighbours."""
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))


def _neighbours(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left, up and up-left of every pixel of (..., H, W) int16 planes, with the edge rules."""
    a = np.zeros_like(p)
    b = np.zeros_like(p)
    c = np.zeros_like(p)
    a[..., :, 1:] = p[..., :, :-1]
    b[..., 1:, :] = p[..., :-1, :]
    c[..., 1:, 1:] = p[..., :-1, :-1]
    b[..., 0, :] = a[..., 0, :]  # first row: predict from the left
    c[..., 0, :] = a[..., 0, :]
    a[..., 1:, 0] = b[..., 1:, 0]  # first column: predict from above
    c[..., 1:, 0] = b[..., 1:, 0]
    return a, b, c


def _zigzag(residual: np.ndarray) -> np.ndarray:
    m = ((residual + 128) % 256) - 128
    return np.where(m >= 0, 2 * m, -2 * m - 1).astype(np.uint8)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int16)
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def encode(images: np.ndarray) -> bytes:
    """(N, 3, H, W) uint8 images -> the zigzagged residual planes, plane-major, uncompressed."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) uint8 images, got {images.dtype} {images.shape}")
    planes = _colour_planes(images).astype(np.int16)
    return _zigzag(planes - _prediction(*_neighbours(planes))).tobytes()


def decode(residuals: bytes, n: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Inverse of :func:`encode`: the pixels are rebuilt in raster order, each position for all
    images and planes at once, from the pixels already rebuilt."""
    if len(residuals) != 3 * n * height * width:
        raise PackError(f"residual stream holds {len(residuals)} bytes, expected {3 * n * height * width}")
    res = _unzigzag(np.frombuffer(residuals, dtype=np.uint8).reshape(3, n, height, width))
    p = np.zeros((3, n, height, width), dtype=np.int16)
    zero = np.zeros((3, n), dtype=np.int16)
    for i in range(height):
        for j in range(width):
            a = p[:, :, i, j - 1] if j else (p[:, :, i - 1, j] if i else zero)
            b = p[:, :, i - 1, j] if i else a
            if i and j:
                c = p[:, :, i - 1, j - 1]
            else:
                c = a if i == 0 else b
            p[:, :, i, j] = (_prediction(a, b, c) + res[:, :, i, j]) % 256
    return _rgb(p.astype(np.uint8))


def _read_batches(root: Path, cache_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from mdeq.data.sources import cifar10_batches_dir, read_cifar10_batch

    d = cifar10_batches_dir(root, cache_dir)
    out = {}
    for name in (n for names in SHARDS.values() for n in names):
        x, y = read_cifar10_batch(d / name)
        out[name] = (x.numpy(), y.numpy().astype(np.uint8))
    return out


def pack_shard(batches: Iterable[tuple[str, np.ndarray, np.ndarray]], path: Path, preset: int = 9) -> dict:
    """Write one shard holding the named (images, labels) batches; returns its header."""
    entries, payload = [], []
    for name, images, labels in batches:
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        entries.append(
            {
                "name": name,
                "shape": list(images.shape),
                "sha256": _sha256(images, labels),
            }
        )
        payload.append(labels.astype(np.uint8).tobytes())
        payload.append(encode(images))
    body = lzma.compress(b"".join(payload), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=preset)
    header = {"version": VERSION, "batches": entries, "body_sha256": hashlib.sha256(body).hexdigest()}
    raw_header = json.dumps(header, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(MAGIC + struct.pack("<I", len(raw_header)) + raw_header + body)
    return header


def read_shard(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The (name, images, labels) batches of one shard, each checked against its recorded hash."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise PackError(f"{path}: not an mdeq CIFAR pack (bad magic)")
    (n_header,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n_header])
    except ValueError as exc:
        raise PackError(f"{path}: unreadable header ({exc})") from None
    if header.get("version") != VERSION:
        raise PackError(f"{path}: pack version {header.get('version')}, this unpacker reads {VERSION}")
    body = data[start + n_header :]
    if hashlib.sha256(body).hexdigest() != header["body_sha256"]:
        raise PackError(f"{path}: body SHA-256 differs from its header (truncated or corrupt shard)")
    raw = lzma.decompress(body, format=lzma.FORMAT_XZ)
    out, offset = [], 0
    for e in header["batches"]:
        n, c, h, w = e["shape"]
        labels = np.frombuffer(raw, dtype=np.uint8, count=n, offset=offset)
        offset += n
        images = decode(raw[offset : offset + c * n * h * w], n, h, w)
        offset += c * n * h * w
        if _sha256(images, labels) != e["sha256"]:
            raise PackError(f"{path}: {e['name']} does not unpack to the original arrays (SHA-256 differs)")
        out.append((e["name"], images, labels))
    if offset != len(raw):
        raise PackError(f"{path}: {len(raw) - offset} trailing bytes after the last batch")
    return out


def write_batch_file(folder: Path, name: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """One batch in CIFAR-10's own pickle layout (data: N x 3072 uint8, labels: list of int)."""
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"batch_label": name, "data": images.reshape(len(images), -1), "labels": [int(v) for v in labels]}
    path = folder / name
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(entry, fh, protocol=4)
    tmp.replace(path)
    return path


def pack(root: Path, cache_dir: Path, out: Path, preset: int = 9) -> list[Path]:
    batches = _read_batches(root, cache_dir)
    paths = []
    for shard, names in SHARDS.items():
        path = out / f"cifar10.{shard}.pack"
        t = time.time()
        pack_shard(((n, *batches[n]) for n in names), path, preset=preset)
        values = sum(batches[n][0].size for n in names)
        size = path.stat().st_size
        print(f"{path}: {size / 1e6:.2f} MB ({size * 8 / values:.3f} bits per value), {time.time() - t:.0f} s")
        paths.append(path)
    return paths


def unpack(shards: Iterable[Path], out: Path) -> Path:
    """Unpack shards into ``out/cifar-10-batches-py/`` (each batch verified); returns that folder."""
    folder = out / "cifar-10-batches-py"
    for shard in shards:
        t = time.time()
        for name, images, labels in read_shard(Path(shard)):
            write_batch_file(folder, name, images, labels)
        print(f"{shard}: unpacked and verified in {time.time() - t:.1f} s")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="CIFAR-10 under --root -> two shards in --out")
    p.add_argument("--root", type=Path, default=Path("../shared/data"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path(".carry"))
    p.add_argument("--preset", type=int, default=9)
    u = sub.add_parser("unpack", help="shards -> OUT/cifar-10-batches-py (verified bit-identical)")
    u.add_argument("shards", nargs="+", type=Path)
    u.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        from mdeq.data.sources import default_cache_dir

        pack(args.root, args.cache_dir or default_cache_dir(), args.out, args.preset)
    else:
        try:
            print(unpack(args.shards, args.out))
        except (PackError, lzma.LZMAError, OSError) as exc:
            print(f"unpack failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
