"""Epoch time of the CIFAR-10 training path, old vs new, side by side (issue #26).

For each model, three Lightning runs of the real CLI (``mdeq fit --config ...``), one after the
other in this process's machine, each timed by ``mdeq.lightning.StepTimer`` between two steps
(the device is synchronised only there):

- old: ``configs/cifar10/<model>.yaml`` as shipped (DataLoader with workers, early-stopping
  solves, the guard reading every step, Lightning's per-step progress bar);
- new, DataLoader: ``configs/cifar10/<model>_gpu.yaml`` with ``data_on_device: false`` (the fixed
  budget and the guard every 50 steps, but host-side batches);
- new: ``configs/cifar10/<model>_gpu.yaml`` as shipped (data on the device as well).

Each row reports ms per step, images/s and the implied time of one 47,500-image epoch; the last
column is the old path's epoch time over this row's (above 1: faster). The configs differ in batch size and budget by
design (that is the recipe); images/s compares them fairly. Needs CIFAR-10 under $MDEQ_DATA.

Usage: MDEQ_DATA=../shared/data python benchmarks/epoch_time.py [--models mdeq_tiny conv_deq_small]
       (CPU smoke run: --device cpu --limit-train 400 --batch 16 --steps 1:3)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 47_500  # CIFAR-10's training split less the configs' 5% validation


def variant(model: str, path: str) -> tuple[Path, dict[str, Any]]:
    if path == "old":
        return REPO / "configs" / "cifar10" / f"{model}.yaml", {}
    if path == "new, DataLoader":
        return REPO / "configs" / "cifar10" / f"{model}_gpu.yaml", {"data_on_device": False, "num_workers": 4}
    return REPO / "configs" / "cifar10" / f"{model}_gpu.yaml", {}


def timed_run(model: str, path: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    source, data_changes = variant(model, path)
    cfg = yaml.safe_load(source.read_text())
    trainer, module, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    start, end = (int(v) for v in args.steps.split(":"))
    timing = folder / "timing.json"
    trainer.update(default_root_dir=str(folder), logger=False, enable_checkpointing=False, limit_val_batches=0, limit_test_batches=0, max_epochs=1)
    trainer["callbacks"] = [c for c in trainer.get("callbacks", []) if not c["class_path"].endswith(("ModelCheckpoint", "ResidualPlotCallback"))]
    trainer["callbacks"].append(
        {"class_path": "mdeq.lightning.StepTimer", "init_args": {"path": str(timing), "start_step": start, "end_step": end, "stop": True}}
    )
    module["pretrain_steps"] = 0  # the solver phase is timed (the unrolled warm-up is a short prefix)
    data.update(data_changes)
    if args.device == "cpu":
        trainer.update(accelerator="cpu", precision="32-true")
        data["num_workers"] = 0 if data.get("data_on_device") else min(data.get("num_workers", 0), 2)
    if args.limit_train:
        data["limit_train"] = args.limit_train
    if args.batch:
        data["batch_size"] = args.batch
    config = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "mdeq.cli", "fit", "--config", str(config)], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not timing.is_file():
        raise RuntimeError(f"{model} ({path}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(timing.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description="CIFAR-10 epoch time: the old training path vs the GPU recipe's, side by side")
    p.add_argument("--models", nargs="+", default=["mdeq_tiny", "conv_deq_small"], choices=["mdeq_tiny", "conv_deq_small"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", default="20:120", help="time the steps between these two (after warm-up)")
    p.add_argument("--limit-train", type=int, default=None, help="training images (smoke runs)")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every run (default: each config's own)")
    args = p.parse_args()
    print("| model | path | batch | ms/step | images/s | epoch (47,500 images) | speed-up vs old |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            old_epoch = None
            for path in ("old", "new, DataLoader", "new"):
                t = timed_run(model, path, args, Path(tmp) / model / path.replace(", ", "_"))
                ips = t["batch_size"] / t["seconds_per_step"]
                epoch = TRAIN_IMAGES / ips
                old_epoch = old_epoch or epoch
                print(f"| {model} | {path} | {t['batch_size']} | {t['seconds_per_step'] * 1e3:.1f} | {ips:.0f} | {epoch:.1f} s | {old_epoch / epoch:.2f}x |", flush=True)
    print(f"\ndevice: {t['device']}; steps {args.steps} timed; command: python benchmarks/epoch_time.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
