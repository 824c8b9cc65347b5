"""The training configs that ship with mdeq (``configs/<task>/<model>.yaml`` in the checkout,
``mdeq/configs/`` in an installed wheel), found by path or by a short name."""

from __future__ import annotations

from pathlib import Path

SUFFIX = ".yaml"


def config_dir() -> Path | None:
    """The folder of shipped configs: the installed package's, else the source checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def available_configs() -> list[str]:
    """Shipped configs as ``configs/<task>/<model>.yaml`` (what ``--config`` accepts, from any folder)."""
    root = config_dir()
    if root is None:
        return []
    return sorted(f"configs/{p.relative_to(root).as_posix()}" for p in root.glob(f"*/*{SUFFIX}"))


def resolve_config(arg: str) -> str:
    """``arg`` if it is a file; else the shipped config it names: ``configs/<task>/<model>.yaml``,
    ``<task>/<model>`` or ``<model>`` alone when only one task has it (``.yaml`` optional)."""
    from mdeq.lightning.errors import ConfigError

    if Path(arg).is_file():
        return arg
    root = config_dir()
    key = arg[len("configs/") :] if arg.startswith("configs/") else arg
    key = key[: -len(SUFFIX)] if key.endswith(SUFFIX) else key
    shipped = {c[len("configs/") : -len(SUFFIX)]: c for c in available_configs()}
    if root is not None and key in shipped:
        return str(root / f"{key}{SUFFIX}")
    same_name = sorted(k for k in shipped if k.split("/")[-1] == key)
    if root is not None and len(same_name) == 1:
        return str(root / f"{same_name[0]}{SUFFIX}")
    if len(same_name) > 1:
        raise ConfigError(f"config {arg!r} is in several tasks: {', '.join(same_name)}; name one (e.g. --config {same_name[0]})")
    names = ", ".join(sorted(shipped)) or "none found"
    raise ConfigError(f"config {arg!r} is neither a file nor a shipped config. Shipped configs (by <task>/<model>): {names}")


def with_resolved_configs(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config``/``-c`` value resolved by :func:`resolve_config`."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + resolve_config(a.split("=", 1)[1])
    return out
