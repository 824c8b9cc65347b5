"""Evaluate zoo models on a task's test split, and export trained checkpoints to the zoo."""

from __future__ import annotations

import datetime
import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from mdeq.lightning.classification import ClassificationModule, backbone_state
from mdeq.lightning.data import CIFAR10DataModule, DigitsDataModule, FashionMNISTDataModule, MNISTDataModule
from mdeq.lightning.data.base import ClassificationDataModule
from mdeq.lightning.equilibrium_check import equilibrium_check

TASKS: dict[str, type[ClassificationDataModule]] = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
}


TEST_SLICE = 2000
"""Size of the fixed test slice (the first images of the official test split) that the per-task
tests re-measure; cards record the accuracy on it next to the full-test accuracy."""


def task_datamodule(task: str, root: str | None = None, batch_size: int = 256, limit_test: int | None = None) -> ClassificationDataModule:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    kwargs: dict[str, Any] = {"batch_size": batch_size, "val_fraction": 0.0, "limit_test": limit_test}
    if task != "digits" and root is not None:
        kwargs["root"] = root
    return TASKS[task](**kwargs)


def evaluate(
    model: nn.Module,
    task: str,
    root: str | None = None,
    batch_size: int = 256,
    limit_test: int | None = None,
    max_steps: int | None = None,
    tol: float | None = None,
) -> dict[str, float]:
    """Test-split metrics of ``model`` on ``task`` (the first ``limit_test`` images when given):
    accuracy, top-5, mean forward f-evaluations per batch, residual statistics, fraction converged.
    ``max_steps`` / ``tol`` override the DEQ layers' own solver budget for this evaluation only."""
    dm = task_datamodule(task, root, batch_size, limit_test)
    module = ClassificationModule(backbone=model, num_classes=dm.num_classes, eval_max_steps=max_steps, eval_tol=tol)
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # quiet for this evaluation only
    try:
        trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    finally:  # the caller's logging stays as it was (the budget went with the calls)
        lightning_log.setLevel(level)
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items()} | {"num_test_samples": float(len(dm.test_set))}


def card_metrics(metrics: dict[str, float], sliced: dict[str, float] | None) -> dict[str, Any]:
    """The ``metrics`` block of a model card from :func:`evaluate`'s results (full test split
    and, for tasks other than digits, the fixed slice)."""
    out: dict[str, Any] = {
        "test_accuracy": metrics.get("acc"),
        "test_top5": metrics.get("top5"),
        "mean_forward_nfe": metrics.get("nfe"),
        "residual_mean": metrics.get("residual_mean"),
        "converged_fraction": metrics.get("converged_fraction"),
        "num_test_samples": int(metrics["num_test_samples"]),
    }
    if sliced is not None:
        out["test_slice"] = {"first_n": TEST_SLICE, "accuracy": sliced["acc"]}
    return out


def remeasure_card(name: str, root: str | None = None) -> dict[str, Any]:
    """Re-measure a shipped model's metrics and equilibrium check from its weights and rewrite
    those fields of its card (the weights file and its SHA-256 are untouched)."""
    import zoo
    from zoo.weights import read_card, write_card

    entry = zoo.entry(name)
    path = entry.weights_path()
    if path is None:
        raise ValueError(f"{name!r} ships no weights")
    card_path = path.with_name(entry.card_file)  # type: ignore[arg-type]
    card = read_card(card_path)
    model = zoo.create(name, pretrained=True)
    metrics = evaluate(model, card["task"], root)
    sliced = evaluate(model, card["task"], root, limit_test=TEST_SLICE) if card["task"] != "digits" else None
    card["metrics"] = card_metrics(metrics, sliced)
    card["equilibrium_check"] = equilibrium_check(model, card["task"], root, limit_test=TEST_SLICE if sliced else None, first_metrics=sliced or metrics)
    write_card(card_path, card)
    return card


TRAINING_ONLY_OPTIONS = ("backward",)
"""Backbone options that change how a model trains but not what its weights compute."""

EVALUATION_SOLVER_OPTIONS = ("solver", "tol", "max_steps", "stop_mode")
"""DEQ options an export may set for evaluation (they change how far the equilibrium is solved,
not the weights); they are stored in the card's ``architecture_kwargs``, so ``zoo.create`` uses them."""


