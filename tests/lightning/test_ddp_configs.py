"""Every shipped config trains, validates, checkpoints and tests under 2-process DDP on CPU (gloo).

One pair of processes runs all configs in turn (one process group, one Trainer per config), the
way ``torchrun`` would launch ``mdeq fit``: a collective that only one rank reaches (the cause of
the 30-minute hangs this guards against) shows up as a timeout naming the config it hung in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.lightning.conftest import REPO
from tests.lightning.shipped_configs import CONFIGS, config_id, runnable

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from mdeq.cli import main

    runs = json.load(open(sys.argv[1]))
    for name, args in runs:
        print(f"START {name}", flush=True)
        code = main(args)
        print(f"DONE {name} {code}", flush=True)
        if code != 0:
            sys.exit(code)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    """
)

STEPS = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]
TIMEOUT_S = 600


def test_every_shipped_config_runs_under_two_process_ddp(tmp_path):
    import yaml

    from mdeq.lightning.precision import slow_cpu_precision_message

    runs = []
    for config in CONFIGS:
        name = config_id(config)
        folder = tmp_path / name.replace("/", "_")
        args = ["fit", *runnable(config, folder, batch_size=2), *STEPS, "--trainer.strategy", "ddp",
                "--trainer.devices", "2", "--trainer.default_root_dir", str(folder / "run")]
        precision = str(yaml.safe_load(Path(config).read_text())["trainer"].get("precision", "32-true"))
        if slow_cpu_precision_message(precision, on_cpu=True) is not None:
            # a CPU that emulates bf16 runs those configs 12x slower; what is under test here is DDP
            # (each config's own precision runs in test_cli's one-batch test)
            args += ["--trainer.precision", "32-true"]
        runs.append((name, args))
    plan = tmp_path / "runs.json"
    plan.write_text(json.dumps(runs))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    base = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531",
            "WORLD_SIZE": "2", "NODE_RANK": "0", "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    for rank in (0, 1):
        log = open(tmp_path / f"rank{rank}.log", "w")
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(plan)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    timed_out = any(p.poll() is None for p in procs)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for log in logs:
        log.close()
    texts = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    done = [[line.split()[1] for line in t.splitlines() if line.startswith("DONE ") and line.endswith(" 0")] for t in texts]
    started = [[line.split()[1] for line in t.splitlines() if line.startswith("START ")] for t in texts]
    where = {r: (started[r][-1] if started[r] else None) for r in (0, 1)}
    assert not timed_out, f"DDP run timed out after {TIMEOUT_S} s; ranks were in {where}; rank 0 log tail:\n{texts[0][-3000:]}"
    for r in (0, 1):
        assert procs[r].returncode == 0, f"rank {r} failed in {where[r]}:\n{texts[r][-4000:]}"
        assert done[r] == [name for name, _ in runs], (r, done[r])
    for name, args in runs:  # each run wrote its checkpoints (once, by rank 0) and tested them
        folder = Path(args[args.index("--trainer.default_root_dir") + 1])
        assert (folder / "checkpoints" / "last.ckpt").is_file() or list(folder.rglob("*.ckpt")), name
    assert texts[0].count("RESULT: ") >= len(runs) - 1, texts[0][-2000:]  # the summary line after each fit
    assert "RESULT: " not in texts[1]  # printed by global rank 0 only
