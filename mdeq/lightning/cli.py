"""Lightning's CLI as ``mdeq fit/validate/test/predict`` runs it: atomic checkpoints in one folder
per run directory, a resume that survives a missing ``init_weights`` file, a summary line after
``fit``. Defined at module level so that a Trainer that pickles what it holds (``ddp_spawn``)
can pickle it."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mdeq.lightning.prediction_writer import PredictionWriter, has_prediction_writer
from mdeq.lightning.checkpoint_io import process_alive, use_atomic_checkpoints, use_stable_checkpoint_dirs
from mdeq.lightning.classification import DEQLightningModule
from mdeq.lightning.errors import ConfigError
from mdeq.lightning.precision import check_cpu_precision


class MDEQCLI(LightningCLI):
    """Checkpoints are written atomically into ``<default_root_dir>/checkpoints`` (the same folder
    on every restart, so ``--ckpt_path last`` resumes); a low precision this CPU only emulates
    is warned about (:mod:`mdeq.lightning.precision`); after ``fit``: test the best checkpoint (when the
    data has a test split) and print accuracy and solver statistics."""

    def before_instantiate_classes(self) -> None:
        self.dropped_init_weights = drop_missing_init_weights(self.config, self.subcommand)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        self._given_args = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        """A model or DataModule whose constructor refuses an option raised through jsonargparse as
        a 60-line traceback ending in the cause; it is now a :class:`ConfigError` naming the class
        and the option (the ``mdeq`` command prints it as one line, exit 2)."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise constructor_error(err) from err

    def _parse_ckpt_path(self) -> None:
        """Lightning puts a checkpoint's saved hyperparameters *over* the parsed config, so with
        ``--ckpt_path`` an explicit ``--model.init_args.eval_max_steps 100`` was silently replaced
        by the saved value. The checkpoint now fills in only what the user did not write: every
        model option given on the command line or in a ``--config`` file is put back."""
        subcommand = self.config.get("subcommand")
        before = self.config.clone() if subcommand else None
        super()._parse_ckpt_path()
        if before is None:
            return
        for key in explicit_model_keys(getattr(self, "_given_args", [])):
            full = f"{subcommand}.{key}"
            if full in before and self.config.get(full) != before.get(full):
                self.config[full] = before[full]

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        given = self._get(self.config_init, "trainer", default={})
        if given.get("enable_progress_bar") is False and "callbacks" not in kwargs:
            # `--trainer.enable_progress_bar false` wins over a config's progress-bar callback (the
            # GPU recipes set its refresh rate), instead of Lightning's error about the pair
            from lightning.pytorch.callbacks import ProgressBar

            listed = given.get("callbacks") or []
            listed = listed if isinstance(listed, list) else [listed]
            kept = [c for c in listed if not isinstance(c, ProgressBar)]
            if len(kept) != len(listed):
                kwargs["callbacks"] = kept
        for key, value in integer_limits(getattr(self, "_given_args", [])).items():
            if key not in kwargs and given.get(key) == value:
                kwargs[key] = value  # as written: 1 batch, not 1.0 = 100% (see integer_limits)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, MisconfigurationException) as err:
            raise ConfigError(f"invalid trainer option: {err}{accelerator_hint(given, err)}") from err
        use_atomic_checkpoints(trainer)
        use_stable_checkpoint_dirs(trainer)
        if self.subcommand == "predict" and not has_prediction_writer(trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())  # predictions.csv in default_root_dir
        self.describe_wandb_run(trainer)
        if self.subcommand == "fit":
            claim_run_folder(trainer, self.config[self.subcommand].get("ckpt_path"))
        check_cpu_precision(trainer)
        if self.dropped_init_weights is not None:
            require_resume_checkpoint(trainer, self.config[self.subcommand].get("ckpt_path"), self.dropped_init_weights)
        return trainer

    def run_identity(self) -> tuple[str, str, list[str]]:
        """(name, group, tags) of this run, derived from its config: the config file, the task,
        the backbone and its solvers, the seed and where the weights started."""
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        files = cfg.get("config") or []
        stem = Path(str(files[-1])).stem if files else "run"
        task = getattr(getattr(self.datamodule, "task", None), "name", None) or type(self.datamodule).__name__
        hp = getattr(self.model, "hparams", {})
        backbone = hp.get("backbone") if isinstance(hp.get("backbone"), str) else type(getattr(self.model, "backbone", self.model)).__name__
        solvers = sorted({d.solver.name for d in getattr(self.model, "deqs", [])})
        tags = [task, backbone, self.subcommand or "run", *solvers]
        if hp.get("pretrained"):
            tags.append("pretrained")
        if hp.get("init_weights"):
            tags.append("init_weights")
        return f"{stem}-seed{cfg.get('seed_everything', 0)}", f"{task}/{backbone}", tags

    def describe_wandb_run(self, trainer: pl.Trainer) -> None:
        from mdeq.lightning.loggers import describe_run, wandb_loggers

        loggers = wandb_loggers(trainer)
        if not loggers or self.subcommand is None:
            return
        resolved = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False, skip_check=True))
        resolved.pop("config", None)
        name, group, tags = self.run_identity()
        for lg in loggers:
            describe_run(lg, resolved, name, group, tags)

    def after_fit(self) -> None:
        if self.trainer.interrupted or getattr(self.trainer, "fast_dev_run", False):
            return
        dm = self.datamodule
        if dm is None or type(dm).test_dataloader is pl.LightningDataModule.test_dataloader:
            return
        best = best_checkpoint(self.trainer.checkpoint_callback)
        results = self.trainer.test(self.model, datamodule=dm, ckpt_path=best or None, verbose=False)
        if results and self.trainer.is_global_zero:
            print(summary_line(results[0], best))
        self.log_best_checkpoint(best, results[0] if results else {})

    def log_best_checkpoint(self, best: str, metrics: dict[str, float]) -> None:
        """The tested checkpoint as the W&B run's ``model`` artifact, with the test metrics."""
        from mdeq.lightning.loggers import log_model_artifact, wandb_loggers

        if not best or not self.trainer.is_global_zero:
            return
        name, group, _ = self.run_identity()
        for lg in wandb_loggers(self.trainer):
            meta = {"checkpoint": Path(best).name, "group": group, **{k: float(v) for k, v in metrics.items()}}
            log_model_artifact(lg, best, f"{group.replace('/', '-')}-{name}", meta)


