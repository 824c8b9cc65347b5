"""Integrity checks that cannot be switched off: a card that cannot verify its file, weights of the
wrong dtype or with NaN, init_weights that changed, card solver settings out of bounds, and an
MDEQ_CHECKPOINTS folder that is not what it claims. Each is a refusal naming the file and field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import zoo
from zoo.weights import WeightsError, save_weights, sha256_of

SMALL = {"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16}


@pytest.fixture
def private_zoo(shipped_copy):
    """(weights, card) of a private copy of mdeq_digits under MDEQ_CHECKPOINTS."""
    return shipped_copy, shipped_copy.with_suffix(".json")


def _edit_card(card_path: Path, **changes) -> None:
    card = json.loads(card_path.read_text())
    for key, value in changes.items():
        if value is KeyError:
            card.pop(key, None)
        else:
            card[key] = value
    card_path.write_text(json.dumps(card))


@pytest.mark.parametrize("sha", [KeyError, None, "", "abc", 12, "G" * 64], ids=["deleted", "null", "empty", "short", "number", "not-hex"])
def test_a_card_that_cannot_verify_its_file_is_refused(private_zoo, sha):
    _, card = private_zoo
    _edit_card(card, sha256=sha)
    with pytest.raises(WeightsError, match=r"mdeq_digits\.json: (missing field 'sha256'|field 'sha256' must be)"):
        zoo.create("mdeq_digits", pretrained=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"test_accuracy": 0.9}, r"unknown field\(s\) 'test_accuracy'"),
        ({"metrics": KeyError}, r"missing field 'metrics'"),
        ({"schema_version": 0}, r"field 'schema_version' must be 1"),
        ({"schema_version": KeyError}, r"field 'schema_version' must be 1"),
        ({"num_params": "43082"}, r"field 'num_params' must be an integer"),
        ({"license": None}, r"field 'license' must be a string"),
        ({"task": "mnist"}, r"field 'task' is 'mnist', but the zoo registers 'mdeq_digits' with 'digits'"),
        ({"name": "other"}, r"field 'name' is 'other'"),
    ],
    ids=["unknown", "missing", "old-schema", "no-schema", "mistyped", "null-license", "other-task", "other-name"],
)
def test_a_card_that_is_not_a_valid_model_card_is_refused_by_field(private_zoo, changes, message):
    _, card = private_zoo
    _edit_card(card, **changes)
    with pytest.raises(WeightsError, match=rf"mdeq_digits\.json: {message}"):
        zoo.create("mdeq_digits", pretrained=True)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("metrics", "test_accuracy"), "98%", r"field 'metrics\.test_accuracy' must be a number"),
        (("metrics", "surprise"), 1, r"unknown field\(s\) 'metrics\.surprise'"),
        (("preprocessing", "input_shape"), [1, "8", 8], r"field 'preprocessing\.input_shape\[1\]' must be an integer"),
        (("equilibrium_check", "rows"), [{"max_steps": 30}], r"missing field 'equilibrium_check\.rows\[0\]\.tol'"),
        (("solver", "options"), [1], r"field 'solver\.options' must be an object"),
    ],
)
def test_nested_card_fields_are_checked_by_path(private_zoo, path, value, message):
    _, card = private_zoo
    data = json.loads(card.read_text())
    data[path[0]][path[1]] = value
    card.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=message):
        zoo.card("mdeq_digits")


def test_a_card_round_trips_through_its_type(private_zoo):
    from zoo.card import ModelCard, read_card, write_card

    _, card = private_zoo
    typed = read_card(card)
    write_card(card, typed)
    assert read_card(card) == typed and ModelCard.from_dict(typed.to_dict()) == typed
    assert json.loads(card.read_text()) == typed.to_dict()


def test_an_empty_card_is_refused(private_zoo):
    _, card = private_zoo
    for text in ("{}", "[]", "null"):
        card.write_text(text)
        with pytest.raises(WeightsError, match=r"mdeq_digits\.json"):
            zoo.create("mdeq_digits", pretrained=True)


def _rewrite_weights(weights: Path, card: Path, change) -> None:
    """Replace the weights by changed ones and give the card their true hash (a consistent pair)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    _edit_card(card, sha256=sha256_of(weights))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32, torch.bool])
