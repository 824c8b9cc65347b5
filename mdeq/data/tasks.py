"""Tasks, each declared once: a dataset, its preprocessing, the input shape and the classes.

The zoo registers every architecture against a task (its input shape comes from there), model
cards record the task's preprocessing, the Lightning DataModules take their normalisation from it,
and :func:`mdeq.evaluation.evaluate` reads a task's test split from it. A new task is one
:func:`register_task` call.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mdeq.data.normalized import NormalizedTensorDataset
from mdeq.data.sources import Arrays, default_cache_dir, default_data_root, read_cifar10, read_digits, read_idx_dataset

Reader = Callable[[Path, Path, int], Arrays]
"""(data root, cache folder, seed) -> (train images, train labels, test images, test labels)."""


class UnknownTaskError(ValueError):
    """No task is registered under the requested name (the message lists the known ones)."""


@dataclass(frozen=True)
class Task:
    """A dataset with its preprocessing: what a model trained on it expects.

    Attributes:
        name: the task's name (``"cifar10"``).
        dataset: a human description of the data and split, as model cards record it.
        kind: ``"classification"`` or ``"regression"``.
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``.
        num_classes: classes of a classification task (None for regression).
        mean, std: per-channel normalisation applied after dividing by ``scale``.
        scale: the raw value range (255 for uint8 images, 16 for the digits).
        flip: whether a horizontal flip is a valid augmentation (not for digits or letters).
        test_slice: size of the fixed slice (the first test images) that the per-task tests
            re-measure; None when the whole test split is small enough.
        reader: reads the arrays from local files; None for a task whose data mdeq cannot read
            (it still declares the input shape and normalisation).
        needs_root: whether ``reader`` reads files under a data root.
        labels: the class names, in class-index order (None where not declared).
    """

    name: str
    dataset: str
    kind: str
    input_shape: tuple[int, ...]
    num_classes: int | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 255.0
    flip: bool = False
    test_slice: int | None = None
    reader: Reader | None = None
    needs_root: bool = True
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"task {self.name!r}: {len(self.labels)} labels for {self.num_classes} classes")

    def label(self, index: int) -> str:
        """The name of class ``index`` (the index itself where the task declares no names)."""
        return self.labels[index] if self.labels is not None else str(index)

    def read(self, root: str | Path | None = None, cache_dir: str | Path | None = None, seed: int = 0) -> Arrays:
        """The task's arrays (train images, train labels, test images, test labels) from local files."""
        if self.reader is None:
            raise NotImplementedError(f"task {self.name!r} declares its input but mdeq has no reader for its data ({self.dataset})")
        return self.reader(
            Path(root) if root is not None else default_data_root(), Path(cache_dir) if cache_dir is not None else default_cache_dir(), seed
        )

    def test_set(self, root: str | Path | None = None, limit: int | None = None, seed: int = 0) -> NormalizedTensorDataset:
        """The test split (its first ``limit`` samples when given), normalised as in training."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive number of test samples (or None for all), got {limit!r}")
        _, _, x, y = self.read(root, seed=seed)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return NormalizedTensorDataset(x, y, self.mean, self.std, augment=False, scale=self.scale)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Declare ``task`` under its name (once)."""
    if task.name in _TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    if task.kind not in ("classification", "regression"):
        raise ValueError(f"task {task.name!r}: kind must be 'classification' or 'regression', got {task.kind!r}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``; an unknown name lists the close matches and all tasks."""
    if isinstance(name, Task):
        return name
    if name not in _TASKS:
        close = difflib.get_close_matches(str(name), sorted(_TASKS), n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(_TASKS))}.")
    return _TASKS[name]


def list_tasks(readable: bool | None = None) -> list[str]:
    """Task names (sorted); ``readable=True`` only those whose data mdeq can read."""
    return sorted(n for n, t in _TASKS.items() if readable is None or (t.reader is not None) == readable)


DIGITS = tuple("0123456789")

register_task(Task(
    name="digits", dataset="scikit-learn 8x8 digits (seeded stratified 80/20 split, seed 0)", kind="classification",
    input_shape=(1, 8, 8), num_classes=10, mean=(0.3053,), std=(0.3760,), scale=16.0,
    reader=lambda root, cache, seed: read_digits(seed), needs_root=False, labels=DIGITS,
))
register_task(Task(
    name="mnist", dataset="MNIST", kind="classification", input_shape=(1, 28, 28), num_classes=10,
    mean=(0.1307,), std=(0.3081,), test_slice=2000, reader=lambda root, cache, seed: read_idx_dataset(root, "MNIST"),
    labels=DIGITS,
))
register_task(Task(
    name="fashion_mnist", dataset="Fashion-MNIST", kind="classification", input_shape=(1, 28, 28), num_classes=10,
    mean=(0.2860,), std=(0.3530,), test_slice=2000, reader=lambda root, cache, seed: read_idx_dataset(root, "FashionMNIST"),
    labels=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
))
register_task(Task(
    name="cifar10", dataset="CIFAR-10", kind="classification", input_shape=(3, 32, 32), num_classes=10,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), flip=True, test_slice=2000,
    reader=lambda root, cache, seed: read_cifar10(root, cache),
    labels=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
))
register_task(Task(
    name="imagenet", dataset="ImageNet-1k (not shipped: mdeq reads no ImageNet files)", kind="classification",
    input_shape=(3, 224, 224), num_classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), flip=True,
))
register_task(Task(
    name="linear_toy", dataset="the DEQ toy y = slope * x (x = 1..10 for training)", kind="regression",
    input_shape=(1,), num_classes=None, needs_root=False,
))
