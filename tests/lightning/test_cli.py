"""The mdeq command: every shipped config parses and runs a batch; help; typos; offline W&B."""

from __future__ import annotations

import glob
import re
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mdeq.cli import available_configs, main
from mdeq.core.stability import StabilityWarning
from mdeq.lightning.precision import SlowPrecisionWarning, slow_cpu_precision_message
from tests.lightning.conftest import REPO
from tests.lightning.shipped_configs import CONFIGS, config_id, runnable

def test_every_task_has_a_config():
    tasks = {Path(c).parent.name for c in CONFIGS}
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "toy"} <= tasks
    assert len(available_configs()) == len(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_config_runs_one_batch(config, tmp_path):
    args = ["fit", *runnable(config, tmp_path), "--trainer.fast_dev_run", "1", "--trainer.logger", "false"]
    precision = str(yaml.safe_load(Path(config).read_text())["trainer"].get("precision", "32-true"))
    slow_here = slow_cpu_precision_message(precision, on_cpu=True) is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    ours = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]
    assert len(ours) == int(slow_here)  # a bf16 config on a CPU that emulates bf16 says so, once
    # A shipped config's first batch is quiet: its guard reports convergence. Two kinds may remain:
    # a StabilityWarning where this batch's equilibrium really repels iteration (the later stages
    # start from shipped CIFAR weights, whose spectral radius at z* is about 1.1 on noise images;
    # it is said once per layer), and deprecation notices of Lightning's own dependencies.
    expected = (SlowPrecisionWarning, StabilityWarning, DeprecationWarning)
    others = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, expected)]
    assert not others, others
    assert len([w for w in caught if issubclass(w.category, StabilityWarning)]) <= 1


def test_help_lists_tasks_and_models(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("configs/digits/mdeq_digits.yaml", "configs/cifar10/mdeq_tiny.yaml", "mdeq_tiny", "conv_deq_small", "anderson"):
        assert needle in out


def test_yaml_typo_is_an_error_not_ignored(tmp_path):
    cfg = yaml.safe_load((REPO / "configs/digits/mdeq_digits.yaml").read_text())
    cfg["model"]["init_args"]["learning_rate"] = 0.1  # should be lr
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "mdeq.cli", "fit", "--config", str(path), "--trainer.fast_dev_run", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr


@pytest.mark.filterwarnings("ignore::mdeq.core.errors.ConvergenceWarning")  # 3 training steps from random weights
def test_offline_wandb_run_holds_the_logged_metrics(tmp_path, capfd):
    args = [
        "fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"),
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "1", "--model.init_args.backbone_kwargs", '{"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2}',
    ]
    assert main(args) == 0
    assert "anonymous setting has no effect" not in capfd.readouterr().err  # no spurious wandb warning
    runs = glob.glob("runs/digits/mdeq_digits/wandb/offline-run-*/run-*.wandb")
    assert len(runs) == 1, runs
    data = Path(runs[0]).read_bytes()
    for key in (b"train/loss", b"train/nfe", b"train/residual_mean", b"train/backward_nfe", b"val/acc", b"val/converged_fraction", b"mdeq_digits", b"residual_trace"):
        assert key in data, key
    # reproducible and comparable from W&B alone: the whole resolved config, a derived name, group
    # and tags, the tested checkpoint as a model artifact, per-class test accuracy as a table
    for key in (b"gradient_clip_val", b"limit_val_batches", b"ClassificationModule", b"DigitsDataModule", b"mdeq_digits-seed0", b"digits/mdeq_digits",
                b"anderson", b"test/per_class_accuracy", b"test/acc_class/7", b"digits-mdeq_digits-mdeq_digits-seed0", b"best-epoch"):
        assert key in data, key


