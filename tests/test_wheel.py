"""An installed wheel works like the checkout: built from this tree, installed into a fresh venv,
with ``pip install --target`` and with ``--user``, and used from another folder: the console
script, the shipped configs (by short name) and the shipped weights (package data) are found.

Marked ``wheel`` (outside the default run; CI runs it: ``python -m pytest -m wheel``). The
dependencies are not reinstalled (that is gigabytes): each install sees the test environment's
site-packages through a path entry, never the editable checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[1]
DEPS = sysconfig.get_paths()["purelib"]  # this environment's site-packages (torch, lightning, ...)
CHECK = (
    "import mdeq, zoo, torch; from pathlib import Path; "
    "assert Path(mdeq.__file__).resolve().is_relative_to(Path({root!r}).resolve()), mdeq.__file__; "
    "m = zoo.create('mdeq_digits', pretrained=True); "
    "print('weights', zoo.entry('mdeq_digits').weights_path()); "
    "from mdeq.shipped_configs import resolve_config; print('config', resolve_config('digits/mdeq_digits'))"
)


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(dist)], cwd=dist)
    return next(dist.glob("mdeq-*.whl"))


def test_wheel_holds_configs_and_weights_as_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mdeq/configs/digits/mdeq_digits.yaml" in names
    assert {f"zoo/checkpoints/{p.name}" for p in (REPO / "checkpoints").glob("*.safetensors")} <= set(names)
    assert not [n for n in names if ".data/" in n], "nothing is installed outside the package (sys.prefix data-files)"
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch<3,>=2.5" in meta or "Requires-Dist: torch>=2.5,<3" in meta, "dependencies are ranges, not pins"


def test_fresh_venv_runs_the_main_job_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    (site / "mdeq_test_deps.pth").write_text(DEPS + "\n")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = run([str(py), "-c", CHECK.format(root=str(venv))], cwd=work)
    assert str(venv) in out
    assert run([str(venv / "bin" / "mdeq"), "--version"], cwd=work).strip().startswith("mdeq ")
    # the README's main job, two epochs (the whole job is the README's first command, ~100 s)
    result = run([str(venv / "bin" / "mdeq"), "fit", "--config", "digits/mdeq_digits", "--trainer.max_epochs", "2", "--trainer.logger", "false"], cwd=work, timeout=900)
    assert "RESULT: test accuracy" in result
    assert (work / "runs").is_dir(), "the run's files go to the current folder, not into the installed package"


def test_pip_install_target(wheel, tmp_path):
    target = tmp_path / "target"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], cwd=tmp_path)
    env = {"PYTHONPATH": f"{target}{os.pathsep}{DEPS}"}
    out = run([sys.executable, "-c", CHECK.format(root=str(target))], cwd=tmp_path, env=env)
    assert str(target) in out


def test_pip_install_user(wheel, tmp_path):
    base = Path(sys.base_prefix) / "bin" / "python3"
    if not base.exists():
        pytest.skip(f"no base interpreter at {base}")
    env = {"PYTHONUSERBASE": str(tmp_path / "user"), "PYTHONNOUSERSITE": ""}
    env_run = {**env, "PYTHONPATH": DEPS}
    os.environ.pop("PYTHONNOUSERSITE", None)
    run([str(base), "-m", "pip", "install", "-q", "--user", "--no-deps", "--no-warn-script-location", str(wheel)], cwd=tmp_path, env=env)
    out = run([str(base), "-c", CHECK.format(root=str(tmp_path / "user"))], cwd=tmp_path, env=env_run)
    assert str(tmp_path / "user") in out
