"""Reading the datasets from local files (never downloaded at run time): scikit-learn's digits,
MNIST and Fashion-MNIST (IDX files) and CIFAR-10 (the python batches, or their archive)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]
"""(train images, train labels, test images, test labels)."""

HOW_TO_POINT = (
    "Set the DataModule's `root` (or the MDEQ_DATA environment variable) to a folder holding the "
    "dataset. Nothing is downloaded at run time."
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to fix it."""


def default_data_root() -> Path:
    """``$MDEQ_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("MDEQ_DATA", "data"))


def default_cache_dir() -> Path:
    """Where archives are unpacked: ``$MDEQ_CACHE`` or ``~/.cache/mdeq``."""
    return Path(os.environ.get("MDEQ_CACHE", Path.home() / ".cache" / "mdeq"))


def read_digits(seed: int = 0) -> Arrays:
    """scikit-learn's bundled 8x8 digits (values 0-16), a stratified 80/20 train/test split drawn
    with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.images, data.target, test_size=0.2, random_state=seed, stratify=data.target)
    as_img = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return as_img(x_tr), torch.tensor(y_tr), as_img(x_te), torch.tensor(y_te)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx_dataset(root: Path, folder: str) -> Arrays:
    """MNIST-format data from ``root/folder/raw`` (the four official IDX files, gzipped or not)."""
    raw = root / folder / "raw"

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (raw / name).is_file():
                return raw / name
        raise DatasetNotFoundError(
            f"{folder} not found: expected {raw / stem}[.gz] (the four official IDX files "
            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            f"t10k-labels-idx1-ubyte, gzipped or not). {HOW_TO_POINT}"
        )

    read = lambda stem: torch.from_numpy(read_idx(find(stem)).copy())  # noqa: E731
    x_tr, y_tr = read("train-images-idx3-ubyte").unsqueeze(1), read("train-labels-idx1-ubyte")
    x_te, y_te = read("t10k-images-idx3-ubyte").unsqueeze(1), read("t10k-labels-idx1-ubyte")
    return x_tr, y_tr, x_te, y_te


def cifar10_batches_dir(root: Path, cache_dir: Path) -> Path:
    """The folder of CIFAR-10's python batches: ``root/cifar-10-batches-py/`` (or under
    ``root/CIFAR10/``), or an archive (``root/CIFAR10/cifar-10-batches-py.tar.xz``,
    ``root/cifar-10-python.tar.gz``) unpacked once into ``cache_dir``."""
    for cand in (root / "cifar-10-batches-py", root / "CIFAR10" / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file():
            return cand
    for archive in (root / "CIFAR10" / "cifar-10-batches-py.tar.xz", root / "cifar-10-batches-py.tar.xz", root / "cifar-10-python.tar.gz"):
        if archive.is_file():
            return _unpacked(archive, cache_dir)
    raise DatasetNotFoundError(
        f"CIFAR-10 not found: looked for {root / 'cifar-10-batches-py'}/ and the archives "
        f"{root / 'CIFAR10' / 'cifar-10-batches-py.tar.xz'} or {root / 'cifar-10-python.tar.gz'}. {HOW_TO_POINT}"
    )


def _unpacked(archive: Path, cache_dir: Path) -> Path:
    """Unpack ``archive`` once into a cache folder that belongs to this very file."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / f"cifar10-{key}"
    done = target / "cifar-10-batches-py"
    if (done / "test_batch").is_file():
        return done
    tmp = cache_dir / f".unpacking-{key}-{os.getpid()}"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    target.mkdir(parents=True, exist_ok=True)
    try:
        (tmp / "cifar-10-batches-py").replace(done)  # atomic: a half-unpacked folder is never used
    except OSError:
        if not (done / "test_batch").is_file():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return done


def read_cifar10_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 batch file: uint8 images (N, 3, 32, 32) and labels. The pickle is read with an
    unpickler that allows only the arrays and containers of the format (never code), so rebuilt
    copies whose md5s differ from torchvision's list load too."""
    with open(path, "rb") as fh:
        entry = _SafeUnpickler(fh, encoding="latin1").load()
    data = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return data, torch.tensor(entry["labels"])


def read_cifar10(root: Path, cache_dir: Path) -> Arrays:
    """CIFAR-10's 50,000 training and 10,000 test images (uint8) and labels."""
    d = cifar10_batches_dir(root, cache_dir)
    parts = [read_cifar10_batch(d / f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = read_cifar10_batch(d / "test_batch")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_te, y_te


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only the plain containers and numpy arrays of the CIFAR batch format."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