def test_export_writes_verified_weights_and_a_card_from_a_trained_checkpoint(tmp_path):
    import json

    import torch

    import zoo
    from zoo.export import export_checkpoint
    from zoo.weights import load_weights, sha256_of

    small = {"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2, "backward": {"name": "phantom", "steps": 1}}
    args = [
        "fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--trainer.logger", "false",
        "--model.init_args.backbone_kwargs", json.dumps(small),
    ]
    assert main(args) == 0
    ckpt = glob.glob("runs/digits/mdeq_digits/**/last.ckpt", recursive=True)
    assert len(ckpt) == 1, ckpt
    out = tmp_path / "zoo_out"
    (tmp_path / "configs/digits").mkdir(parents=True)  # the card cites the config by the path given
    (tmp_path / "configs/digits/mdeq_digits.yaml").write_text((REPO / "configs/digits/mdeq_digits.yaml").read_text())
    (tmp_path / "c.yaml").write_text("# the config of the continued run\n")
    assert main([
        "export", "--checkpoint", ckpt[0], "--name", "tiny_digits", "--task", "digits",
        "--config", "configs/digits/mdeq_digits.yaml", "--out-dir", str(out),
        "--note", "selection=the last checkpoint", "--note", 'reference={"accuracy": 0.98}',
        "--solver-setting", "max_steps=7", "--solver-setting", "tol=0.005",
    ]) == 0
    card = json.loads((out / "tiny_digits.json").read_text())
    assert card["sha256"] == sha256_of(out / "tiny_digits.safetensors")
    assert card["provenance"]["selection"] == "the last checkpoint" and card["reference"] == {"accuracy": 0.98, "source": ""}
    assert card["schema_version"] == 1 and card["license"] == "MIT" and zoo.read_card(out / "tiny_digits.json").name == "tiny_digits"
    # the backward shapes training only: kept out of the architecture, recorded under training
    assert "backward" not in card["architecture_kwargs"] and card["architecture_kwargs"]["channels"] == [8, 8]
    assert card["provenance"]["training"]["backbone_kwargs"] == {"backward": {"name": "phantom", "steps": 1}}
    # evaluation solver settings replace the architecture's defaults, in the card and in the model
    assert card["architecture_kwargs"]["max_steps"] == 7 and card["solver"]["max_steps"] == 7 and card["solver"]["tol"] == 0.005
    assert card["provenance"]["exported_with"].startswith("mdeq export --checkpoint")
    assert card["provenance"]["measured_with"] == "mdeq test --model tiny_digits"
    # the equilibrium check runs around the shipped budget, on the same test images
    check = card["equilibrium_check"]
    assert [(r["max_steps"], r["tol"]) for r in check["rows"]] == [(7, 0.005), (14, 0.0025), (35, pytest.approx(0.0005))]
    assert check["first_n"] == 360 and check["rows"][0]["accuracy"] == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-6)
    assert 0.0 <= card["metrics"]["test_accuracy"] <= 1.0 and card["metrics"]["num_test_samples"] == 360
    model = load_weights(zoo.create(card["architecture"], **card["architecture_kwargs"]), out / "tiny_digits.safetensors", sha256=card["sha256"])
    state = torch.load(ckpt[0], map_location="cpu", weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[f"backbone.{k}"]), k
    # a run that started from a zoo model's weights (backbone: <zoo model>, pretrained: true) or from
    # a file (init_weights): the card names the architecture and records where training started
    from zoo import registry

    registry._MODELS["digits_alias_for_test"] = registry.ZooEntry("digits_alias_for_test", zoo.entry("mdeq_digits").architecture, "digits", weights="none.safetensors")
    try:
        recorded = {"init_weights": "first.ckpt", "sha256": "ab" * 32}  # kept in the checkpoint by the module: wins over hparams
        for started, kept in (({"pretrained": True}, None), ({"init_weights": "runs/first.ckpt"}, None), ({"init_weights": "first.ckpt"}, recorded)):
            whole = torch.load(ckpt[0], map_location="cpu", weights_only=True)
            whole["hyper_parameters"].update(backbone="digits_alias_for_test", **started)
            if kept is not None:
                whole["mdeq_started_from"] = kept
            torch.save(whole, tmp_path / "continued.ckpt")
            again = export_checkpoint(str(tmp_path / "continued.ckpt"), "continued", "digits", "c.yaml", str(out), overwrite=True)
            assert again.architecture == "mdeq_digits" and again.architecture_kwargs["channels"] == [8, 8]
            expected = kept or ({"zoo_weights": "digits_alias_for_test"} if "pretrained" in started else started)
            assert again.provenance.training["started_from"] == expected
    finally:
        del registry._MODELS["digits_alias_for_test"]
    assert "started_from" not in card["provenance"]["training"]
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", ckpt[0], "--name", "x", "--task", "digits", "--config", "c.yaml", "--note", "no-equals-sign"])
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", ckpt[0], "--name", "x", "--task", "digits", "--config", "c.yaml", "--solver-setting", "channels=[4, 4]"])

    with pytest.raises(ValueError, match=r"unknown solver setting\(s\) \['lr'\]"):
        export_checkpoint(ckpt[0], "x", "digits", "c.yaml", str(out), solver_settings={"lr": 1.0})



