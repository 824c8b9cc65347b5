"""Every zoo image classifier is also a timm model: ``timm.create_model(name, pretrained=True)``
builds it through :func:`zoo.create` (the same verified weights; nothing is downloaded), with
timm's pretrained configuration (:mod:`zoo.pretrained_cfg`) declared for ``timm.list_models``,
``get_pretrained_cfg_value`` and ``resolve_data_config``.

timm's names map to ours: ``in_chans`` is ``in_channels``; ``features_only``/``out_indices``,
``num_classes`` (0 = pooled features) and ``global_pool`` mean what they mean in timm. Not
registered: models that are not image classifiers (the toy regressor). Registration happens when
timm is imported after ``import mdeq`` (:mod:`mdeq.timm_hook`), or at ``import zoo`` if timm is
already loaded.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

from torch import nn

default_cfgs: dict[str, dict[str, Any]] = {}
"""timm reads a registered entrypoint's configuration from its module's ``default_cfgs``."""


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None, **kwargs: Any) -> nn.Module:
        from zoo.registry import create as zoo_create

        kwargs.pop("cache_dir", None)
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs.get("feature_cls") not in (None, "getter"):
            raise ValueError(f"{name}: feature_cls={kwargs['feature_cls']!r} is not supported; the features of a DEQ come from its solve (leave feature_cls unset)")
        kwargs.pop("feature_cls", None)
        if "in_chans" in kwargs:
            kwargs["in_channels"] = kwargs.pop("in_chans")
        model = zoo_create(name, pretrained=pretrained, **kwargs)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **dict(pretrained_cfg_overlay)}  # type: ignore[assignment]
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"timm entrypoint of the mdeq zoo model {name!r} (see zoo.create)."
    return create


def register_all() -> list[str]:
    """Register every zoo image classifier with timm; returns the names registered by this call."""
    from timm.models import is_model, register_model
    from timm.models._pretrained import PretrainedCfg

    from zoo.pretrained_cfg import is_image_classifier, pretrained_cfg
    from zoo.registry import card, entry, list_models

    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    added = []
    for name in list_models():
        e = entry(name)
        if not is_image_classifier(e) or is_model(name):
            continue
        shipped = card(name) if e.weights_path() is not None else None
        default_cfgs[name] = {k: v for k, v in pretrained_cfg(e, shipped).items() if k in fields}
        fn = _entrypoint(name)
        setattr(sys.modules[__name__], name, fn)
        register_model(fn)
        added.append(name)
    return added
