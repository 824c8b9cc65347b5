"""Checkpoint writes that are atomic on a local disk: a crash mid-write never corrupts last.ckpt."""

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