def test_export_refuses_paths_hidden_names_overwrites_and_missing_configs(tmp_path, capsys):
    from zoo.export import export_checkpoint

    out = tmp_path / "zoo_out"
    out.mkdir()
    (out / "taken.safetensors").write_bytes(b"weights someone shipped")
    (tmp_path / "c.yaml").write_text("# a config\n")
    base = ["export", "--checkpoint", "any.ckpt", "--task", "digits", "--out-dir", str(out)]
    for name, why in (("../x", "invalid model name"), (str(tmp_path / "abs"), "invalid model name"), ("", "invalid model name"),
                      (".hidden", "invalid model name"), ("a/b", "invalid model name"), ("taken", "already exist")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--name", name, "--config", "c.yaml"])
        assert exit_info.value.code == 2 and why in capsys.readouterr().err, name
    with pytest.raises(SystemExit):
        main([*base, "--name", "fine", "--config", "missing.yaml"])
    assert "missing.yaml: no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="invalid model name"):
        export_checkpoint("any.ckpt", "../../escape", "digits", "c.yaml", str(out))
    with pytest.raises(FileExistsError, match="--force"):
        export_checkpoint("any.ckpt", "taken", "digits", "c.yaml", str(out))
    with pytest.raises(FileNotFoundError, match="missing.yaml not found"):
        export_checkpoint("any.ckpt", "fine", "digits", "missing.yaml", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["taken.safetensors"] and not (tmp_path / "x.json").exists()
    assert (out / "taken.safetensors").read_bytes() == b"weights someone shipped"


def test_zoo_test_refuses_a_model_task_mismatch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--model", "mdeq_digits", "--data", "mnist"])
    assert exit_info.value.code == 2
    assert "mdeq_digits was trained for the task 'digits', not 'mnist'" in capsys.readouterr().err


def test_resume_message_is_printed_by_global_rank_zero_only(tmp_path, capsys):
    """Under DDP every process checks the resume checkpoint; only rank 0 says the start file is gone."""
    from types import SimpleNamespace

    from mdeq.lightning.cli import require_resume_checkpoint

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"")
    cb = SimpleNamespace(dirpath=str(tmp_path), CHECKPOINT_NAME_LAST="last", FILE_EXTENSION=".ckpt")
    for is_global_zero, printed in ((True, True), (False, False)):
        trainer = SimpleNamespace(checkpoint_callbacks=[cb], is_global_zero=is_global_zero)
        require_resume_checkpoint(trainer, "last", "start.safetensors")
        assert ("init_weights start.safetensors is gone" in capsys.readouterr().err) is printed


def test_resume_needs_no_init_weights_file_but_never_falls_back_to_random_weights(tmp_path, capsys):
    """A run started from ``init_weights`` resumes with ``--ckpt_path last`` after that file is
    gone (the checkpoint holds every weight and the recorded start); with no checkpoint either,
    it is an error, not a silent start from random weights."""
    import json

    import torch

    from zoo import create, save_weights, sha256_of

    small = {"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2}
    start = tmp_path / "start.safetensors"
    save_weights(create("mdeq_digits", **small), start)
    digest = sha256_of(start)

    def fit(root: str, *extra: str) -> int:
        return main([
            "fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.logger", "false",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", root, "--model.init_args.backbone_kwargs", json.dumps(small),
            "--model.init_args.init_weights", str(start), *extra,
        ])

    assert fit("first", "--trainer.max_epochs", "1") == 0
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["mdeq_started_from"] == {"init_weights": str(start), "sha256": digest}
    start.unlink()
    capsys.readouterr()
    assert fit("first", "--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    assert f"init_weights {start} is gone; resuming from {last}" in capsys.readouterr().err
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["mdeq_started_from"] == {"init_weights": str(start), "sha256": digest}
    # nothing to resume from: the missing start file is an error, with or without --ckpt_path last
    assert fit("other", "--trainer.max_epochs", "1", "--ckpt_path", "last") == 2
    err = capsys.readouterr().err
    assert "there is no checkpoint to resume from" in err and "is gone; resuming" not in err
    assert fit("other", "--trainer.max_epochs", "1") == 2
    assert "init_weights file not found" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::mdeq.core.errors.ConvergenceWarning")  # 2 training steps, 2 solver steps
def test_explicit_overrides_win_over_the_checkpoints_saved_settings(tmp_path, capsys):
    """With --ckpt_path, Lightning put the checkpoint's hyperparameters over the command line:
    eval_max_steps 2 and 100 measured the same f-evals. What the user writes wins; the checkpoint
    fills in the rest (here backbone_kwargs, which the config file does not set)."""
    small = '{"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2}'
    base = ["--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", *base, "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.limit_test_batches", "1", "--model.init_args.backbone_kwargs", small]) == 0
    ckpt = "runs/digits/mdeq_digits/checkpoints/last.ckpt"
    nfe = {}
    for steps in ("2", "100"):
        capsys.readouterr()
        assert main(["test", *base, "--trainer.limit_test_batches", "1", "--ckpt_path", ckpt, "--model.init_args.eval_max_steps", steps]) == 0
        out = capsys.readouterr().out
        nfe[steps] = float(out.split("test/nfe")[1].split()[0])
    assert nfe["2"] <= 3 and nfe["100"] > 10, nfe


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.min_lr_ratio", "-1"], r"ClassificationModule: min_lr_ratio must be in \[0, 1\]"),
        (["--model.init_args.lr", "0"], "ClassificationModule: lr must be > 0"),
        (["--data.init_args.batch_size", "0"], "DigitsDataModule: batch_size must be >= 1, got 0"),
        (["--trainer.max_epochs", "-1"], "scheduler 'cosine' decays over the run's length, but this run has no end"),
        (["--trainer.limit_train_batches", "-3"], "invalid trainer option: .*limit_train_batches"),
    ],
    ids=["min_lr_ratio", "lr", "batch_size", "endless_cosine", "trainer"],
)
def test_invalid_options_are_one_line_naming_the_option(args, message, capsys):
    """Exit 2 and one line naming the option, not exit 0 with a negative learning rate, an
    OverflowError, or a 60-line traceback whose cause is at its end."""
    import re

    code = main(["fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mdeq: error:")]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), err[-2000:]


