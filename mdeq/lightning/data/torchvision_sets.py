"""MNIST, Fashion-MNIST and CIFAR-10 from local files (never downloaded at run time)."""

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

from mdeq.lightning.data.base import ClassificationDataModule, DatasetNotFoundError, default_cache_dir, default_data_root

_HOW = (
    "Set the DataModule's `root` (or the MDEQ_DATA environment variable) to a folder holding the "
    "dataset. Nothing is downloaded at run time."
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class _IDXDataModule(ClassificationDataModule):
    folder = "MNIST"

    def __init__(self, root: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root) if root is not None else default_data_root()

    def _find(self, stem: str) -> Path:
        raw = self.root / self.folder / "raw"
        for name in (stem, stem + ".gz"):
            if (raw / name).is_file():
                return raw / name
        raise DatasetNotFoundError(
            f"{self.folder} not found: expected {raw / stem}[.gz] (the four official IDX files "
            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            f"t10k-labels-idx1-ubyte, gzipped or not). {_HOW}"
        )

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        read = lambda stem: torch.from_numpy(read_idx(self._find(stem)).copy())  # noqa: E731
        x_tr, y_tr = read("train-images-idx3-ubyte").unsqueeze(1), read("train-labels-idx1-ubyte")
        x_te, y_te = read("t10k-images-idx3-ubyte").unsqueeze(1), read("t10k-labels-idx1-ubyte")
        return x_tr, y_tr, x_te, y_te


class MNISTDataModule(_IDXDataModule):
    """MNIST from ``root/MNIST/raw`` (60,000 train / 10,000 test, 28x28)."""

    folder = "MNIST"
    mean = (0.1307,)
    std = (0.3081,)
    input_shape = (1, 28, 28)


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST from ``root/FashionMNIST/raw`` (60,000 train / 10,000 test, 28x28)."""

    folder = "FashionMNIST"
    mean = (0.2860,)
    std = (0.3530,)
    input_shape = (1, 28, 28)


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 from ``root/cifar-10-batches-py/`` or an archive ``root/CIFAR10/cifar-10-batches-py.tar.xz``
    (or ``root/cifar-10-python.tar.gz``), unpacked once into ``cache_dir``. Batch files are read
    directly (the pickles hold only arrays, lists and strings), so rebuilt copies whose md5s
    differ from torchvision's list load too."""

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    input_shape = (3, 32, 32)

    def __init__(self, root: str | None = None, cache_dir: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root) if root is not None else default_data_root()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def _batches_dir(self) -> Path:
        for cand in (self.root / "cifar-10-batches-py", self.root / "CIFAR10" / "cifar-10-batches-py"):
            if (cand / "test_batch").is_file():
                return cand
        for archive in (self.root / "CIFAR10" / "cifar-10-batches-py.tar.xz", self.root / "cifar-10-batches-py.tar.xz", self.root / "cifar-10-python.tar.gz"):
            if archive.is_file():
                return self._unpacked(archive)
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: looked for {self.root / 'cifar-10-batches-py'}/ and the archives "
            f"{self.root / 'CIFAR10' / 'cifar-10-batches-py.tar.xz'} or {self.root / 'cifar-10-python.tar.gz'}. {_HOW}"
        )

    def _unpacked(self, archive: Path) -> Path:
        """Unpack ``archive`` once into a cache folder that belongs to this very file."""
        st = archive.stat()
        key = hashlib.sha256(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        target = self.cache_dir / f"cifar10-{key}"
        done = target / "cifar-10-batches-py"
        if (done / "test_batch").is_file():
            return done
        tmp = self.cache_dir / f".unpacking-{key}-{os.getpid()}"
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

    @staticmethod
    def _read(path: Path) -> tuple[Tensor, Tensor]:
        with open(path, "rb") as fh:
            entry = _SafeUnpickler(fh, encoding="latin1").load()
        data = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        return data, torch.tensor(entry["labels"])

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        d = self._batches_dir()
        parts = [self._read(d / f"data_batch_{i}") for i in range(1, 6)]
        x_te, y_te = self._read(d / "test_batch")
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_te, y_te


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only the plain containers and numpy arrays of the CIFAR batch format."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