def test_weights_of_another_dtype_are_refused_not_cast(private_zoo, dtype):
    weights, card = private_zoo
    key = next(k for k in zoo.create("mdeq_digits").state_dict() if k.endswith("weight"))
    _rewrite_weights(weights, card, lambda t: t.__setitem__(key, t[key].to(dtype)))
    with pytest.raises(WeightsError, match=rf"mdeq_digits\.safetensors: tensor '{key}' is {dtype}"):
        zoo.create("mdeq_digits", pretrained=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused(private_zoo, bad):
    weights, card = private_zoo
    key = next(k for k in zoo.create("mdeq_digits").state_dict() if k.endswith("weight"))
    _rewrite_weights(weights, card, lambda t: t[key].view(-1).__setitem__(0, bad))
    with pytest.raises(WeightsError, match=rf"tensor '{key}' holds 1 NaN/Inf"):
        zoo.create("mdeq_digits", pretrained=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_steps", 10**9), ("max_steps", 0), ("max_steps", 2.5), ("tol", -1.0), ("tol", 0.0), ("tol", 1e9), ("tol", "0.1"),
     ("stop_mode", "never"), ("solver", "anderzon"), ("solver", {"name": "exec"})],
)
def test_card_solver_settings_out_of_bounds_are_refused(private_zoo, field, value):
    _, card = private_zoo
    _edit_card(card, architecture_kwargs={field: value})
    with pytest.raises(WeightsError, match=rf"mdeq_digits\.json: field 'architecture_kwargs\.{field}' must"):
        zoo.create("mdeq_digits", pretrained=True)


def test_card_num_classes_must_be_a_positive_integer(private_zoo):
    _, card = private_zoo
    _edit_card(card, num_classes="10")
    with pytest.raises(WeightsError, match="field 'num_classes'"):
        zoo.create("mdeq_digits", pretrained=True)


def test_mdeq_checkpoints_never_falls_back_silently(tmp_path, monkeypatch, private_zoo):
    weights, _ = private_zoo
    weights.unlink()
    os.symlink(tmp_path / "nowhere.safetensors", weights)  # a broken link in the file's place
    with pytest.raises(WeightsError, match="is a broken link"):
        zoo.create("mdeq_digits", pretrained=True)
    weights.unlink()
    weights.mkdir()
    with pytest.raises(WeightsError, match="is a directory"):
        zoo.create("mdeq_digits", pretrained=True)
    monkeypatch.setenv("MDEQ_CHECKPOINTS", str(tmp_path / "missing-folder"))
    with pytest.raises(WeightsError, match="MDEQ_CHECKPOINTS=.*missing-folder is not a directory"):
        zoo.create("mdeq_digits", pretrained=True)
    monkeypatch.setenv("MDEQ_CHECKPOINTS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()  # a folder that overrides no model: the shipped file is used
    assert zoo.create("mdeq_digits", pretrained=True) is not None


def test_init_weights_are_checked_against_their_card_and_a_given_hash(tmp_path):
    from mdeq.lightning import ClassificationModule
    from mdeq.lightning.classification import build_backbone

    start = tmp_path / "start.safetensors"
    sha = save_weights(zoo.create("mdeq_digits", **SMALL), start)
    import dataclasses

    from zoo.card import write_card

    write_card(tmp_path / "start.json", dataclasses.replace(zoo.card("mdeq_digits"), name="start", weights_file=start.name, sha256=sha))
    build_backbone("mdeq_digits", SMALL, init_weights=str(start))  # matches its card
    build_backbone("mdeq_digits", SMALL, init_weights=str(start), init_weights_sha256=sha)
    with pytest.raises(WeightsError, match="init_weights_sha256"):
        build_backbone("mdeq_digits", SMALL, init_weights=str(start), init_weights_sha256="0" * 64)
    data = bytearray(start.read_bytes())
    data[-1] ^= 0x01  # one changed bit in the file a card vouches for
    start.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"SHA-256 mismatch with the card .*start\.json"):
        ClassificationModule(backbone="mdeq_digits", backbone_kwargs=SMALL, init_weights=str(start))
    with pytest.raises(ValueError, match="no init_weights was given"):
        build_backbone("mdeq_digits", SMALL, init_weights_sha256=sha)

    nan = tmp_path / "nan.safetensors"  # no card, no hash: still checked for dtypes and values
    model = zoo.create("mdeq_digits", **SMALL)
    key = next(k for k in model.state_dict() if k.endswith("weight"))
    with torch.no_grad():
        model.state_dict()[key].view(-1)[0] = float("nan")
    save_weights(model, nan)
    with pytest.raises(WeightsError, match=rf"init_weights .*nan\.safetensors: tensor '{key}' holds 1 NaN"):
        build_backbone("mdeq_digits", SMALL, init_weights=str(nan))
