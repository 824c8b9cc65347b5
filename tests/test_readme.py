"""Every Python snippet of the README runs as written (each in a fresh namespace, from a scratch
folder), so the README cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
SLOW = ("export_program",)  # exports a model at its shipped budget (about 30 s)


def _params() -> list:
    out = []
    for i, block in enumerate(BLOCKS):
        marks = [pytest.mark.slow] if any(word in block for word in SLOW) else []
        out.append(pytest.param(block, id=f"block{i}", marks=marks))
    return out


def test_the_readme_has_snippets():
    assert len(BLOCKS) >= 7


@pytest.mark.filterwarnings("ignore::mdeq.ConvergenceWarning")  # the doctor's snippet shows a model that does not converge
@pytest.mark.parametrize("block", _params())
def test_readme_snippet_runs(block, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme_snippet"})
