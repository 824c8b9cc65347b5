"""One GPU lease, as two device calls: CIFAR-10 training of both zoo models from this repo's configs.

A lent session has 15 minutes of device time (start-up included), 10 minutes per call and 64 MiB
carried per call; the machine keeps files only while calls follow within about 30 s. So:

  call 1  carry .carry/cifar10.a.pack, .whl    python3 tools/gpu/lease.py prepare
  call 2  carry .carry/cifar10.b.pack          python3 tools/gpu/lease.py prepare && python3 tools/gpu/lease.py run --budget 520

``prepare`` installs the carried wheels (jsonargparse for the ``mdeq`` CLI; the image lacks it) into
/tmp/site and unpacks every carried shard into /tmp/mdeq_data (each verified bit-identical to the
original arrays; tools/gpu/cifar_pack.py). ``run``, within ``--budget`` seconds of its start:

1. measures both models' training step time, both running at once as they will train
   (``StepTimer``; the mdeq_tiny measurement skips its unrolled warm-up, the slower phase is timed);
2. sizes each model's epoch count so that its whole cosine schedule ends before the budget does,
   leaving ``--reserve`` seconds for the final evaluation;
3. chooses the start by a rule fixed before the run: from scratch when at least ``--scratch-epochs``
   epochs fit, else from the shipped weights (checkpoints/<model>_cifar10.safetensors) with a
   shorter warm-up; ``--start NAME=FILE`` continues from a previous lease's weights instead;
4. trains both at once (configs/cifar10/<model>_gpu.yaml; a checkpoint at every epoch end, CSV logs);
5. evaluates the final weights (the selection rule: final, never picked by test accuracy) on the
   full test split at the shipped budget and runs the equilibrium check (more steps, tighter tol),
   and writes everything under $OUT: <name>-final.ckpt, <name>-result.json, <name>-metrics.csv,
   <name>.log, lease.json (the plan and the wall time of each phase).

Rehearse on CPU first (nothing is first tried on the device):
  python3 tools/gpu/lease.py prepare --shards <tiny shards> && \
  python3 tools/gpu/lease.py run --budget 400 --allow-cpu --rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MDEQ_LEASE_DATA", "/tmp/mdeq_data"))
RUNS = Path(os.environ.get("MDEQ_LEASE_RUNS", "/tmp/mdeq_runs"))
SITE = Path("/tmp/site")
MODELS = ("mdeq_tiny", "conv_deq_small")
PYTHON = sys.executable


def log(msg: str) -> None:
    print(f"[lease {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- prepare ---------------------------------------------------------------------------------------
def prepare(shards: list[Path], wheels: Path) -> None:
    wheel_files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if wheel_files:
        subprocess.run(
            [PYTHON, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
             "--target", str(SITE), *map(str, wheel_files)],
            check=True,
        )
        log(f"installed {len(wheel_files)} wheels into {SITE}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cifar_pack

    for shard in shards:
        done = DATA / ".unpacked" / (shard.name + ".done")
        if done.is_file():
            log(f"{shard} already unpacked")
            continue
        cifar_pack.unpack([shard], DATA)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(str(shard.stat().st_size))
    present = sorted(p.name for p in (DATA / "cifar-10-batches-py").glob("*")) if (DATA / "cifar-10-batches-py").is_dir() else []
    log(f"data in {DATA}: {present}")
    passed = DATA / ".unpacked" / "smoke_check.passed"
    if passed.is_file():  # (call 2: call 1 checked this machine already)
        log("smoke check passed in an earlier call on this machine")
    elif smoke_check():
        passed.parent.mkdir(parents=True, exist_ok=True)
        passed.write_text(time.strftime("%H:%M:%S"))


def smoke_check() -> bool:
    """Versions, and one training step of each model on 2 images (the image's torch and Lightning
    are not the ones CI tests with): a failure shows in call 1, before the long call."""
    code = (
        "import torch, lightning, jsonargparse, zoo\n"
        "from mdeq.core.budget import solver_budget\n"
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "print('torch', torch.__version__, 'lightning', lightning.__version__, 'jsonargparse', jsonargparse.__version__, dev,\n"
        "      torch.cuda.get_device_name() if dev == 'cuda' else '')\n"
        "for name in ('mdeq_tiny', 'conv_deq_small'):\n"
        "    m = zoo.create(name).to(dev).train()\n"
        "    with solver_budget(fixed=True, quiet=True), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == 'cuda'):\n"
        "        out, sol = m(torch.randn(2, 3, 32, 32, device=dev), return_solution=True)\n"
        "    out.float().square().mean().backward()\n"
        "    print(name, 'forward+backward ok,', sol.nsteps, 'steps')\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], env=_env(), cwd=REPO, capture_output=True, text=True)
    print(proc.stdout + proc.stderr[-3000:], end="")
    ok = proc.returncode == 0
    # then the GPU recipe itself through `mdeq fit` for 3 steps (its precision plugin, clipping,
    # guard, data on the device) on synthetic CIFAR-shaped data, small batches
    folder = RUNS / "smoke"
    cfg = derived_config("mdeq_tiny", folder, {"trainer.max_steps": 3, "trainer.limit_val_batches": 1, "trainer.limit_test_batches": 1,
                                                "model.pretrain_steps": 1}, rehearsal=False)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data["data"] = {"class_path": "mdeq.lightning.SyntheticDataModule",
                    "init_args": {"input_shape": [3, 32, 32], "batch_size": 8, "augment": True, "data_on_device": True}}
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    fit = subprocess.run([PYTHON, "-m", "mdeq.cli", "fit", "--config", str(cfg)], env=_env(), cwd=REPO, capture_output=True, text=True)
    result = [line for line in fit.stdout.splitlines() if line.startswith("RESULT")]
    print("\n".join(result) if fit.returncode == 0 else (fit.stdout + fit.stderr)[-3000:])
    ok = ok and fit.returncode == 0
    log("smoke check " + ("passed" if ok else "FAILED"))
    return ok


# ---- run -----------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(SITE), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), MDEQ_DATA=str(DATA), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.setdefault("MDEQ_CACHE", "/tmp/mdeq_cache")
    return env


def derived_config(name: str, folder: Path, overrides: dict[str, Any], rehearsal: bool) -> Path:
    """configs/cifar10/<name>_gpu.yaml with this phase's changes (a file, so the run's own
    config.yaml records exactly what ran)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "cifar10" / f"{name}_gpu.yaml").read_text())
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    trainer["default_root_dir"] = str(folder)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder), "name": "csv"}}
    data["root"] = str(DATA)
    limit_train = overrides.pop("limit_train", None)
    if limit_train is not None:
        data["limit_train"] = limit_train
    if rehearsal:  # CPU: a tiny subset, small batches, float32 (no bf16 on this CPU)
        trainer["precision"] = "32-true"
        data.update(limit_train=limit_train or 640, limit_test=200, batch_size=32, eval_batch_size=100)
    timer = overrides.pop("add_callback", None)
    if timer is not None:  # (measurement) no checkpoints; the config's other callbacks stay
        trainer["callbacks"] = [c for c in trainer.get("callbacks", []) if not c["class_path"].endswith("ModelCheckpoint")] + [timer]
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        {"trainer": trainer, "model": model, "data": data}[section][field] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_fit(config: Path, log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "mdeq.cli", "fit", "--config", str(config)],
        stdout=open(log_file, "w"), stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True,
    )


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int | None]:
    """Wait for every process until ``deadline``; stop the ones still running then (SIGINT, which
    Lightning turns into a clean stop, then SIGKILL). Returns the exit codes (None: stopped)."""
    codes: dict[str, int | None] = {}
    while len(codes) < len(procs):
        for name, p in procs.items():
            if name not in codes and p.poll() is not None:
                codes[name] = p.returncode
        if len(codes) < len(procs) and time.time() > deadline:
            for name, p in procs.items():
                if name not in codes:
                    log(f"{name}: past its deadline, stopping it")
                    os.killpg(p.pid, signal.SIGINT)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
                    codes[name] = None
        time.sleep(1)
    return codes


