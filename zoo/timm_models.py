"""Every zoo model is also a timm model: ``timm.create_model(name, pretrained=True)`` builds it
through ``zoo.create`` (the same verified weights; nothing is downloaded)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None, **kwargs: Any) -> nn.Module:
        from zoo.registry import create as zoo_create

        kwargs.pop("cache_dir", None)
        return zoo_create(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    return create


def register_all(names: list[str]) -> None:
    """Register ``names`` with timm (skipped if timm is not installed)."""
    try:
        from timm.models import is_model, register_model
    except ImportError:  # pragma: no cover - timm is a dependency, but stay usable without it
        return
    for name in names:
        if not is_model(name):
            fn = _entrypoint(name)
            globals()[name] = fn
            register_model(fn)
