"""The shipped configs, made runnable on this machine: a later training stage gets a start file,
and a task whose dataset is absent gets a synthetic DataModule of the same shape."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.lightning.conftest import REPO, real_data_root

CONFIGS = sorted(str(p) for p in (REPO / "configs").glob("*/*.yaml"))
NEEDS_DATA = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def config_id(config: str) -> str:
    return f"{Path(config).parent.name}/{Path(config).stem}"


def runnable(config: str, folder: Path, batch_size: int = 4) -> list[str]:
    """``--config`` and override arguments that run ``config`` here (files written under ``folder``)."""
    task = Path(config).parent.name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(config).read_text())
    init = cfg["model"]["init_args"]
    changed = False
    if init.get("init_weights") is not None:  # a later stage: its start is relative to the repo
        start = REPO / init["init_weights"]
        if not start.is_file():  # the first stage was not run here: start from fresh weights
            from zoo import create, save_weights

            start = folder / "stage1.safetensors"
            save_weights(create(init["backbone"], **init.get("backbone_kwargs", {})), start)
        init["init_weights"], changed = str(start), True
    extra: list[str] = ["--trainer.accelerator", "cpu"]
    if task in NEEDS_DATA:
        if real_data_root() is not None:
            extra += ["--data.init_args.root", str(real_data_root()), "--data.init_args.num_workers", "0", "--data.init_args.batch_size", str(batch_size)]
            if "eval_batch_size" in cfg["data"].get("init_args", {}):  # (the GPU recipes evaluate 1,000 images per batch)
                extra += ["--data.init_args.eval_batch_size", str(batch_size)]
        else:  # no data here: same config with a synthetic DataModule of the same shape
            cfg["data"] = {"class_path": "mdeq.lightning.SyntheticDataModule", "init_args": {"input_shape": list(NEEDS_DATA[task]), "batch_size": batch_size}}
            changed = True
    if Path(config).stem == "mdeq_large":
        extra += ["--model.init_args.train_max_steps", "3"]
    if changed:
        config = str(folder / f"{Path(config).stem}.yaml")
        Path(config).write_text(yaml.safe_dump(cfg))
    return ["--config", config, *extra]