def measure(rehearsal: bool, steps: tuple[int, int], limit_train: int | None) -> dict[str, dict[str, Any]]:
    """Seconds per training step of each model, both training at once."""
    procs, files = {}, {}
    for name in MODELS:
        folder = RUNS / "measure" / name
        files[name] = folder / "timing.json"
        cfg = derived_config(
            name, folder,
            {"trainer.max_epochs": 1, "trainer.limit_val_batches": 0, "trainer.limit_test_batches": 0, "trainer.enable_checkpointing": False,
             "add_callback": {"class_path": "mdeq.lightning.StepTimer",
                              "init_args": {"path": str(files[name]), "start_step": steps[0], "end_step": steps[1], "stop": True}},
             "model.pretrain_steps": 0, **({"limit_train": limit_train} if limit_train is not None else {})},
            rehearsal,
        )
        procs[name] = start_fit(cfg, folder / "fit.log")
    codes = wait_all(procs, time.time() + 300)
    out = {}
    for name in MODELS:
        if codes[name] != 0 or not files[name].is_file():
            tail = (RUNS / "measure" / name / "fit.log").read_text()[-3000:]
            raise RuntimeError(f"measuring {name} failed (exit {codes[name]}):\n{tail}")
        out[name] = json.loads(files[name].read_text())
        log(f"{name}: {out[name]['seconds_per_step'] * 1000:.1f} ms per step, {out[name]['train_batches_per_epoch']} steps per epoch")
    return out


