"""Shipping weights: a trained checkpoint becomes ``<name>.safetensors`` plus its model card, and a
shipped card's measured fields can be re-measured. Both measure with :func:`mdeq.evaluation.evaluate`
and :func:`mdeq.equilibrium_check.equilibrium_check` (no Lightning needed)."""

from __future__ import annotations

import datetime
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdeq.data.tasks import Task, get_task
from mdeq.equilibrium_check import equilibrium_check
from mdeq.evaluation import Metrics, evaluate
from mdeq.nn.deq import deq_layers
from zoo.card import (
    DEFAULT_LICENSE,
    BudgetRow,
    CardMetrics,
    EquilibriumCheck,
    ModelCard,
    Preprocessing,
    Provenance,
    Reference,
    SolverSettings,
    TestSlice,
    write_card,
)

TRAINING_ONLY_OPTIONS = ("backward",)
"""Backbone options that change how a model trains but not what its weights compute."""

EVALUATION_SOLVER_OPTIONS = ("solver", "tol", "max_steps", "stop_mode")
"""DEQ options an export may set for evaluation (they change how far the equilibrium is solved,
not the weights); they are stored in the card's ``architecture_kwargs``, so ``zoo.create`` uses them."""

EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

CARD_NOTE_FIELDS = ("selection", "reference")
"""``--note`` keys with a typed place in the card; every other note goes to ``provenance.notes``."""


