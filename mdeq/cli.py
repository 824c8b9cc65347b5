"""The ``mdeq`` command line: Lightning's CLI (fit/validate/test/predict with YAML configs) plus
a few mdeq commands (demo, solvers, models)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mdeq.shipped_configs import available_configs, with_resolved_configs


def overview() -> str:
    import zoo
    from mdeq.core import list_backwards, list_solvers

    lines = [
        "mdeq: deep equilibrium models for PyTorch",
        "",
        "usage: mdeq {fit,validate,test,predict} --config <task>/<model> | <path.yaml> [--key value ...]",
        "       mdeq doctor --model <name> | --config <yaml> | --module <pkg.mod:factory>   (why a DEQ does not converge, what to change)",
        "       mdeq test --model <zoo name> [--data-root DIR]  (evaluate shipped weights on their task's test split)",
        "       mdeq predict --model <zoo name> IMAGE... [--output preds.csv|preds.json]  (classify image files)",
        "       mdeq export --checkpoint <ckpt> --name <name> --task <task> --config <yaml>",
        "       mdeq demo | mdeq solvers | mdeq models | mdeq --version",
        "",
        "shipped configs (--config accepts configs/<task>/<model>.yaml, <task>/<model> or a unique <model>):",
        *[f"  {c}" for c in available_configs()],
        "",
        "models: " + ", ".join(zoo.list_models()),
        "solvers: " + ", ".join(list_solvers()) + "; backward: " + ", ".join(list_backwards()),
        "",
        "e.g.  mdeq fit --config configs/digits/mdeq_digits.yaml",
        "      mdeq fit --config configs/digits/mdeq_digits.yaml --trainer.max_epochs 5 --model.init_args.lr 3e-3",
        "      mdeq fit --config ... --ckpt_path last          (resume an interrupted run)",
        "      mdeq fit --help                                 (every option of a subcommand)",
    ]
    return "\n".join(lines)


def _lightning_cli(argv: list[str]) -> None:
    from mdeq.lightning.cli import run_lightning_cli

    run_lightning_cli(None if argv == sys.argv[1:] else argv)  # (both given: Lightning warns)


def _from_config(path: str, overrides: list[str]) -> tuple[object, object]:
    """The backbone and one training batch of a config (nothing is trained)."""
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    from mdeq.lightning.classification import DEQLightningModule

    saved = list(sys.argv)
    sys.argv[1:] = []  # the arguments are given as args: Lightning warns when the command line has others too
    try:
        cli = LightningCLI(
            DEQLightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=["--config", path, "--trainer.logger", "false", *overrides],
            save_config_callback=None,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv[:] = saved
    dm = cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return cli.model.backbone, batch


def _from_module(spec: str, input_shape: list[int] | None, batch_size: int) -> tuple[Any, Any]:
    """The model (and batch) of ``mdeq doctor --module PKG.MOD:FACTORY`` or ``path/file.py:FACTORY``."""
    import importlib
    import importlib.util

    import torch
    from torch import nn

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError("expected PKG.MOD:FACTORY or path/to/file.py:FACTORY (e.g. mymodels:build)")
    if where.endswith(".py"):
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise OSError(f"no such file: {where}")
        loader = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if loader is None or loader.loader is None:
            raise ImportError(f"cannot import {where}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own package in this folder
        module = importlib.import_module(where)
    if not hasattr(module, attr):
        public = sorted(n for n in dir(module) if not n.startswith("_"))
        raise AttributeError(f"{where} has no {attr!r} (it defines: {', '.join(public[:20]) or 'nothing public'})")
    made = getattr(module, attr)
    if not isinstance(made, nn.Module):
        if not callable(made):
            raise TypeError(f"{where}:{attr} is a {type(made).__name__}, neither a model nor a function returning one")
        made = made()
    model, batch = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}:{attr} gave a {type(model).__name__}; it must return an nn.Module or (model, batch)")
    if batch is None:
        if not input_shape:
            raise ValueError(f"{where}:{attr} returned a model without a batch: give --input-shape (per sample, e.g. 3 32 32)")
        batch = torch.randn(batch_size, *input_shape)
    return model, batch


def doctor(argv: list[str]) -> int:
    """``mdeq doctor``: diagnose a model's DEQ layer on a batch and recommend changes."""

    import torch

    import zoo
    from mdeq.diagnose import diagnose

    p = argparse.ArgumentParser(prog="mdeq doctor", description="Why does a DEQ (not) converge, and what should change?")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a zoo model name (a random batch of the input shape of its task)")
    src.add_argument("--config", help="a training config: its model and one real training batch")
    src.add_argument(
        "--module", metavar="PKG.MOD:FACTORY",
        help="your own model: FACTORY() in module PKG.MOD (or path/to/file.py:FACTORY; the current folder is importable) "
        "returns an nn.Module (a random batch of --input-shape) or (model, batch); a module-level model object also works",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-shape", type=int, nargs="+", help="per-sample input shape for --model (default: the model's) and --module")
    p.add_argument("--layer", help="name of the DEQ layer (default: the first)")
    p.add_argument("--mode", choices=["train", "eval"], default="train", help="model mode (default train: as in training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default="doctor.png", help="PNG of residual vs iteration per solver ('' for none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a, rest = p.parse_known_args(argv)
    torch.manual_seed(a.seed)
    if a.model:
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        model = zoo.create(a.model)
        shape = tuple(a.input_shape) if a.input_shape else zoo.entry(a.model).input_shape  # from the model's task
        batch = torch.randn(a.batch_size, *shape)
    elif a.module:
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            model, batch = _from_module(a.module, a.input_shape, a.batch_size)
        except (ImportError, AttributeError, TypeError, ValueError, OSError) as err:
            p.error(f"--module {a.module}: {err}")
    else:
        model, batch = _from_config(a.config, rest)
    model.train(a.mode == "train")
    diag = diagnose(model, batch, layer=a.layer, seed=a.seed)
    print(diag.to_json() if a.json else diag.table())
    if a.figure:
        fig = diag.figure()
        fig.savefig(a.figure, dpi=100)
        if not a.json:
            print(f"\nfigure: {a.figure}")
    return 0


def zoo_test_parser() -> argparse.ArgumentParser:
    """The flags of ``mdeq test --model NAME`` (shipped weights on their task's test split)."""

    from mdeq.data.tasks import list_tasks

    p = argparse.ArgumentParser(
        prog="mdeq test",
        description=(
            "Evaluate a zoo model's shipped weights on the test split of its task (--model NAME), or run "
            "Lightning's test loop on a training config (--config FILE; its options follow below)."
        ),
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help (the zoo flags, then Lightning's) and exit")
    p.add_argument("--model", required=True, help="a zoo model with shipped weights (see `mdeq models`)")
    p.add_argument("--data", choices=list_tasks(readable=True), default=None, help="the task (default: the one in the model's card)")
    p.add_argument("--data-root", default=None, help="dataset root (default $MDEQ_DATA or ./data)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=None, help="solver steps (default: the model card's)")
    p.add_argument("--tol", type=float, default=None, help="solver tolerance (default: the model card's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N test images")
    p.add_argument(
        "--equilibrium-check", action="store_true",
        help="also measure at 2x and 5x the solver steps (tol /2, /10): does accuracy hold as the solve tightens?",
    )
    return p


def test_or_validate(subcommand: str, argv: list[str]) -> int:
    """``mdeq test`` / ``mdeq validate``: one command line. With ``--model NAME`` (test only) the
    zoo's weights are measured by :func:`mdeq.evaluation.evaluate`; otherwise Lightning's loop
    runs on a config. ``--help`` shows both sets of flags."""
    if "-h" in argv or "--help" in argv:
        if subcommand == "test":
            print(zoo_test_parser().format_help())
            print("With --config FILE instead of --model, `mdeq test` is Lightning's test loop:\n")
        _lightning_cli([subcommand, "--help"])  # exits after printing
        return 0
    if "--model" not in argv and not any(x.startswith("--model=") for x in argv):
        _lightning_cli([subcommand, *argv])
        return 0
    if subcommand == "validate":
        print(
            "mdeq: error: `mdeq validate --model` has no split to measure: a validation split belongs to a training "
            "config (mdeq validate --config FILE). Shipped weights are measured on their task's test split: mdeq test --model NAME",
            file=sys.stderr,
        )
        return 2
    return test_zoo_model(argv)


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdeq predict",
        description="classify image files with a zoo model: one row per file with the class, its probability and whether the DEQ solve converged",
    )
    p.add_argument("--model", required=True, help="a zoo model with shipped weights (mdeq models)")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads; converted to the model's channels and size)")
    p.add_argument("--output", default="-", help="predictions.csv or predictions.json (default: CSV on stdout)")
    p.add_argument("--top-k", type=int, default=1, help="classes per input (default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=None, help="solver budget for this run (default: the card's)")
    p.add_argument("--tol", type=float, default=None)
    return p


def predict_zoo_model(argv: list[str]) -> int:
    """``mdeq predict --model NAME FILE...``: predictions for image files, as CSV or JSON."""
    import zoo
    from mdeq.core.budget import solver_budget
    from zoo.predict import load_images, predict, write_predictions

    p = predict_parser()
    a = p.parse_args(argv)
    for flag, value in (("--top-k", a.top_k), ("--batch-size", a.batch_size), ("--max-steps", a.max_steps), ("--tol", a.tol)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    if a.output != "-" and Path(a.output).suffix not in (".csv", ".json"):
        p.error(f"--output {a.output}: write .csv or .json (or - for CSV on stdout)")
    model = zoo.create(a.model, pretrained=True)
    try:
        x = load_images(a.images, model)
    except ValueError as err:
        p.error(str(err))
    with solver_budget(max_steps=a.max_steps, tol=a.tol):
        preds = predict(model, x, a.images, labels=model.pretrained_cfg.get("label_names"), top_k=a.top_k, batch_size=a.batch_size)
    write_predictions(preds, a.output)
    unconverged = sum(not q.converged for q in preds)
    if a.output != "-":
        print(f"wrote {len(preds)} predictions to {a.output}" + (f" ({unconverged} solve(s) above tol: see the 'converged' column)" if unconverged else ""))
    return 0


def test_zoo_model(argv: list[str]) -> int:
    """``mdeq test --model <zoo name>``: evaluate shipped weights on their task's test split."""
    import zoo
    from mdeq.core.budget import SolverBudget
    from mdeq.evaluation import evaluate
    from mdeq.lightning.cli import summary_line

    p = zoo_test_parser()
    a = p.parse_args(argv)
    for flag, value in (("--max-steps", a.max_steps), ("--tol", a.tol), ("--limit", a.limit), ("--batch-size", a.batch_size)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    model = zoo.create(a.model, pretrained=True)
    trained_on = zoo.card(a.model).task
    if a.data is not None and trained_on != a.data:
        p.error(f"{a.model} was trained for the task {trained_on!r}, not {a.data!r} (other classes and input shape); use --data {trained_on}")
    budget = SolverBudget(max_steps=a.max_steps, tol=a.tol)
    m = evaluate(model, trained_on, budget, root=a.data_root, limit=a.limit, batch_size=a.batch_size)
    print(summary_line({"test/acc": m.accuracy, "test/top5": m.top5, "test/nfe": m.nfe, "test/residual_mean": m.residual_mean,
                        "test/residual_max": m.residual_max, "test/converged_fraction": m.converged_fraction}))
    if a.equilibrium_check:
        from mdeq.equilibrium_check import default_budgets, equilibrium_check, format_check

        budgets = default_budgets(model, a.max_steps, a.tol)  # around the budget chosen above
        print(format_check(equilibrium_check(model, trained_on, a.data_root, a.limit, budgets, a.batch_size, first_metrics=m)))
    return 0


def export(argv: list[str]) -> int:
    """``mdeq export``: a trained Lightning checkpoint -> checkpoints/<name>.safetensors + card."""
    import json
    import shlex

    from mdeq.data.tasks import list_tasks
    from zoo.export import EVALUATION_SOLVER_OPTIONS, check_export_name, check_solver_settings, export_checkpoint

    p = argparse.ArgumentParser(prog="mdeq export", description="export a trained checkpoint to the zoo (weights + model card)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--task", required=True, choices=list_tasks(readable=True))
    p.add_argument("--config", required=True, help="the training config the checkpoint came from")
    p.add_argument("--out-dir", default="checkpoints")
    p.add_argument("--force", action="store_true", help="replace an existing <out-dir>/<name>.safetensors and .json")
    p.add_argument("--data-root", default=None)
    p.add_argument("--note", action="append", default=[], metavar="KEY=TEXT", help="an extra card field, e.g. selection='best validation epoch' (repeatable; TEXT may be JSON)")
    p.add_argument(
        "--solver-setting", action="append", default=[], metavar="KEY=VALUE",
        help=f"evaluate and ship the model with this DEQ solver setting instead of the architecture's default ({', '.join(EVALUATION_SOLVER_OPTIONS)}; repeatable), e.g. max_steps=60",
    )
    a = p.parse_args(argv)
    try:
        check_export_name(a.name)
    except ValueError as err:
        p.error(f"--name: {err}")
    if not Path(a.config).is_file():
        p.error(f"--config {a.config}: no such file (the card records the training config, so it must exist)")
    existing = [str(Path(a.out_dir) / f"{a.name}{ext}") for ext in (".safetensors", ".json") if (Path(a.out_dir) / f"{a.name}{ext}").exists()]
    if existing and not a.force:
        p.error(f"{', '.join(existing)} already exist(s); pass --force to replace")

    def key_values(items: list[str], flag: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                p.error(f"{flag} takes KEY=VALUE, got {item!r}")
            try:
                out[key.strip()] = json.loads(text)
            except json.JSONDecodeError:
                out[key.strip()] = text
        return out

    notes = key_values(a.note, "--note")
    settings = key_values(a.solver_setting, "--solver-setting")
    try:
        check_solver_settings(settings)  # before the checkpoint is read: a usage error, not a traceback
    except ValueError as err:
        p.error(str(err))
    command = " ".join(shlex.quote(x) for x in ["mdeq", "export", *argv])
    card = export_checkpoint(a.checkpoint, a.name, a.task, a.config, a.out_dir, a.data_root, command=command, notes=notes, solver_settings=settings, overwrite=a.force)
    print(json.dumps(card.to_dict()["metrics"], indent=2))
    from mdeq.equilibrium_check import format_check

    print(format_check(card.to_dict()["equilibrium_check"]))  # a lost equilibrium says so here, and the zoo tests refuse it
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mdeq`` console script. Errors in what the user gave (a missing
    dataset, an unknown or tampered model) print one clear line and exit with status 2;
    ``MDEQ_DEBUG=1`` shows the full traceback instead."""
    import os

    from mdeq.data.sources import DatasetNotFoundError
    from mdeq.data.tasks import UnknownTaskError
    from mdeq.lightning.errors import ConfigError
    from zoo.registry import UnknownModelError
    from zoo.weights import WeightsError

    try:
        return _main(argv)
    except (DatasetNotFoundError, UnknownModelError, UnknownTaskError, WeightsError, ConfigError) as err:
        if os.environ.get("MDEQ_DEBUG"):
            raise
        print(f"mdeq: error: {err}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] != "export":  # export records its training config: a file, as given
        argv = with_resolved_configs(argv)
        if from_console:
            sys.argv[1:] = argv  # Lightning reads sys.argv: the resolved config paths
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    if argv[0] in ("--version", "version"):
        from mdeq import __version__

        print(f"mdeq {__version__}")
        return 0
    if argv[0] == "demo":
        import argparse

        from mdeq.core import list_solvers
        from mdeq.demo import run_demo

        p = argparse.ArgumentParser(prog="mdeq demo", description="train a DEQ on the bundled 8x8 digits in plain PyTorch")
        p.add_argument("--epochs", type=int, default=40)
        p.add_argument("--solver", default="anderson", choices=list_solvers())
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv[1:])
        run_demo(epochs=a.epochs, solver=a.solver, seed=a.seed)
        return 0
    if argv[0] == "solvers":
        from mdeq.core import list_backwards, list_solvers

        print("solvers:  " + ", ".join(list_solvers()))
        print("backward: " + ", ".join(list_backwards()))
        return 0
    if argv[0] == "doctor":
        return doctor(argv[1:])
    if argv[0] == "export":
        return export(argv[1:])
    if argv[0] in ("test", "validate"):
        return test_or_validate(argv[0], argv[1:])
    if argv[0] == "predict" and ("-h" in argv or "--help" in argv):
        print(predict_parser().format_help())
        print("With --config FILE --ckpt_path CKPT instead of --model, `mdeq predict` is Lightning's predict loop (predictions.csv in the run folder):\n")
        _lightning_cli(["predict", "--help"])  # exits after printing
        return 0
    if argv[0] == "predict" and ("--model" in argv or any(x.startswith("--model=") for x in argv)) and "--config" not in argv:
        return predict_zoo_model(argv[1:])
    if argv[0] == "models":
        import zoo

        print("\n".join(zoo.list_models()))
        return 0
    _lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