def plan(timing: dict[str, dict[str, Any]], seconds: float, scratch_epochs: int, starts: dict[str, str], max_epochs: int) -> dict[str, dict[str, Any]]:
    """Epochs per model that fit ``seconds`` (validation every 5 epochs and checkpointing counted
    as 8% on top of the training steps; the test run at the end of fit, 10,000 images at 30
    forward steps without a backward, as a third of an epoch), and where each starts."""
    plans = {}
    for name, t in timing.items():
        epoch_s = t["seconds_per_step"] * t["train_batches_per_epoch"] * 1.08
        epochs = max(1, min(max_epochs, int((seconds - epoch_s / 3) // epoch_s)))
        if name in starts:
            start = starts[name]
        elif epochs >= scratch_epochs:
            start = "scratch"
        else:
            start = str(REPO / "checkpoints" / f"{name}_cifar10.safetensors")
        plans[name] = {"epochs": epochs, "epoch_seconds_estimate": epoch_s, "start": start}
    return plans


def train(plans: dict[str, dict[str, Any]], deadline: float, rehearsal: bool, limit_train: int | None) -> dict[str, int | None]:
    procs = {}
    for name, p in plans.items():
        overrides: dict[str, Any] = {"trainer.max_epochs": p["epochs"]}
        if limit_train is not None:
            overrides["limit_train"] = limit_train
        if p["start"] != "scratch":  # a warm restart: no unrolled warm-up, a short lr warm-up
            overrides.update({"model.init_weights": p["start"], "model.pretrain_steps": 0, "model.warmup_steps": 50})
        elif name == "mdeq_tiny":  # the unrolled warm-up: at most a tenth of the run
            overrides["model.pretrain_steps"] = min(400, p["epochs"] * p["steps_per_epoch"] // 10)
        cfg = derived_config(name, RUNS / name, overrides, rehearsal)
        procs[name] = start_fit(cfg, RUNS / f"{name}.log")
        log(f"{name}: training {p['epochs']} epochs from {p['start']}")
    return wait_all(procs, deadline)


def collect(name: str, out: Path) -> Path | None:
    """Copy a model's final checkpoint, log, metrics and config to ``out`` (first, so that they
    come back even if the evaluation runs past the call's limit); returns the checkpoint."""
    log_file = RUNS / f"{name}.log"
    if log_file.is_file():
        (out / f"{name}.log").write_text(log_file.read_text(errors="replace").replace("\r", "\n")[-20000:])
    metrics = sorted((RUNS / name).rglob("metrics.csv"))
    if metrics:
        shutil.copy(metrics[-1], out / f"{name}-metrics.csv")
    if (RUNS / name / f"{name}.yaml").is_file():
        shutil.copy(RUNS / name / f"{name}.yaml", out / f"{name}-config.yaml")
    finals = sorted((RUNS / name).rglob("final-*.ckpt"), key=lambda p: int(p.stem.split("=")[-1]))
    if not finals:
        return None
    shutil.copy(finals[-1], out / f"{name}-final.ckpt")
    return finals[-1]


def test_final(name: str, ckpt: Path, rehearsal: bool) -> tuple[dict[str, Any], Any, Any]:
    """Full-test-split accuracy of the final weights at the shipped budget: (result, model, metrics)."""
    import torch

    import zoo
    from mdeq.core.budget import SolverBudget
    from mdeq.evaluation import evaluate
    from mdeq.lightning.classification import load_backbone_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_backbone_weights(zoo.create(name), str(ckpt)).to(device)
    card = json.loads((REPO / "checkpoints" / f"{name}_cifar10.json").read_text())["solver"]
    t = time.time()
    m = evaluate(model, "cifar10", SolverBudget(card["max_steps"], card["tol"]), root=DATA, limit=200 if rehearsal else None, batch_size=1000)
    result: dict[str, Any] = {
        "checkpoint": ckpt.name, "test_accuracy": m.accuracy, "test_top5": m.top5, "num_test_samples": m.num_samples,
        "converged_fraction": m.converged_fraction, "mean_forward_nfe": m.nfe, "budget": [card["max_steps"], card["tol"]],
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "test_seconds": round(time.time() - t, 1),
    }
    log(f"{name}: test accuracy {m.accuracy:.2%} on {m.num_samples} images, converged {m.converged_fraction:.1%}")
    return result, model, m


def check_final(name: str, result: dict[str, Any], model: Any, metrics: Any, rehearsal: bool) -> None:
    """The equilibrium check at growing budgets from the shipped one (its first row is ``metrics``)."""
    from mdeq.equilibrium_check import default_budgets, equilibrium_check

    steps, tol = result["budget"]
    t = time.time()
    budgets = default_budgets(model, max_steps=steps, tol=tol)
    result["equilibrium_check"] = equilibrium_check(
        model, "cifar10", root=DATA, limit=200 if rehearsal else None, budgets=budgets, batch_size=1000, first_metrics=metrics
    )
    result["check_seconds"] = round(time.time() - t, 1)
    log(f"{name}: {result['equilibrium_check']['summary']}")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    deadline = t0 + args.budget
    out = Path(os.environ.get("OUT", "/tmp/mdeq_out"))
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"budget_s": args.budget, "reserve_s": args.reserve, "phases": {}}

    def save() -> None:
        (out / "lease.json").write_text(json.dumps(record, indent=1, default=str))

    sys.path[:0] = [str(SITE), str(REPO)]  # the carried wheels and this checkout, for the evaluation
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        log("no GPU here: pass --allow-cpu (with --rehearsal) to rehearse on a CPU")
        return 2
    record["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    starts = dict(s.split("=", 1) for s in args.start)
    unknown = set(starts) - set(MODELS)
    if unknown:
        log(f"--start names unknown models {sorted(unknown)}; choose from {MODELS}")
        return 2
    shutil.rmtree(RUNS, ignore_errors=True)
    timing = measure(args.rehearsal, tuple(int(v) for v in args.measure_steps.split(":")), args.limit_train)
    record["phases"]["measure_s"] = round(time.time() - t0, 1)
    record["timing"] = timing
    train_seconds = deadline - time.time() - args.reserve - args.startup
    plans = plan(timing, train_seconds, args.scratch_epochs, starts, args.max_epochs)
    for name in plans:
        plans[name]["steps_per_epoch"] = timing[name]["train_batches_per_epoch"]
    record["plan"] = plans
    save()
    t1 = time.time()
    codes = train(plans, deadline - args.reserve, args.rehearsal, args.limit_train)
    record["phases"]["train_s"] = round(time.time() - t1, 1)
    record["exit_codes"] = codes
    save()
    t2 = time.time()
    ckpts = {name: collect(name, out) for name in MODELS}
    tested: dict[str, tuple[dict[str, Any], Any, Any]] = {}
    for name, ckpt in ckpts.items():  # both test accuracies first, then both equilibrium checks
        result: dict[str, Any] = {"error": "no final-{epoch}.ckpt written"}
        if ckpt is not None:
            try:
                tested[name] = test_final(name, ckpt, args.rehearsal)
                result = tested[name][0]
            except Exception as exc:  # one model's failure must not lose the other's results
                result = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{name}: evaluation failed: {result['error']}")
        (out / f"{name}-result.json").write_text(json.dumps(result, indent=1, default=str))
    for name, (result, model, metrics) in tested.items():
        if time.time() > deadline:
            log("no time left for the equilibrium checks (run them here on the returned checkpoints)")
            break
        try:
            check_final(name, result, model, metrics, args.rehearsal)
        except Exception as exc:
            result["equilibrium_check_error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name}: equilibrium check failed: {result['equilibrium_check_error']}")
        (out / f"{name}-result.json").write_text(json.dumps(result, indent=1, default=str))
    record["phases"]["evaluate_s"] = round(time.time() - t2, 1)
    record["total_s"] = round(time.time() - t0, 1)
    save()
    log(f"done in {record['total_s']} s of {args.budget}; results in {out}")
    return 0 if all(c == 0 for c in codes.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="install carried wheels, unpack carried shards")
    p.add_argument("--shards", nargs="*", type=Path, default=None, help="default: .carry/cifar10.*.pack")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    r = sub.add_parser("run", help="measure, size, train both models, evaluate; results under $OUT")
    r.add_argument("--budget", type=float, default=520, help="seconds from now until everything is written")
    r.add_argument("--reserve", type=float, default=60, help="seconds kept for the final evaluation")
    r.add_argument("--startup", type=float, default=25, help="seconds a training process needs before its first step")
    r.add_argument("--scratch-epochs", type=int, default=30, help="train from scratch when at least this many epochs fit")
    r.add_argument("--max-epochs", type=int, default=60)
    r.add_argument("--start", action="append", default=[], metavar="NAME=FILE", help="continue NAME from FILE (weights)")
    r.add_argument("--measure-steps", default="15:45", help="time the steps between these two")
    r.add_argument("--allow-cpu", action="store_true")
    r.add_argument("--rehearsal", action="store_true", help="tiny subset, small batches, float32 (a CPU rehearsal)")
    r.add_argument("--limit-train", type=int, default=None, help="(rehearsal) training images")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        shards = args.shards if args.shards is not None else sorted((REPO / ".carry").glob("cifar10.*.pack"))
        prepare(shards, args.wheels)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