def check_solver_settings(settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming any key of ``settings`` outside :data:`EVALUATION_SOLVER_OPTIONS`."""
    unknown = sorted(set(settings) - set(EVALUATION_SOLVER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown solver setting(s) {unknown} for export; choose from {list(EVALUATION_SOLVER_OPTIONS)}")


def check_export_name(name: str) -> None:
    """A model name is one plain file name: no folder, no leading dot (hidden files), not empty."""
    if not EXPORT_NAME.fullmatch(name) or name.endswith(".") or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit, at most 100), "
            "no path: the files are written as <out-dir>/<name>.safetensors and <name>.json"
        )


def card_metrics(metrics: Metrics, sliced: Metrics | None) -> CardMetrics:
    """The ``metrics`` block of a card from the full test split and, where the task has one, the fixed slice."""
    return CardMetrics(
        test_accuracy=metrics.accuracy,
        test_top5=metrics.top5,
        mean_forward_nfe=metrics.nfe,
        residual_mean=metrics.residual_mean,
        converged_fraction=metrics.converged_fraction,
        num_test_samples=metrics.num_samples,
        test_slice=TestSlice(sliced.num_samples, sliced.accuracy) if sliced is not None else None,
    )


def measure(model: nn.Module, task: Task, root: str | None = None) -> tuple[CardMetrics, EquilibriumCheck]:
    """A model's card metrics (full test split, and the task's fixed slice) and its equilibrium
    check (on the slice where the task has one)."""
    full = evaluate(model, task, root=root)
    sliced = evaluate(model, task, root=root, limit=task.test_slice) if task.test_slice else None
    check = equilibrium_check(model, task, root, limit=task.test_slice, first_metrics=sliced or full)
    typed = EquilibriumCheck(
        first_n=check["first_n"], rows=tuple(BudgetRow(**r) for r in check["rows"]), holds=check["holds"],
        accuracy_change=check["accuracy_change"], summary=check["summary"],
    )
    return card_metrics(full, sliced), typed


def remeasure_card(name: str, root: str | None = None) -> ModelCard:
    """Re-measure a shipped model's metrics and equilibrium check from its weights and rewrite
    those fields of its card (the weights file and its SHA-256 are untouched)."""
    import dataclasses

    import zoo

    entry = zoo.entry(name)
    path = entry.weights_path()
    if path is None:
        raise ValueError(f"{name!r} ships no weights")
    card = zoo.card(name)
    metrics, check = measure(zoo.create(name, pretrained=True), get_task(card.task), root)
    card = dataclasses.replace(card, metrics=metrics, equilibrium_check=check)
    write_card(path.with_name(entry.card_file), card)  # type: ignore[arg-type]
    return card


def _solver_settings(model: nn.Module) -> SolverSettings:
    deq = deq_layers(model)[0]
    options = {k: v for k, v in deq.solver.options().items() if isinstance(v, (int, float, str, bool))}
    return SolverSettings(name=deq.solver.name, options=options, tol=deq.tol, max_steps=deq.max_steps, stop_mode=deq.stop_mode)


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
) -> ModelCard:
    """Turn a Lightning checkpoint of an mdeq training module into ``out_dir/<name>.safetensors``
    plus its card ``<name>.json``: measures test accuracy, f-evaluations and the equilibrium check,
    records the training config, the measuring command and the SHA-256. The checkpoint is read
    with ``weights_only=True``.

    Options that only shape training (the DEQ's ``backward``) are recorded under
    ``provenance.training``, not in ``architecture_kwargs``: loading the weights gives the
    library's default backward. ``notes`` adds fields: ``selection`` (how the checkpoint was
    chosen), ``reference`` (a published ``{"accuracy", "source"}``), anything else into
    ``provenance.notes``. ``solver_settings`` (keys of :data:`EVALUATION_SOLVER_OPTIONS`) replaces
    the architecture's default solver settings in the exported model.

    ``name`` is a file name (letters, digits, ``_ . -``; no path); existing files of that name in
    ``out_dir`` are only replaced with ``overwrite=True``; ``config`` must exist (the card cites it)."""
    import zoo
    from zoo.weights import backbone_state, save_weights

    check_export_name(name)
    the_task = get_task(task)
    targets = [Path(out_dir) / f"{name}.safetensors", Path(out_dir) / f"{name}.json"]
    existing = [str(t) for t in targets if os.path.lexists(t)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --force (overwrite=True) to replace them")
    if not Path(config).is_file():
        raise FileNotFoundError(f"training config {config} not found: the card records the config the weights were trained with, so it must exist")
    notes = dict(notes or {})
    selection = notes.pop("selection", "not recorded (pass --note selection=...)")
    reference = notes.pop("reference", None)
    if reference is not None and not (isinstance(reference, dict) and set(reference) <= {"accuracy", "source"} and "accuracy" in reference):
        raise ValueError(f"note 'reference' must be a JSON object {{\"accuracy\": number, \"source\": text}}, got {reference!r}")

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
    metrics, check = measure(model, the_task, root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    sha = save_weights(model, weights, metadata={"name": name, "architecture": arch})
    card = ModelCard(
        name=name,
        architecture=arch,
        architecture_kwargs=arch_kwargs,
        task=task,
        dataset=the_task.dataset,
        num_params=sum(p.numel() for p in model.parameters()),
        num_classes=the_task.num_classes or 0,
        preprocessing=Preprocessing(the_task.input_shape, tuple(the_task.mean or ()), tuple(the_task.std or ()), the_task.scale),
        solver=_solver_settings(model),
        metrics=metrics,
        weights_file=weights.name,
        sha256=sha,
        license=DEFAULT_LICENSE,
        equilibrium_check=check,
        reference=Reference(**{"source": "", **reference}) if reference else None,
        provenance=Provenance(
            train_config=config,
            train_command=f"mdeq fit --config {config}",
            exported_with=command or " ".join(shlex.quote(a) for a in ["mdeq", *sys.argv[1:]]),
            measured_with=f"mdeq test --model {name}" + (" --data-root <root>" if the_task.needs_root else ""),
            created=datetime.date.today().isoformat(),
            selection=str(selection),
            training={
                "epoch": ckpt.get("epoch"),
                "global_step": ckpt.get("global_step"),
                **({"backbone_kwargs": training_only} if training_only else {}),
                **({"started_from": started_from} if started_from else {}),
            },
            notes=notes,
        ),
    )
    write_card(out / f"{name}.json", card)
    return card
