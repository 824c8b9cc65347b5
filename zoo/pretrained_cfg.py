"""timm's pretrained configuration of a zoo entry, built from its task and card.

It is what ``timm.data.resolve_data_config({}, model=model)`` reads to preprocess inputs: the
input size, mean and std of the task the weights were trained on (grayscale 28x28, 32x32 CIFAR,
...), no resizing (``crop_pct`` 1.0) and the class names, plus the weights file, its license and
the names of the first layer and the classifier. ``zoo.create`` attaches it to every model as
``model.pretrained_cfg`` (and ``default_cfg``); the timm registration declares it for timm's
``list_models(pretrained=True)`` and ``get_pretrained_cfg_value``.
"""

from __future__ import annotations

import inspect
import typing
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from zoo.card import ModelCard
    from zoo.registry import ZooEntry

INTERPOLATION = "bilinear"
"""How an image of another size is resized (our models are trained at one fixed size)."""


def model_class(entry: ZooEntry) -> type | None:
    """The class an entry's constructor returns (from its return annotation), if declared."""
    try:
        cls = typing.get_type_hints(entry.architecture).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotations: no class known
        return None
    return cls if isinstance(cls, type) else None


def is_image_classifier(entry: ZooEntry) -> bool:
    """Whether timm can host the entry: a classification task on images (C, H, W)."""
    task = entry.task_info
    return task.kind == "classification" and len(task.input_shape) == 3


def pretrained_cfg(entry: ZooEntry, card: ModelCard | None, model: nn.Module | None = None) -> dict[str, Any]:
    """The entry's configuration in timm's ``PretrainedCfg`` fields, from its task and (for
    shipped weights) its ``card``. Fields that need a built model (the output pool size; the
    classifier's name when it depends on the configuration) are taken from ``model`` when given,
    else from the class or left None."""
    task = entry.task_info
    source: Any = model if model is not None else model_class(entry)
    c = card
    shipped = entry.weights_path() if c is not None else None
    pre = c.preprocessing if c is not None else None
    doc = inspect.getdoc(entry.architecture) or ""
    cfg: dict[str, Any] = {
        "architecture": entry.architecture.__name__,
        "file": str(shipped) if shipped is not None else None,
        "source": "file" if shipped is not None else None,
        "input_size": tuple(pre.input_shape if pre is not None else task.input_shape),
        "fixed_input_size": bool(getattr(source, "fixed_input_size", False)),
        "interpolation": INTERPOLATION,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(pre.mean if pre is not None else task.mean or ()),
        "std": tuple(pre.std if pre is not None else task.std or ()),
        "num_classes": c.num_classes if c is not None else task.num_classes,
        "label_names": task.labels,
        "pool_size": None,
        "first_conv": getattr(source, "first_conv", None),
        "classifier": None,
        "license": c.license if c is not None else None,
        "description": doc.split("\n\n")[0].replace("\n", " "),
        "task": task.name,
        "dataset": task.dataset,
    }
    name = getattr(source, "classifier_name", None)
    cfg["classifier"] = name if isinstance(name, str) else None
    if model is not None and hasattr(model, "pool_size"):
        cfg["pool_size"] = tuple(model.pool_size())  # type: ignore[operator]
    return cfg
