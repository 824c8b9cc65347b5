"""Fixtures shared by the zoo tests."""

from __future__ import annotations

import shutil

import pytest

import zoo
from zoo.weights import checkpoint_dirs


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """A private copy of mdeq_digits' shipped weights and card under MDEQ_CHECKPOINTS, which
    tests may damage; returns the weights file (the card is beside it, ``.json``)."""
    src = zoo.entry("mdeq_digits").weights_path()
    for f in (src, src.with_suffix(".json")):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setenv("MDEQ_CHECKPOINTS", str(tmp_path))
    assert checkpoint_dirs()[0] == tmp_path
    return tmp_path / src.name
