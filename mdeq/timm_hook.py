"""Make the zoo visible to timm after ``import mdeq``, without importing timm (or the zoo) until
the user does.

timm keeps its model registry in memory and offers no plugin entry point, so the zoo registers its
models when timm is imported: immediately if timm is already loaded, otherwise through a one-shot
import hook that runs the registration right after ``import timm`` finishes. This module is the one
place where the library layer refers to the zoo (lazily, by module name)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

ZOO_REGISTRATION = "zoo.timm_models"


def register_zoo() -> None:
    """Register every zoo image classifier with timm (a no-op for those already registered)."""
    try:
        importlib.import_module(ZOO_REGISTRATION).register_all()
    except Exception as err:  # noqa: BLE001 - never break the user's `import timm`
        warnings.warn(f"mdeq could not register its zoo with timm ({type(err).__name__}: {err}); use `import zoo` to see the error", RuntimeWarning, stacklevel=2)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds ``timm`` with the other finders and runs :func:`register_zoo` after it executes."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if fullname != "timm":
            return None
        uninstall()
        spec = importlib.util.find_spec("timm")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            register_zoo()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOK = _RegisterAfterTimm()


def uninstall() -> None:
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register now if timm is loaded, else when it is."""
    if "timm" in sys.modules:
        if ZOO_REGISTRATION not in sys.modules and "zoo" not in sys.modules:
            register_zoo()
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
