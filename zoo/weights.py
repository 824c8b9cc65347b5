"""Safe weight files: safetensors + a JSON model card carrying the file's SHA-256.

Loading never executes code from a file: ``.safetensors`` is a plain tensor container, and any
other file is read with ``torch.load(weights_only=True)``, which refuses pickled objects. Every
load is checked against the card's SHA-256 and the model's parameter names and shapes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn


class WeightsError(ValueError):
    """A weights file that cannot be used: missing, tampered, truncated or for another model."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dirs() -> list[Path]:
    """Where shipped weights are looked for: ``$MDEQ_CHECKPOINTS``, then the installed package's
    ``zoo/checkpoints/`` (package data of the wheel), then the source checkout's ``checkpoints/``."""
    dirs = []
    if os.environ.get("MDEQ_CHECKPOINTS"):
        dirs.append(Path(os.environ["MDEQ_CHECKPOINTS"]))
    here = Path(__file__).resolve().parent
    dirs.append(here / "checkpoints")
    dirs.append(here.parent / "checkpoints")
    return dirs


def find_checkpoint(filename: str) -> Path | None:
    """The first ``filename`` in :func:`checkpoint_dirs`. Under ``$MDEQ_CHECKPOINTS`` the user asked
    for their own files: a folder that is not there, or a broken link or a directory in the file's
    place, is an error, never a silent fall back to the shipped file. (A file that folder does not
    hold at all falls back: it may override only some models.)"""
    override = os.environ.get("MDEQ_CHECKPOINTS")
    if override:
        folder = Path(override)
        if not folder.is_dir():
            raise WeightsError(f"MDEQ_CHECKPOINTS={override} is not a directory; unset it or point it at a folder of weights and cards")
        candidate = folder / filename
        if os.path.lexists(candidate) and not candidate.is_file():
            what = "a broken link" if candidate.is_symlink() and not candidate.exists() else "a directory" if candidate.is_dir() else "not a regular file"
            raise WeightsError(f"{candidate} (under MDEQ_CHECKPOINTS) is {what}; replace it with the weights file or remove it")
    for d in checkpoint_dirs():
        if (d / filename).is_file():
            return d / filename
    return None


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a safetensors file, or from a torch file loaded with ``weights_only=True``
    (a pickle carrying code is refused without running it)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise WeightsError(f"{path} is not a valid safetensors file (truncated or corrupt?): {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses code-carrying pickles; never retried unsafely
        raise WeightsError(
            f"refused to load {path}: it is not a plain tensor file (torch.load with weights_only=True "
            f"rejected it: {type(err).__name__}). mdeq never unpickles code; convert it to safetensors."
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a mapping of parameter names to tensors")
    return dict(obj)


def check_compatible(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """Clear error unless ``tensors`` has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: file {got[k]} vs model {expected[k]}" for k in wrong[:3]))
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) + ". Is it another model's file?")


def check_values(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """Clear error unless every tensor has the model's dtype (nothing is cast silently) and every
    floating-point tensor is finite (a NaN or Inf weight poisons every output)."""
    own = model.state_dict()
    for key, value in tensors.items():
        if key in own and value.dtype != own[key].dtype:
            raise WeightsError(f"{source}: tensor {key!r} is {value.dtype}, the model's is {own[key].dtype}; refusing to cast it silently")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise WeightsError(f"{source}: tensor {key!r} holds {bad} NaN/Inf value(s); these weights are broken")


SHA256_HEX = frozenset("0123456789abcdef")


def check_sha256_field(value: Any, source: str) -> str:
    """The ``sha256`` of a card: 64 lowercase hex digits, or a :class:`WeightsError` naming ``source``."""
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= SHA256_HEX:
        raise WeightsError(f"{source}: field 'sha256' must be the weights file's SHA-256 (64 hex digits), got {value!r}; the file cannot be verified, so it is not loaded")
    return value


def load_weights(
    model: nn.Module,
    path: str | Path,
    sha256: str | None = None,
    *,
    fresh: tuple[str, ...] = (),
    input_channels: tuple[str, int] | None = None,
) -> nn.Module:
    """Load ``path`` into ``model`` after checking its SHA-256 (when given), keys, shapes, dtypes
    and values (finite).

    Fine-tuning to another head or input: ``fresh`` names modules (e.g. the classifier,
    ``"head.classifier"``) whose tensors keep the model's own initialisation, the file's being
    dropped (the model was built for another class count, or none). ``input_channels=(key, n)``:
    the file's tensor ``key`` (the first layer's weight) was trained on ``n`` input channels and
    the model takes another number; it is adapted (summed for one channel, else repeated and
    rescaled so a replicated gray image gives the same response). Any other mismatch is an error."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256:
            raise WeightsError(
                f"{path}: SHA-256 mismatch (the file was changed, truncated or replaced): expected {sha256}, got {actual}. "
                "Reinstall or re-fetch the weights."
            )
    tensors = read_tensors(path)
    own = model.state_dict()
    if fresh:
        prefixes = tuple(f"{m}." for m in fresh)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
        tensors.update({k: v for k, v in own.items() if k.startswith(prefixes)})
    if input_channels is not None:
        key, trained = input_channels
        if key not in tensors or key not in own:
            raise WeightsError(f"{path}: no first-layer tensor {key!r} to adapt to the model's input channels")
        tensors[key] = adapt_input_channels(tensors[key], trained, own[key].shape)
    check_compatible(model, tensors, str(path))
    check_values(model, tensors, str(path))
    model.load_state_dict(tensors, strict=True)
    return model


def adapt_input_channels(weight: Tensor, trained: int, shape: torch.Size) -> Tensor:
    """A first layer's ``weight`` trained on ``trained`` input channels, for a model whose tensor
    has ``shape``. Dimension 1 holds the channels (a convolution's ``(out, C, kh, kw)``, or a
    linear layer over flattened ``(C, H, W)`` inputs, ``(out, C*H*W)``). One channel: the sum over
    the trained ones; otherwise the trained channels repeated in turn and scaled by
    ``trained / channels``."""
    if weight.shape[0] != shape[0] or weight.shape[1] % trained or len(weight.shape) != len(shape):
        raise WeightsError(f"cannot adapt a first layer of shape {tuple(weight.shape)} trained on {trained} channels to {tuple(shape)}")
    per_channel = weight.shape[1] // trained
    if shape[1] % per_channel:
        raise WeightsError(f"cannot adapt a first layer of shape {tuple(weight.shape)} to {tuple(shape)}: not a change of input channels")
    channels = shape[1] // per_channel
    w = weight.reshape(weight.shape[0], trained, per_channel, *weight.shape[2:]).float()
    if channels == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        index = torch.arange(channels) % trained
        out = w[:, index] * (trained / channels)
    return out.reshape(shape).to(weight.dtype)


def save_weights(model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``model``'s state_dict as safetensors (readable by all, like any other data file);
    returns the file's SHA-256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=dict(metadata or {}))
    Path(path).chmod(0o644)  # safetensors creates its files owner-only (0600), whatever the umask
    return sha256_of(path)


def backbone_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's tensors from a training module's state dict (keys ``backbone.*``, prefix
    dropped); a mapping without that prefix is taken to be a backbone's own state dict already."""
    prefix = "backbone."
    if not any(k.startswith(prefix) for k in tensors):
        return dict(tensors)
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
