"""The README's main job (mdeq demo) and the command line."""

from __future__ import annotations

import subprocess
import sys

from mdeq.cli import main
from mdeq.demo import run_demo


def test_demo_reaches_97_percent_on_digits():
    result = run_demo(verbose=False)
    assert result.test_accuracy >= 0.97, result
    assert result.converged_fraction == 1.0


def test_cli_lists_solvers(capsys):
    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    for name in ("fixed_point", "anderson", "broyden", "newton_krylov", "implicit", "phantom", "unrolled"):
        assert name in out


def test_cli_rejects_unknown_solver():
    proc = subprocess.run([sys.executable, "-m", "mdeq.cli", "demo", "--solver", "andersen"], capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid choice: 'andersen'" in proc.stderr


def test_cli_prints_its_version(capsys):
    import mdeq

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mdeq {mdeq.__version__}"
