import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_run_dirs(tmp_path, monkeypatch):
    """Runs write under a temporary folder; W&B stays offline; archives unpack to a shared cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("MDEQ_CACHE", os.environ.get("MDEQ_CACHE", str(Path.home() / ".cache" / "mdeq")))


def real_data_root():
    return SHARED_DATA if SHARED_DATA.is_dir() else None
