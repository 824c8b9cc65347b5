"""Checkpoints that survive interruption: writes are atomic on a local disk (a crash mid-write never
corrupts last.ckpt), and they go to one folder per run directory, not per logger run, so a resumed
fit finds them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file *in the target's directory*, fsyncs it, then
    renames it over the target (``os.replace``: atomic on POSIX and Windows). A process killed
    at any point leaves either the complete old file or the complete new one.

    (Lightning's own save stages the bytes in the system temp directory and moves them at the
    end; when that is another file system the move is a copy, and a kill during the copy leaves
    a truncated file.) Remote URLs (``s3://`` etc.) are handed to Lightning's implementation.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
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


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Switch ``trainer`` to :class:`AtomicCheckpointIO` unless a custom checkpoint IO was chosen."""
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
