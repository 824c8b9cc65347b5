"""Registry of named model constructors."""

from __future__ import annotations

import difflib
from typing import Any, Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model constructor under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models."""
    return sorted(_MODELS)


def create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; unknown names list close matches."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        known = ", ".join(list_models()) or "none registered yet"
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {known}.")
    if pretrained:
        raise ValueError(f"no pretrained weights ship for {name!r} yet (weights arrive with the zoo issue)")
    return _MODELS[name](**kwargs)
