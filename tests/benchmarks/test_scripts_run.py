"""The benchmark scripts stay runnable: a GPU session is short, and a script broken by a library
change would waste it. Every script's --help runs (imports and arguments); the GPU-path script
runs its parts on CPU with tiny sizes (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    proc = _run(script, "--help")
    if proc.returncode != 0 and "TorchDEQ is needed" in proc.stderr + proc.stdout:
        pytest.skip("TorchDEQ (the peer) is not installed: pip install -e '.[bench]'")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


@pytest.mark.slow
def test_gpu_path_parts_run_on_cpu() -> None:
    proc = _run("gpu_path.py", "--device", "cpu", "--batch", "2", "--steps", "1", "--blocks", "1", "--repeats", "1",
                "--graph-steps", "3", "--parts", "syncs", "precision", "graphs", "inference", "epoch", "--compile-modes", "default")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed" not in proc.stdout, proc.stdout
    for title in ("Host synchronisations", "Precision", "CUDA graphs", "inference", "training throughput"):
        assert title in proc.stdout, title
