"""The model card: a typed record of shipped weights, written and read only here.

A card sits beside its weights (``checkpoints/<name>.json`` next to ``<name>.safetensors``) and
carries what timm's pretrained config carries (input size, classes, mean/std, the task), the solver
budget the weights are evaluated with, the weights file and its SHA-256, the measured metrics and
equilibrium check, the license and where the weights came from. :func:`read_card` validates a file
against :class:`ModelCard`: an unknown, missing or mistyped field is a :class:`CardError` naming it.
Free text a trainer wants to keep (hardware, earlier stages) goes in ``provenance.notes``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from zoo.weights import WeightsError

SCHEMA_VERSION = 1
"""The card format this code writes and reads; a card of another version is refused by name."""

DEFAULT_LICENSE = "MIT"
"""The license of weights trained by this project (the project's own)."""


class CardError(WeightsError):
    """A model card that does not match :class:`ModelCard` (the message names the field)."""


@dataclass(frozen=True)
class Preprocessing:
    """How inputs are prepared: divide by ``scale``, subtract ``mean``, divide by ``std`` (per channel)."""

    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float


@dataclass(frozen=True)
class SolverSettings:
    """The forward solve the weights are measured with (the architecture's, after the card's
    ``architecture_kwargs``)."""

    name: str
    options: dict[str, Any]
    tol: float
    max_steps: int
    stop_mode: str


@dataclass(frozen=True)
class TestSlice:
    """Accuracy on the first ``first_n`` test images: what the per-task tests re-measure."""

    first_n: int
    accuracy: float


@dataclass(frozen=True)
class CardMetrics:
    """Test-split results at the card's own solver budget."""

    test_accuracy: float
    test_top5: float
    mean_forward_nfe: float
    residual_mean: float
    converged_fraction: float
    num_test_samples: int
    test_slice: TestSlice | None = None


@dataclass(frozen=True)
class BudgetRow:
    """The model measured at one solver budget."""

    max_steps: int
    tol: float
    accuracy: float
    converged_fraction: float
    residual_mean: float
    mean_forward_nfe: float


@dataclass(frozen=True)
class EquilibriumCheck:
    """Accuracy and residual at growing budgets (:mod:`mdeq.equilibrium_check`)."""

    first_n: int
    rows: tuple[BudgetRow, ...]
    holds: bool
    accuracy_change: float
    summary: str


@dataclass(frozen=True)
class Reference:
    """A published accuracy for this architecture and task, with its source."""

    accuracy: float
    source: str = ""


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from and how they were measured."""

    train_config: str
    train_command: str
    exported_with: str
    measured_with: str
    created: str
    selection: str
    """How the checkpoint was chosen (never by test accuracy)."""
    training: dict[str, Any] = field(default_factory=dict)
    """Epoch, global step, where training started (with that file's SHA-256), training-only options."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Free fields (hardware, earlier stages...)."""


@dataclass(frozen=True)
class ModelCard:
    """Everything known about one shipped model (see the module docstring)."""

    name: str
    architecture: str
    architecture_kwargs: dict[str, Any]
    task: str
    dataset: str
    num_params: int
    num_classes: int
    preprocessing: Preprocessing
    solver: SolverSettings
    metrics: CardMetrics
    weights_file: str
    sha256: str
    provenance: Provenance
    license: str = DEFAULT_LICENSE
    equilibrium_check: EquilibriumCheck | None = None
    reference: Reference | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Any, source: str = "model card") -> "ModelCard":
        """A validated card from parsed JSON; :class:`CardError` names the first bad field."""
        if not isinstance(data, dict):
            raise CardError(f"{source}: a model card is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CardError(f"{source}: field 'schema_version' must be {SCHEMA_VERSION} (this mdeq's card format), got {version!r}")
        return _build(cls, data, source, "")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "dict": "an object"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted: lists to tuples, objects to dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        return _convert(inner[0], value, source, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CardError(f"{source}: field '{path}' must be an object, got {value!r}")
        return _build(tp, value, source, path + ".")
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise CardError(f"{source}: field '{path}' must be a list, got {value!r}")
        return tuple(_convert(item, v, source, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise CardError(f"{source}: field '{path}' must be an object, got {value!r}")
        return value
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise CardError(f"{source}: field '{path}' must be {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: Any, data: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CardError(f"{source}: unknown field(s) {', '.join(repr(prefix + u) for u in unknown)}; a card holds {', '.join(repr(prefix + n) for n in fields)}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CardError(f"{source}: missing field '{prefix}{name}'")
            continue
        values[name] = _convert(hints[name], data[name], source, prefix + name)
    return cls(**values)


def read_card(path: str | Path) -> ModelCard:
    """The validated card in ``path`` (:class:`CardError` for a missing, malformed or mistyped one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CardError(f"model card {path} is missing or not valid JSON: {err}") from err
    return ModelCard.from_dict(data, f"model card {path}")


def write_card(path: str | Path, card: ModelCard) -> None:
    """Write ``card`` to ``path`` (validated by reading it back, so no card is written that cannot be read)."""
    text = json.dumps(card.to_dict(), indent=2) + "\n"
    ModelCard.from_dict(json.loads(text), f"model card {path}")
    Path(path).write_text(text)
    Path(path).chmod(0o644)


__all__ = [
    "SCHEMA_VERSION",
    "BudgetRow",
    "CardError",
    "CardMetrics",
    "EquilibriumCheck",
    "ModelCard",
    "Preprocessing",
    "Provenance",
    "Reference",
    "SolverSettings",
    "TestSlice",
    "read_card",
    "write_card",
]
