"""The CLI warns when a run asks the CPU for a low precision it only emulates (about 12x slower)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import mdeq.lightning.precision as precision
from mdeq.cli import main
from mdeq.lightning.precision import SlowPrecisionWarning, check_cpu_precision, cpu_supports_natively, slow_cpu_precision_message
from tests.lightning.conftest import REPO


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true"])
def test_emulated_low_precision_on_cpu_is_named_with_its_fix(name):
    msg = slow_cpu_precision_message(name, on_cpu=True, native=False)
    assert msg is not None
    assert f"trainer.precision={name}" in msg and "--trainer.precision 32-true" in msg
    assert ("bfloat16" if name.startswith("bf16") else "float16") in msg


@pytest.mark.parametrize(
    ("name", "on_cpu", "native"),
    [("bf16-mixed", True, True), ("bf16-mixed", False, False), ("16-mixed", False, False), ("32-true", True, False), ("64-true", True, False), ("32", True, False)],
)
def test_no_message_for_native_low_precision_full_precision_or_accelerators(name, on_cpu, native):
    assert slow_cpu_precision_message(name, on_cpu=on_cpu, native=native) is None


def test_probe_agrees_with_the_cpu_flags():
    """Native bf16 (AVX-512 BF16 or AMX) is reported as native; an AVX2-only core is not."""
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform != "linux" or not cpuinfo.is_file():
        pytest.skip("reads /proc/cpuinfo (Linux only)")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), []))
    if not flags:
        pytest.skip("/proc/cpuinfo lists no flags")
    if {"avx512_bf16", "amx_bf16"} & flags:
        assert cpu_supports_natively(torch.bfloat16)
    elif "avx512f" not in flags:
        assert not cpu_supports_natively(torch.bfloat16)
        assert not cpu_supports_natively(torch.float16)
    assert cpu_supports_natively(torch.float32)


def _trainer(name: str) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", precision=name, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_trainer_check_warns_on_global_zero_only(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_natively", lambda dtype: False)
    trainer = _trainer("bf16-mixed")
    with pytest.warns(SlowPrecisionWarning, match="bf16-mixed"):
        assert check_cpu_precision(trainer) is not None

    monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self: False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        assert check_cpu_precision(trainer) is not None  # the same finding, but only rank 0 says it

    monkeypatch.setattr(precision, "cpu_supports_natively", lambda dtype: True)
    monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self: True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        assert check_cpu_precision(trainer) is None
        assert check_cpu_precision(_trainer("32-true")) is None


@pytest.mark.parametrize("native", [False, True])
def test_cli_fit_warns_before_training_on_emulated_bf16(monkeypatch, tmp_path, native):
    monkeypatch.setattr(precision, "cpu_supports_natively", lambda dtype: native)
    args = [
        "fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.fast_dev_run", "1",
        "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed",
        "--trainer.default_root_dir", str(tmp_path),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    slow = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]
    assert len(slow) == (0 if native else 1)
    if slow:
        assert "--trainer.precision 32-true" in str(slow[0].message)
