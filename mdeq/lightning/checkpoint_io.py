"""Checkpoints that survive interruption and never run code: writes are atomic on a local disk (a
crash mid-write never corrupts last.ckpt), they go to one folder per run directory, not per logger
run, so a resumed fit finds them, and every read, local or remote, unpickles plain data only."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Callable, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from zoo.weights import WeightsError

DOWNLOAD_TIMEOUT_S = 60.0


class CheckpointRefusedError(WeightsError):
    """A checkpoint that holds more than tensors and plain data (pickled objects that could run
    code): refused without unpickling it."""


def read_checkpoint(path: Union[str, Path, io.IOBase], map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
    """A Lightning checkpoint from a local path, an ``http(s)://`` URL or any fsspec URL, always
    unpickled with ``torch.load(weights_only=True)``: code smuggled into the file is refused, never run.

    (Lightning loads URLs with ``weights_only=False`` and caches them by file name in torch hub's
    folder, so a second URL with the same name would get the first file; a URL is fetched here into
    memory on each call.) ``weights_only=False`` is refused: mdeq never unpickles code."""
    if weights_only is False:
        raise CheckpointRefusedError(f"refusing to read {path} with weights_only=False: mdeq never unpickles code from a checkpoint")
    text = str(path) if isinstance(path, (str, Path)) else None
    if text is None:
        source: Any = path
    elif text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 - user-given checkpoint URL
                source = io.BytesIO(response.read())
        except OSError as err:
            raise WeightsError(f"could not download checkpoint {text}: {err}") from err
    elif "://" in text:
        from lightning.fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(text)
        if not fs.exists(text):
            raise FileNotFoundError(f"Checkpoint file not found: {text}")
        with fs.open(text, "rb") as f:
            source = io.BytesIO(f.read())
    else:
        if not Path(text).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {text}")
        source = text
    try:
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler names what it refused; never retried unsafely
        raise CheckpointRefusedError(
            f"refused to load checkpoint {text or path}: it holds pickled objects other than tensors and plain data, "
            f"which could run code (torch.load(weights_only=True) rejected it: {str(err).splitlines()[0][:200]}). "
            "mdeq never unpickles code; re-save the checkpoint with plain data, or export its weights to safetensors."
        ) from err
    except Exception as err:  # noqa: BLE001 - truncated, not a zip/pickle, wrong map_location, ...
        raise WeightsError(f"could not read checkpoint {text or path} (truncated or not a checkpoint?): {type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{text or path} is not a Lightning checkpoint (got a {type(checkpoint).__name__}, expected a dict)")
    return checkpoint


CHECKPOINT_MODE = 0o644
"""Checkpoints are readable by the group and others, like exported weights and any file written
under the default umask (the temporary file they are staged in would be owner-only)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Reads every checkpoint with :func:`read_checkpoint` (plain data only, local or remote).

    Writes each checkpoint to a temporary file *in the target's directory*, fsyncs it, then
    renames it over the target (``os.replace``: atomic on POSIX and Windows). A process killed
    at any point leaves either the complete old file or the complete new one.

    (Lightning's own save stages the bytes in the system temp directory and moves them at the
    end; when that is another file system the move is a copy, and a kill during the copy leaves
    a truncated file.) Remote URLs (``s3://`` etc.) are handed to Lightning's implementation.
    """

    def load_checkpoint(self, path: Any, map_location: Callable | Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_writes(target.parent)
        # the writer's pid is in the name, so a later save can tell an abandoned write from a live one
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), CHECKPOINT_MODE)  # mkstemp makes it owner-only (0600)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_abandoned_writes(folder: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.<random>.partial`` files in ``folder`` whose writer is no longer
    running (a process killed mid-write leaves one; the checkpoint it was replacing is intact).
    Says so on stderr; returns what it removed. Writes of live processes are left alone."""
    import sys

    removed = []
    for partial in folder.glob(".*.partial"):
        parts = partial.name.split(".")
        pid = next((int(p) for p in reversed(parts[:-1]) if p.isdigit()), None)
        if pid is None or pid == os.getpid() or process_alive(pid):
            continue
        with contextlib.suppress(OSError):
            size = partial.stat().st_size
            partial.unlink()
            removed.append(partial)
            print(f"mdeq: removed {partial} ({size} bytes): an unfinished checkpoint write of process {pid}, which is gone", file=sys.stderr)
    return removed


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Switch ``trainer`` to :class:`AtomicCheckpointIO` (atomic writes, safe reads) unless a custom
    checkpoint IO was chosen. Every mdeq LightningModule calls it in ``setup``, before Lightning
    restores a ``ckpt_path``, so plain ``Trainer`` use is covered as well as the CLI."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def use_stable_checkpoint_dirs(trainer: pl.Trainer) -> None:
    """Point every ``ModelCheckpoint`` without a ``dirpath`` at ``<default_root_dir>/checkpoints``.

    Lightning's default folder is the logger's per-run one (``<save_dir>/<project>/<run id>/checkpoints``
    for W&B), and an offline W&B run gets a new id on every start. A resumed fit would then look for
    ``--ckpt_path last`` in an empty folder and start from scratch (Lightning only warns), and
    ``ModelCheckpoint`` would forget its best score ("dirpath has changed"). One folder per
    ``default_root_dir`` keeps both across restarts. An explicit ``dirpath`` is left as it is.
    """
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is None:
            callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