def check_solver_settings(settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming any key of ``settings`` outside :data:`EVALUATION_SOLVER_OPTIONS`."""
    unknown = sorted(set(settings) - set(EVALUATION_SOLVER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown solver setting(s) {unknown} for export; choose from {list(EVALUATION_SOLVER_OPTIONS)}")


EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_export_name(name: str) -> None:
    """A model name is one plain file name: no folder, no leading dot (hidden files), not empty."""
    if not EXPORT_NAME.fullmatch(name) or name.endswith(".") or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit, at most 100), "
            "no path: the files are written as <out-dir>/<name>.safetensors and <name>.json"
        )


def export_checkpoint(
    checkpoint: str,
    name: str,
    task: str,
    config: str,
    out_dir: str = "checkpoints",
    root: str | None = None,
    command: str | None = None,
    notes: dict[str, Any] | None = None,
    solver_settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a Lightning checkpoint of ``ClassificationModule`` into ``out_dir/<name>.safetensors``
    plus ``<name>.json``: re-measures test accuracy and f-evaluations, records the training
    config, the measuring command and the SHA-256. The checkpoint is read with ``weights_only=True``.

    Options that only shape training (the DEQ's ``backward``) are recorded under ``training``, not in
    ``architecture_kwargs``: loading the weights gives the library's default backward. ``notes``
    adds free fields to the card (e.g. how the checkpoint was selected). ``solver_settings`` (keys of
    :data:`EVALUATION_SOLVER_OPTIONS`) replaces the architecture's default solver settings in the
    exported model, e.g. a looser ``tol`` or more ``max_steps`` than the architecture's default.

    ``name`` is a file name (letters, digits, ``_ . -``; no path); existing files of that name in
    ``out_dir`` are only replaced with ``overwrite=True``; ``config`` must exist (the card cites it)."""
    import zoo
    from zoo.weights import save_weights, write_card

    check_export_name(name)
    targets = [Path(out_dir) / f"{name}.safetensors", Path(out_dir) / f"{name}.json"]
    existing = [str(t) for t in targets if os.path.lexists(t)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --force (overwrite=True) to replace them")
    if not Path(config).is_file():
        raise FileNotFoundError(f"training config {config} not found: the card records the config the weights were trained with, so it must exist")

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    arch = hp.get("backbone")
    if not isinstance(arch, str):
        raise ValueError(f"{checkpoint} was not trained with a zoo backbone name (got {arch!r}); cannot export")
    # A run that started from a zoo model's weights names that model (e.g. mdeq_tiny_cifar10);
    # the card names its architecture (mdeq_tiny) and records where training started (with the
    # SHA-256 of those weights, kept in checkpoints written since it was recorded).
    started_from = ckpt.get("mdeq_started_from") or (
        {"zoo_weights": arch} if hp.get("pretrained") else {"init_weights": hp["init_weights"]} if hp.get("init_weights") else {}
    )
    base = zoo.entry(arch)
    arch = base.architecture.__name__
    arch_kwargs = {**base.kwargs, **dict(hp.get("backbone_kwargs") or {})}
    training_only = {k: arch_kwargs.pop(k) for k in TRAINING_ONLY_OPTIONS if k in arch_kwargs}
    check_solver_settings(solver_settings or {})
    arch_kwargs.update(solver_settings or {})
    model = zoo.create(arch, **arch_kwargs)
    model.load_state_dict(backbone_state(ckpt["state_dict"]), strict=True)
    model.eval()
    metrics = evaluate(model, task, root)
    sliced = evaluate(model, task, root, limit_test=TEST_SLICE) if task != "digits" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    sha = save_weights(model, weights, metadata={"name": name, "architecture": arch})
    dm = task_datamodule(task, root)
    deq = next(m for m in model.modules() if m.__class__.__name__ in ("DEQ", "MultiScaleDEQ"))
    card = {
        "name": name,
        "architecture": arch,
        "architecture_kwargs": arch_kwargs,
        "task": task,
        "dataset": {"digits": "scikit-learn 8x8 digits (seeded stratified 80/20 split, seed 0)", "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}[task],
        "preprocessing": {"input_shape": list(dm.input_shape), "mean": list(dm.mean or []), "std": list(dm.std or []), "scale": dm.scale},
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_classes": dm.num_classes,
        "solver": {"name": deq.solver.name, "options": {k: v for k, v in deq.solver.options().items() if isinstance(v, (int, float, str, bool))}, "tol": deq.tol, "max_steps": deq.max_steps, "stop_mode": deq.stop_mode},
        "metrics": card_metrics(metrics, sliced),
        "equilibrium_check": equilibrium_check(model, task, root, limit_test=TEST_SLICE if sliced else None, first_metrics=sliced or metrics),
        "measured_with": f"mdeq test --model {name} --data {task}" + (" --data-root <root>" if task != "digits" else ""),
        "train_config": config,
        "train_command": f"mdeq fit --config {config}",
        "exported_with": command or " ".join(shlex.quote(a) for a in ["mdeq", *sys.argv[1:]]),
        "training": {
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            **({"backbone_kwargs": training_only} if training_only else {}),
            **({"started_from": started_from} if started_from else {}),
        },
        "weights_file": weights.name,
        "sha256": sha,
        "created": datetime.date.today().isoformat(),
        **(notes or {}),
    }
    write_card(out / f"{name}.json", card)
    return card
