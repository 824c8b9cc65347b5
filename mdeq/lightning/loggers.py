"""Weights & Biases logging that works without a network: offline when no API key is set."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_key_available() -> bool:
    """True when an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    return rc.authenticators(host) is not None


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that never prompts and never waits on the network: with no API key (or
    ``offline=True``) it runs offline and writes the run under ``save_dir/wandb`` for a later
    ``wandb sync``; with a key it logs online."""

    def __init__(self, project: str = "mdeq", save_dir: str = "runs", offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = not wandb_key_available()
        if offline:
            os.environ["WANDB_MODE"] = "offline"
            if kwargs.get("settings") is None:
                # wandb's own banner and run summary (about 40 lines) are for online runs; offline,
                # run_lightning_cli prints one line saying where the run is and how to upload it
                import wandb

                kwargs["settings"] = wandb.Settings(silent=True)
        os.environ.setdefault("WANDB_CONSOLE", "off")
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
        # Lightning always passes ``anonymous`` to ``wandb.init`` (None unless asked for), and
        # recent wandb (0.31 here) warns that the setting has no effect whenever the key is present.
        init_kwargs = getattr(self, "_wandb_init", None)
        if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous") is None:
            init_kwargs.pop("anonymous", None)


def offline_run_note(run: Any) -> str | None:
    """One line for the end of a run that W&B kept offline: where it is, how to upload it."""
    settings = getattr(run, "settings", None)
    if settings is None or getattr(settings, "mode", None) not in ("offline", "dryrun"):
        return None
    folder = os.path.dirname(str(run.dir).rstrip(os.sep))
    if os.path.basename(folder) == "files":  # (older wandb: run.dir is the run's files/ folder)
        folder = os.path.dirname(folder)
    return f"W&B (offline, no API key): run saved in {os.path.relpath(folder)}; upload it with `wandb sync {os.path.relpath(folder)}`"


def wandb_loggers(trainer: Any) -> list[WandbLogger]:
    """The trainer's W&B loggers (any ``WandbLogger``, ours or Lightning's)."""
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)]


def describe_run(logger: WandbLogger, config: dict[str, Any], name: str, group: str, tags: list[str]) -> None:
    """Before the W&B run starts: the whole resolved config (trainer, model, data) as its config,
    and a name, group and tags derived from it, each only where the user set none."""
    init = getattr(logger, "_wandb_init", None)
    if not isinstance(init, dict) or getattr(logger, "_experiment", None) is not None:
        return  # the run already exists (resumed, or created early by the user)
    init["config"] = {**config, **(init.get("config") or {})}
    if not init.get("name"):
        init["name"] = name
    if not init.get("group"):
        init["group"] = group
    init["tags"] = sorted(set(init.get("tags") or ()) | set(tags))


def log_model_artifact(logger: WandbLogger, path: str, name: str, metadata: dict[str, Any]) -> None:
    """Attach a checkpoint (or exported weights) to the run as a W&B ``model`` artifact (kept in
    the offline run too, uploaded by ``wandb sync``)."""
    import wandb

    artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
    artifact.add_file(path)
    logger.experiment.log_artifact(artifact, aliases=["best", "latest"])
