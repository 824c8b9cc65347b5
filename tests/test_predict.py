"""`mdeq predict`: image files through a zoo model (CSV/JSON, one row per input), and a trained
config's predictions through Lightning (predictions.csv in the run folder)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mdeq.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def digit_files(tmp_path):
    """The first 12 test digits as 8-bit PNGs (0..16 scaled to 0..255), with their labels."""
    from PIL import Image

    from mdeq.data.tasks import get_task

    _, _, x, y = get_task("digits").read()
    paths = []
    for i in range(12):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray((x[i, 0].float() * 255 / 16).round().byte().numpy(), mode="L").save(p)
        paths.append(str(p))
    return paths, [str(int(v)) for v in y[:12]]


def test_predict_image_files_as_csv_and_json(digit_files, tmp_path, capsys):
    paths, labels = digit_files
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", "mdeq_digits", *paths, "--output", str(out), "--top-k", "3"]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["input"] for r in rows] == paths
    assert list(rows[0]) == ["input", "class", "class_index", "probability", "class_2", "probability_2", "class_3", "probability_3", "converged", "residual"]
    assert sum(r["class"] == t for r, t in zip(rows, labels)) >= 11  # the shipped model is 98.9% accurate
    assert all(0 < float(r["probability"]) <= 1 and float(r["probability"]) >= float(r["probability_2"]) for r in rows)
    assert all(r["converged"] == "True" for r in rows)
    js = tmp_path / "preds.json"
    assert main(["predict", "--model", "mdeq_digits", *paths[:2], "--output", str(js)]) == 0
    records = json.loads(js.read_text())
    assert [r["classes"][0] for r in records] == [rows[0]["class"], rows[1]["class"]]
    assert "wrote 2 predictions" in capsys.readouterr().out


def test_predict_agrees_with_the_model_on_the_dataset_tensors(digit_files):
    """The PNG route (timm's transform from the card) gives the classes the model gives on the
    training pipeline's tensors."""
    import zoo
    from mdeq.data.tasks import get_task
    from zoo.predict import load_images, predict

    paths, _ = digit_files
    model = zoo.create("mdeq_digits", pretrained=True)
    preds = predict(model, load_images(paths, model), paths)
    ds = get_task("digits").test_set(limit=12)
    with torch.no_grad():
        direct = model(torch.stack([ds[i][0] for i in range(12)])).argmax(-1).tolist()
    assert [p.class_indices[0] for p in preds] == direct


def test_predict_errors_are_one_line(digit_files, tmp_path, capsys):
    paths, _ = digit_files
    with pytest.raises(SystemExit) as e:
        main(["predict", "--model", "mdeq_digits", str(tmp_path / "missing.png")])
    assert e.value.code == 2 and "cannot read image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--model", "mdeq_digits", paths[0], "--output", str(tmp_path / "x.txt")])
    assert "write .csv or .json" in capsys.readouterr().err
    assert main(["predict", "--model", "mdeq_digitz", paths[0]]) == 2
    assert "unknown model 'mdeq_digitz'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::mdeq.ConvergenceWarning")  # two training steps
def test_lightning_predict_writes_a_row_per_input(tmp_path):
    args = ["--config", "digits/mdeq_digits", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    assert main(["fit", *args, "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]) == 0
    assert main(["predict", *args, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")]) == 0
    rows = list(csv.DictReader((tmp_path / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 360 and [int(r["index"]) for r in rows] == list(range(360))
    assert set(rows[0]) == {"index", "class", "class_index", "probability", "label", "converged", "residual"}


def test_predict_help_shows_both_routes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--model MODEL" in out and "--ckpt_path" in out