def test_invalid_option_from_the_shell_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdeq.cli", "fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"),
                           "--trainer.logger", "false", "--model.init_args.min_lr_ratio", "-1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("mdeq: error: mdeq.lightning.ClassificationModule: min_lr_ratio")


def test_test_and_validate_are_one_command_line(capsys):
    """`mdeq test --help` lists the zoo flags and Lightning's; `--data` defaults to the card's task;
    `mdeq validate --model` says why it has nothing to measure instead of measuring the test split."""
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--data-root", "--max-steps", "--equilibrium-check", "--limit", "--config", "--ckpt_path", "--trainer.accelerator"):
        assert flag in out, flag
    assert main(["test", "--model", "mdeq_digits", "--limit", "40"]) == 0
    assert "RESULT: test accuracy" in capsys.readouterr().out
    assert main(["validate", "--model", "mdeq_digits"]) == 2
    err = capsys.readouterr().err
    assert "has no split to measure" in err and "mdeq test --model NAME" in err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("mdeq: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_num_classes_set_once_and_checked_against_the_data_before_training(tmp_path, capsys):
    base = ["fit", "--config", "digits/mdeq_digits", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    assert main([*base, "--model.init_args.num_classes", "5"]) == 2
    assert "the data (digits) has 10 classes but the model predicts 5" in _one_line_error(capsys)
    assert main([*base, "--model.init_args.backbone_kwargs", "{num_classes: 7}", "--model.init_args.num_classes", "10"]) == 2
    assert "num_classes=10 but the backbone MDEQClassifier predicts 7" in _one_line_error(capsys)
    assert not list(tmp_path.rglob("*.ckpt")), "nothing trained"
    from mdeq.lightning import ClassificationModule

    assert ClassificationModule(backbone="mdeq_digits").num_classes == 10  # from the backbone (its task)
    assert ClassificationModule(backbone="mdeq_digits", num_classes=4).backbone.num_classes == 4  # one place


def test_shipped_configs_by_short_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from mdeq.shipped_configs import resolve_config

    monkeypatch.chdir(tmp_path)
    full = str(REPO / "configs" / "digits" / "mdeq_digits.yaml")
    for name in ("digits/mdeq_digits", "digits/mdeq_digits.yaml", "configs/digits/mdeq_digits.yaml", "mdeq_digits"):
        assert Path(resolve_config(name)).resolve() == Path(full).resolve(), name
    assert main(["fit", "--config", "mdeq_mnist"]) == 2
    assert "in several tasks: fashion_mnist/mdeq_mnist, mnist/mdeq_mnist" in _one_line_error(capsys)
    assert main(["fit", "--config", "mdeq_digitz"]) == 2
    assert "neither a file nor a shipped config" in _one_line_error(capsys)


def test_gpu_accelerator_without_a_gpu_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["fit", "--config", "digits/mdeq_digits", "--trainer.accelerator", "gpu", "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "this machine has no GPU" in _one_line_error(capsys)


def test_wrong_zoo_name_in_fit_is_one_line(tmp_path, capsys):
    assert main(["fit", "--config", "digits/mdeq_digits", "--model.init_args.backbone", "mdeq_digitz", "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "unknown model 'mdeq_digitz'. Did you mean 'mdeq_digits'" in _one_line_error(capsys)


def test_warnings_go_above_the_progress_bar_on_a_terminal(monkeypatch):
    """On a terminal the CLI prints warnings through tqdm.write (whole lines above the bar)."""
    import io
    import warnings

    import tqdm

    from mdeq.lightning.cli import warnings_above_progress_bars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with warnings_above_progress_bars():
            warnings.warn("solver note", UserWarning)
    assert len(written) == 1 and "solver note" in written[0]
    assert warnings.showwarning is before


def test_toy_config_prints_what_it_is_for_and_few_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "toy/deq_toy_regressor", "--trainer.max_epochs", "3", "--trainer.logger", "false"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"test predictions: f\(-5\) = -?\d+\.\d{3} \(target -10\), f\(0\) = .*f\(12\) = ", out), out
    figures = list(tmp_path.glob("runs/toy/deq_toy_regressor/**/*.png"))
    assert len(figures) == 1  # epoch 0 of 3 (every 100th epoch: 5 over the config's 500, not 500)


def test_no_progress_bar_wins_over_a_configs_progress_bar_callback(tmp_path):
    """The GPU recipes list a TQDMProgressBar (its refresh rate); `--trainer.enable_progress_bar
    false` then drops it instead of failing with Lightning's error about the pair."""
    cfg = yaml.safe_load((REPO / "configs/digits/mdeq_digits.yaml").read_text())
    cfg["trainer"].setdefault("callbacks", []).append({"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 50}})
    path = tmp_path / "bar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["fit", "--config", str(path), "--trainer.fast_dev_run", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run")]
    assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
