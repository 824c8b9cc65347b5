"""tools/gpu/lease.py: the plan fits the time left, the start rule is fixed before the run, and
the whole lease runs on CPU (rehearsal, slow) so that nothing is first tried on the device."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lease = _load("lease")


def timing(ms: float, batches: int = 186) -> dict:
    return {"seconds_per_step": ms / 1000, "train_batches_per_epoch": batches}


def test_the_plan_ends_every_schedule_inside_the_time_left():
    t = {"mdeq_tiny": timing(40), "conv_deq_small": timing(12)}
    plans = lease.plan(t, seconds=400, scratch_epochs=30, starts={}, max_epochs=60)
    for name, p in plans.items():
        epoch = t[name]["seconds_per_step"] * t[name]["train_batches_per_epoch"]
        used = (p["epochs"] + 1 / 3) * epoch * 1.08  # the epochs and the test at the end of fit
        assert used <= 400 < used + epoch * 1.08 or p["epochs"] == 60
    assert plans["mdeq_tiny"]["epochs"] == 49 and plans["conv_deq_small"]["epochs"] == 60  # capped
    assert plans["conv_deq_small"]["start"] == "scratch" and plans["mdeq_tiny"]["start"] == "scratch"


def test_too_little_time_for_a_schedule_from_scratch_means_a_warm_restart_of_the_shipped_weights():
    plans = lease.plan({"mdeq_tiny": timing(100), "conv_deq_small": timing(10)}, seconds=300, scratch_epochs=30, starts={}, max_epochs=60)
    assert plans["mdeq_tiny"]["epochs"] == 14 and plans["mdeq_tiny"]["start"].endswith("checkpoints/mdeq_tiny_cifar10.safetensors")
    assert Path(plans["mdeq_tiny"]["start"]).is_file() and plans["conv_deq_small"]["start"] == "scratch"
    tiny = lease.plan({"mdeq_tiny": timing(5000)}, seconds=10, scratch_epochs=30, starts={}, max_epochs=60)
    assert tiny["mdeq_tiny"]["epochs"] == 1  # at least one epoch, even when nothing fits
    chosen = lease.plan({"mdeq_tiny": timing(10)}, seconds=400, scratch_epochs=30, starts={"mdeq_tiny": "prev.safetensors"}, max_epochs=60)
    assert chosen["mdeq_tiny"]["start"] == "prev.safetensors"  # a second lease continues from the first's weights


def test_run_refuses_a_machine_without_a_gpu_unless_rehearsing(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert lease.main(["run", "--budget", "10"]) == 2
    assert lease.main(["run", "--budget", "10", "--allow-cpu", "--start", "resnet=x"]) == 2


@pytest.mark.slow
def test_the_lease_rehearses_on_cpu_end_to_end(tmp_path):
    """prepare (shards of a small CIFAR-shaped set) then run: measurement, plan, both models
    trained at once, final evaluation with the equilibrium check, everything under $OUT."""
    cp = _load("cifar_pack")
    rng = np.random.default_rng(0)
    for shard, names in cp.SHARDS.items():
        batches = [(n, rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 64).astype(np.uint8)) for n in names]
        cp.pack_shard(batches, tmp_path / f"cifar10.{shard}.pack", preset=1)
    env = dict(os.environ, MDEQ_LEASE_DATA=str(tmp_path / "data"), MDEQ_LEASE_RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"))
    script = str(TOOLS / "lease.py")
    for shard in ("a", "b"):
        subprocess.run([sys.executable, script, "prepare", "--shards", str(tmp_path / f"cifar10.{shard}.pack"), "--wheels", str(tmp_path / "none")],
                       env=env, check=True, timeout=300)
    proc = subprocess.run(
        [sys.executable, script, "run", "--budget", "900", "--reserve", "400", "--startup", "10", "--allow-cpu", "--rehearsal",
         "--limit-train", "128", "--measure-steps", "1:2", "--scratch-epochs", "2", "--max-epochs", "2",
         "--start", f"mdeq_tiny={REPO / 'checkpoints' / 'mdeq_tiny_cifar10.safetensors'}"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    record = json.loads((out / "lease.json").read_text())
    assert set(record["plan"]) == {"mdeq_tiny", "conv_deq_small"} and record["total_s"] <= 900
    assert record["plan"]["conv_deq_small"]["start"] == "scratch" and record["plan"]["mdeq_tiny"]["start"].endswith(".safetensors")
    for name in ("mdeq_tiny", "conv_deq_small"):
        result = json.loads((out / f"{name}-result.json").read_text())
        assert "error" not in result, result
        assert result["num_test_samples"] == 64 and len(result["equilibrium_check"]["rows"]) == 3 and result["budget"][0] == 30
        assert (out / f"{name}-final.ckpt").is_file() and (out / f"{name}-metrics.csv").is_file()
        assert f"final-epoch={record['plan'][name]['epochs'] - 1}.ckpt" == result["checkpoint"]  # the final epoch's weights
