"""The README's first command, as a newcomer runs it: its output is progress, the result line and
where the W&B run went, with no warning; and (slow) the full run prints the accuracy the README states."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = ["fit", "--config", "configs/digits/mdeq_digits.yaml"]
NOISE = re.compile(r"warn|deprecat|wandb:|Tip:", re.IGNORECASE)


def run_main_job(tmp_path: Path, *overrides: str, timeout: int) -> str:
    """Run ``mdeq fit`` on the main job's config in a fresh folder, as from a fresh clone with no
    W&B key; return stdout + stderr without the progress-bar redraws."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTHONWARNINGS"))}
    env["HOME"] = str(tmp_path)  # no ~/.netrc key, no wandb settings of this machine
    config = str(REPO / "configs/digits/mdeq_digits.yaml")
    cmd = [sys.executable, "-m", "mdeq.cli", *MAIN_JOB[:1], "--config", config, *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = [ln for chunk in out.splitlines() for ln in chunk.split("\r")]
    return "\n".join(ln for ln in lines if ln.strip() and not re.match(r"\s*(Epoch \d|Sanity|Validation|Testing|Training|\x1b)", ln))


def test_the_main_job_prints_no_warning(tmp_path):
    out = run_main_job(
        tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "2", "--trainer.log_every_n_steps", "1", timeout=600,
    )
    noisy = [ln for ln in out.splitlines() if NOISE.search(ln) and not ln.startswith("W&B (offline")]
    assert not noisy, "\n".join(noisy)
    assert re.search(r"^RESULT: test accuracy \d+\.\d\d%", out, re.MULTILINE), out
    assert re.search(r"^W&B \(offline, no API key\): run saved in runs/digits/mdeq_digits/wandb/offline-run-\S+; upload it with `wandb sync ", out, re.MULTILINE), out
    assert list((tmp_path / "runs/digits/mdeq_digits/wandb").glob("offline-run-*/run-*.wandb"))


def readme_claim() -> float:
    text = (REPO / "README.md").read_text()
    found = re.search(r"`RESULT: test accuracy (\d+\.\d+)%", text)
    assert found, "the README states the main job's result line"
    return float(found.group(1))


@pytest.mark.slow
def test_the_full_main_job_gives_the_readme_accuracy_quietly(tmp_path):
    out = run_main_job(tmp_path, timeout=1800)
    noisy = [ln for ln in out.splitlines() if NOISE.search(ln) and not ln.startswith("W&B (offline")]
    assert not noisy, "\n".join(noisy)
    got = float(re.search(r"^RESULT: test accuracy (\d+\.\d+)%", out, re.MULTILINE).group(1))
    assert abs(got - readme_claim()) < 0.6, (got, readme_claim())  # 0.6 points: 2 of the 360 test images