def build_cli(args: list[str] | None) -> MDEQCLI:
    """:class:`MDEQCLI` with mdeq's module and DataModule base classes, run on ``args``."""
    return MDEQCLI(
        DEQLightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


class _DropAdvertisement(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litlogger" line (a product suggestion printed on
    every run that uses another logger; nothing about this run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.getMessage())


_RANK_ZERO_LOG = logging.getLogger("lightning.pytorch.utilities.rank_zero")
if not any(isinstance(f, _DropAdvertisement) for f in _RANK_ZERO_LOG.filters):
    _RANK_ZERO_LOG.addFilter(_DropAdvertisement())


def run_lightning_cli(args: list[str] | None = None) -> None:
    """Run :class:`MDEQCLI` on ``args`` (None: ``sys.argv``), then close W&B cleanly. Given
    ``args`` stand in ``sys.argv`` for the run (Lightning reads it, e.g. to relaunch processes),
    and the caller's ``sys.argv`` is put back after."""
    saved = list(sys.argv)
    if args is not None:
        sys.argv[1:] = args
    try:
        with warnings.catch_warnings(), warnings_above_progress_bars():
            # A new fit never shares a folder with another run's checkpoints (claim_run_folder
            # refuses it), so Lightning's "exists and is not empty" is only ever a resumed run's.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            # Lightning 2.x with torch >= 2.10 (the pinned set): Lightning's own use of a torch API
            # that torch deprecated; nothing a user of the command can change
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
            # the summary table's size estimate assumes 32 bits under bf16: a footnote, not a problem of the run
            warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")
            build_cli(None)
    finally:
        sys.argv[:] = saved
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            from mdeq.lightning.loggers import offline_run_note

            note = offline_run_note(wandb.run)
            wandb.finish()
            teardown = getattr(wandb, "teardown", None)
            if teardown is not None:
                teardown()  # waits for the wandb service to write the run: complete on disk on return
            if note is not None:
                print(note)


BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches")


def _first_rank() -> bool:
    """Global rank 0 as the launcher's environment says (before the Trainer has set up DDP)."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def claim_run_folder(trainer: pl.Trainer, ckpt_path: Any) -> None:
    """A ``fit`` owns its checkpoint folder. A new run (no ``--ckpt_path``) into a folder that holds
    another run's checkpoints would mix its files with them (Lightning only warns and writes
    ``best-epoch=0-v1.ckpt`` beside the old ``last.ckpt``): refused, with the two ways on. A second
    ``fit`` while one is running there is refused too (a lock file with the owner's pid; a lock
    left by a killed process is taken over). Every DDP rank checks for earlier checkpoints (before
    the process group forms, nothing of this run is written yet, so all ranks agree); only global
    rank 0 takes the lock (the other ranks would see it as someone else's)."""
    folders = sorted({Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath})
    if not folders:
        return
    first = _first_rank()
    for folder in folders if first else []:
        lock = lock_file(folder)
        try:
            owner = int(lock.read_text().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and owner != os.getpid() and process_alive(owner):
            raise ConfigError(f"another mdeq fit (process {owner}) is writing to {folder}; wait for it, or give this run its own --trainer.default_root_dir")
    if ckpt_path is None:
        for folder in folders:
            earlier = sorted(p.name for p in folder.glob("*.ckpt"))
            if earlier:
                root = Path(trainer.default_root_dir)
                raise ConfigError(
                    f"{folder} already holds the checkpoints of an earlier run ({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}); "
                    f"continue that run with --ckpt_path last, or start a new one in its own folder with "
                    f"--trainer.default_root_dir {root.parent / (root.name + '-2')} (or delete {root})"
                )
    for folder in folders if first else []:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_file(folder)
        lock.write_text(f"{os.getpid()}\n")
        atexit.register(_release, lock)


def lock_file(folder: Path) -> Path:
    """The lock of a checkpoint folder: beside it, not in it (Lightning warns about any file in a
    checkpoint folder that a run starts with)."""
    return folder.with_name(f".{folder.name}.fit.lock")


def _release(lock: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(lock.read_text().strip()) == os.getpid():
            lock.unlink()


def best_checkpoint(callback: Any) -> str:
    """The best checkpoint of this run, inside its checkpoint folder. A resumed run whose folder was
    moved carries the old path: it is looked up by name in the folder the run uses now (and said),
    never read from the old place, where another run's file may be by now."""
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    if not best or not getattr(callback, "dirpath", None):
        return best or ""
    folder = Path(callback.dirpath).resolve()
    recorded = Path(best)
    if recorded.resolve().parent == folder and recorded.is_file():
        return best
    here = folder / recorded.name
    if here.is_file():
        if _first_rank():
            print(f"mdeq: the run folder has moved: testing {here} (recorded as {best})", file=sys.stderr)
        return str(here)
    raise ConfigError(
        f"this run's best checkpoint is recorded as {best}, which is not in its checkpoint folder {folder} "
        "(was the run folder moved or cleaned?); test a checkpoint explicitly with mdeq test --ckpt_path <file>"
    )


def constructor_error(err: BaseException) -> BaseException:
    """The error to show for a failed instantiation: the innermost cause (what our constructor
    said), prefixed with the class jsonargparse was building. Errors that already speak for
    themselves (bad weights, a missing dataset) are returned as they are."""
    import re

    from mdeq.data.sources import DatasetNotFoundError
    from zoo.weights import WeightsError

    if isinstance(err, ConfigError):  # already says what it is (e.g. from instantiate_trainer)
        return err
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, (WeightsError, DatasetNotFoundError)) and cause is not err:
        return cause
    found = re.search(r"class_path='([^']+)'", str(err))
    where = f"{found.group(1)}: " if found else ""
    return ConfigError(where + (str(cause) if cause is not err else str(err).splitlines()[0]))


@contextlib.contextmanager
def warnings_above_progress_bars() -> Iterator[None]:
    """Print warnings with ``tqdm.write`` while the CLI runs: a warning then appears on its own
    lines above the progress bar instead of splitting the bar's line in two. Only on a terminal
    (where bars redraw in place); elsewhere, e.g. under pytest's warning capture, nothing changes."""
    from tqdm import tqdm

    shown = warnings.showwarning
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        yield
        return

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        if file is not None and file is not sys.stderr:
            return shown(message, category, filename, lineno, file, line)
        tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def accelerator_hint(trainer_options: Any, err: Exception) -> str:
    """What to do when the requested accelerator is not on this machine."""
    import torch

    wanted = str(trainer_options.get("accelerator", "")) if hasattr(trainer_options, "get") else ""
    if "backend found" not in str(err) and "not available" not in str(err).lower():
        return ""
    have = "a CUDA GPU" if torch.cuda.is_available() else "no GPU (torch.cuda.is_available() is False)"
    return f" (--trainer.accelerator {wanted or '?'}: this machine has {have}; use --trainer.accelerator auto to take what is there, or cpu)"


def integer_limits(args: list[str]) -> dict[str, int]:
    """The batch limits that ``args`` write as integers (on the command line, or in a ``--config``
    YAML file; the last one given wins). ``--trainer.limit_val_batches 1`` means one batch, as
    written, but Lightning annotates these options ``Union[float, int]``, so the parser turns ``1``
    into ``1.0``, which Lightning reads as 100% of the batches."""
    import yaml

    written: dict[str, Any] = {}
    for i, token in enumerate(args):
        key, _, value = token.partition("=")
        if key in ("--config", "-c"):
            path = value or (args[i + 1] if i + 1 < len(args) else "")
            try:
                trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            written.update({k: trainer[k] for k in BATCH_LIMITS if k in trainer})
        elif key.startswith("--trainer.") and key[len("--trainer.") :] in BATCH_LIMITS:
            text = value or (args[i + 1] if i + 1 < len(args) else "")
            written[key[len("--trainer.") :]] = int(text) if text.strip().isdigit() else text
    return {k: v for k, v in written.items() if isinstance(v, int) and not isinstance(v, bool)}


def explicit_model_keys(args: list[str]) -> list[str]:
    """The model options that ``args`` set explicitly, as dotted keys (``model.init_args.lr``):
    ``--model.*`` on the command line (``--model.lr`` is short for ``--model.init_args.lr``) and
    the ``model`` section of each ``--config`` file."""
    import yaml

    keys: list[str] = []
    for i, token in enumerate(args):
        key, _, value = token.partition("=")
        if key in ("--config", "-c"):
            path = value or (args[i + 1] if i + 1 < len(args) else "")
            try:
                model = (yaml.safe_load(Path(path).read_text()) or {}).get("model")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(model, dict):
                keys += ["model.class_path"] if "class_path" in model else []
                keys += [f"model.init_args.{k}" for k in (model.get("init_args") or {})]
                keys += [f"model.init_args.{k}" for k in model if k not in ("class_path", "init_args", "dict_kwargs")]
        elif key.startswith("--model."):
            name = key[len("--model.") :]
            keys.append(f"model.{name}" if name.startswith(("init_args.", "class_path")) else f"model.init_args.{name}")
    return list(dict.fromkeys(keys))


def drop_missing_init_weights(config: Any, subcommand: str | None) -> str | None:
    """When a run resumes from a checkpoint (``--ckpt_path``) and the module's ``init_weights`` file
    no longer exists, drop it from the config: the checkpoint restores every weight (and the
    recorded start), so the file that began the run is not needed to continue it. Returns the
    dropped path (None when nothing was dropped). A missing file with nothing to resume from is
    an error, raised here as one clear line rather than from inside the config parser."""
    cfg = config[subcommand] if subcommand else config
    ckpt_path, init_args = cfg.get("ckpt_path"), cfg.get("model.init_args")
    path = init_args.get("init_weights") if init_args is not None else None
    if path is None or Path(path).exists():
        return None
    if not (ckpt_path == "last" or (ckpt_path is not None and Path(str(ckpt_path)).is_file())):
        from zoo.weights import WeightsError

        raise WeightsError(f"init_weights file not found: {path} (model.init_args.init_weights)")
    init_args["init_weights"] = None
    if init_args.get("init_weights_sha256") is not None:
        init_args["init_weights_sha256"] = None  # it checked the file that is gone
    return str(path)


def require_resume_checkpoint(trainer: Any, ckpt_path: str | None, init_weights: str) -> None:
    """After :func:`drop_missing_init_weights`: the checkpoint must really be there, or the run
    would silently start from random weights (Lightning only warns when ``last`` finds nothing)."""
    if ckpt_path == "last":
        candidates = [Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}" for cb in trainer.checkpoint_callbacks if cb.dirpath]
    else:
        candidates = [Path(str(ckpt_path))]  # an existing file (checked when dropping)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:  # Lightning would only warn and train from random weights
        from zoo.weights import WeightsError

        where = ", ".join(str(c) for c in candidates) or "no checkpoint folder"
        raise WeightsError(
            f"init_weights file not found: {init_weights}, and there is no checkpoint to resume from "
            f"(--ckpt_path last: looked for {where}); restore the weights file or give an existing checkpoint"
        )
    if trainer.is_global_zero:  # once per run, not once per DDP process
        print(f"mdeq: init_weights {init_weights} is gone; resuming from {found}, which holds all the weights", file=sys.stderr)


def summary_line(metrics: dict[str, float], ckpt: str = "") -> str:
    """One readable line of test results and solver statistics."""
    parts = []
    if "test/acc" in metrics:
        parts.append(f"test accuracy {metrics['test/acc']:.2%}")
    if "test/top5" in metrics:
        parts.append(f"top-5 {metrics['test/top5']:.2%}")
    if "test/mae" in metrics:
        parts.append(f"test MAE {metrics['test/mae']:.4f}")
    parts.append(
        f"forward f-evals {metrics.get('test/nfe', float('nan')):.1f}, rel. residual mean "
        f"{metrics.get('test/residual_mean', float('nan')):.2e} max {metrics.get('test/residual_max', float('nan')):.2e}, "
        f"converged {metrics.get('test/converged_fraction', float('nan')):.1%}"
    )
    if ckpt:
        parts.append(f"checkpoint {ckpt}")
    return "RESULT: " + "; ".join(parts)
