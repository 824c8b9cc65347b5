"""Registry of named models: architectures (random init) and, where weights ship, their cards.

Every architecture is declared once, with its task and its shipped weights
(:func:`register_model`, called in :mod:`zoo.architectures`); the task (:mod:`mdeq.data.tasks`)
gives the input shape, the card (:mod:`zoo.card`) everything measured."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from mdeq.data.tasks import Task, get_task
from zoo.card import CardError, ModelCard, read_card
from zoo.pretrained_cfg import pretrained_cfg
from zoo.weights import WeightsError, check_sha256_field, checkpoint_dirs, find_checkpoint, load_weights

CARD_SOLVER_BOUNDS = {"max_steps": (1, 10_000), "tol": (0.0, 1.0)}
"""What a card may set for the DEQ solve it ships with: ``max_steps`` an integer in [1, 10000],
``tol`` a number in (0, 1], ``stop_mode`` 'rel' or 'abs', ``solver`` a registered solver name."""


@dataclass(frozen=True)
class ZooEntry:
    """A named model: an architecture constructor with fixed keyword arguments, the task whose
    inputs it takes, and for shipped weights their file (in ``checkpoints/``, card beside it)."""

    name: str
    architecture: Callable[..., nn.Module]
    task: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None

    @property
    def task_info(self) -> Task:
        """The :class:`~mdeq.data.tasks.Task` (dataset, preprocessing, input shape, classes)."""
        return get_task(self.task)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input sample's shape, from the task."""
        return self.task_info.input_shape

    @property
    def card_file(self) -> str | None:
        return None if self.weights is None else self.weights.rsplit(".", 1)[0] + ".json"

    def weights_path(self):  # noqa: ANN201
        return None if self.weights is None else find_checkpoint(self.weights)


_MODELS: dict[str, ZooEntry] = {}


class UnknownModelError(ValueError):
    """No model is registered under the requested name (the message lists close matches)."""


def register_model(fn: Callable[..., nn.Module], task: str, pretrained: dict[str, str] | None = None) -> Callable[..., nn.Module]:
    """Declare an architecture constructor under its function name, with the task whose inputs it
    takes; ``pretrained`` names the entries whose weights ship, each with the task it was trained
    on (weights ``checkpoints/<entry>.safetensors``, card ``<entry>.json``). One call per model."""
    get_task(task)  # an unknown task is an error here, not when the model is first used
    entries = [ZooEntry(fn.__name__, fn, task)]
    for name, trained_on in (pretrained or {}).items():
        get_task(trained_on)
        entries.append(ZooEntry(name, fn, trained_on, weights=f"{name}.safetensors"))
    for e in entries:
        if e.name in _MODELS:
            raise ValueError(f"a model named {e.name!r} is already registered")
    _MODELS.update((e.name, e) for e in entries)
    return fn


def list_models(details: bool = False, pretrained: bool | None = None) -> list[Any]:
    """Model names (sorted); with ``details=True`` one dict per model: name, task, parameter
    count, test accuracy and whether weights ship. ``pretrained=True`` lists only those with
    weights."""
    names = sorted(n for n, e in _MODELS.items() if pretrained is None or (e.weights_path() is not None) == pretrained)
    if not details:
        return names
    rows = []
    for n in names:
        e = _MODELS[n]
        info: dict[str, Any] = {"name": n, "task": e.task, "weights": e.weights_path() is not None}
        if info["weights"]:
            c = card(n)
            info.update(params=c.num_params, test_accuracy=c.metrics.test_accuracy)
        rows.append(info)
    return rows


def entry(name: str) -> ZooEntry:
    """The registration of ``name`` (an unknown name lists close matches and all models)."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}.")
    return _MODELS[name]


def card(name: str) -> ModelCard:
    """The validated model card of a model with shipped weights; it must describe this entry
    (its name, architecture and task)."""
    e = entry(name)
    path = e.weights_path()
    if path is None or e.card_file is None:
        raise ValueError(f"{name!r} has no shipped weights, so no model card")
    card_path = path.with_name(e.card_file)
    c = read_card(card_path)
    expected = {"name": e.name, "architecture": e.architecture.__name__, "task": e.task, "weights_file": e.weights}
    for key, value in expected.items():
        if getattr(c, key) != value:
            raise CardError(f"model card {card_path}: field {key!r} is {getattr(c, key)!r}, but the zoo registers {name!r} with {value!r}")
    return c


def _build(e: ZooEntry, kwargs: dict[str, Any]) -> nn.Module:
    """Call the constructor; an unknown keyword names the model and the valid options."""
    try:
        return e.architecture(**kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        bad = str(err).rsplit("argument", 1)[-1].strip(" '\"")
        valid = _valid_options(e.architecture)
        close = difflib.get_close_matches(bad, valid, n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TypeError(f"{e.name!r} has no option {bad!r}.{hint} Valid options: {', '.join(valid) or 'none'}.") from err


def _valid_options(fn: Callable[..., nn.Module]) -> list[str]:
    """Keyword options a zoo constructor accepts: its own, its model class's (MDEQConfig fields
    for MDEQ classifiers), and the DEQ layer's when the class forwards extra keywords to it."""
    import dataclasses
    import inspect
    import typing

    from mdeq.models.mdeq_classifier import MDEQClassifier, MDEQConfig
    from mdeq.nn.deq import DEQ

    def named(f: Callable[..., Any]) -> tuple[list[str], bool]:
        ps = list(inspect.signature(f).parameters.values())
        return [p.name for p in ps if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"], any(p.kind == p.VAR_KEYWORD for p in ps)

    names, _ = named(fn)
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the signature
        ret = None
    if ret is MDEQClassifier:
        names += [f.name for f in dataclasses.fields(MDEQConfig)]
    elif isinstance(ret, type) and issubclass(ret, nn.Module):
        own, forwards = named(ret.__init__)
        names += own
        if forwards:
            names += named(DEQ.__init__)[0][1:]  # the DEQ layer's options (not f)
    return sorted(set(names))


def create(
    name: str,
    pretrained: bool = False,
    *,
    features_only: bool = False,
    out_indices: int | tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the model registered as ``name``; ``pretrained=True`` loads its shipped weights
    (verified: SHA-256, parameter names and shapes) and returns it in eval mode.

    An entry with shipped weights is built as its card describes it (its ``architecture_kwargs``,
    the solver budget included) with or without ``pretrained``: ``create(name)`` plus the shipped
    state dict computes what ``create(name, pretrained=True)`` computes.

    Fine-tuning: ``num_classes`` other than the card's gives a fresh classifier (0: none, the model
    returns pooled features), ``in_channels`` other than the card's adapts the first layer.
    ``features_only=True`` returns the feature levels as a backbone
    (:class:`~mdeq.models.classifier_api.EquilibriumFeatures`, levels ``out_indices``).
    The model carries timm's configuration as ``pretrained_cfg`` (:mod:`zoo.pretrained_cfg`)."""
    e = entry(name)
    path = e.weights_path()
    if pretrained and e.weights is None:
        with_weights = [n for n in list_models(pretrained=True)]
        raise ValueError(
            f"no pretrained weights ship for {name!r}; models with weights: {', '.join(with_weights) or 'none yet'}"
        )
    if pretrained and path is None:
        raise WeightsError(f"weights {e.weights!r} for {name!r} not found in {[str(d) for d in checkpoint_dirs()]}")
    c = None
    if path is None:
        model = _build(e, {**e.kwargs, **kwargs})
    else:
        card_path = path.with_name(e.card_file)  # type: ignore[arg-type]
        c = card(name)
        described = check_card_kwargs(c.architecture_kwargs, f"model card {card_path}")
        model = _build(e, {**described, **e.kwargs, **kwargs})
        if pretrained:
            _load_shipped(model, path, c, card_path, kwargs)
            model.eval()
    cfg = pretrained_cfg(e, c, model)
    if features_only:
        model = _features(name, model, out_indices)
    elif out_indices is not None:
        raise ValueError("out_indices selects feature levels: it needs features_only=True")
    model.pretrained_cfg = model.default_cfg = cfg  # type: ignore[assignment]
    return model


def _load_shipped(model: nn.Module, path: Any, c: ModelCard, card_path: Any, kwargs: dict[str, Any]) -> None:
    """Load the verified shipped weights; another class count or input channel count than the
    card's re-initialises the classifier or adapts the first layer."""
    sha256 = check_sha256_field(c.sha256, f"model card {card_path}")
    if c.num_classes < 1:
        raise WeightsError(f"model card {card_path}: field 'num_classes' must be a positive integer, got {c.num_classes!r}")
    fresh: tuple[str, ...] = ()
    if kwargs.get("num_classes", c.num_classes) != c.num_classes:
        head = getattr(model, "classifier_name", None)
        if not isinstance(head, str):
            raise WeightsError(f"{type(model).__name__} does not name its classifier, so it cannot load weights for {c.num_classes} classes with another count")
        fresh = (head,)
    trained_channels = c.preprocessing.input_shape[0]
    adapt = None
    if kwargs.get("in_channels", trained_channels) != trained_channels:
        first = getattr(model, "first_conv", None)
        if not isinstance(first, str):
            raise WeightsError(f"{type(model).__name__} does not name its first layer, so its weights cannot be adapted to other input channels")
        adapt = (f"{first}.weight", trained_channels)
    load_weights(model, path, sha256=sha256, fresh=fresh, input_channels=adapt)
    expect_card_convergence(model, c)


def expect_card_convergence(model: nn.Module, c: ModelCard) -> None:
    """Tell each DEQ layer that runs at the card's solver budget what fraction of samples converge
    there (the card's test-split measure), so batches that converge as often are not warned about:
    a shipped model's known convergence rate belongs in its card, not in a warning on every batch."""
    from mdeq.nn.deq import deq_layers

    for layer in deq_layers(model):
        if layer.max_steps == c.solver.max_steps and layer.tol == c.solver.tol:
            layer.expected_converged_fraction = float(c.metrics.converged_fraction)


def _features(name: str, model: nn.Module, out_indices: int | tuple[int, ...] | None) -> nn.Module:
    from mdeq.models.classifier_api import EquilibriumFeatures

    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{name!r} has no spatial feature levels ({type(model).__name__} works on vectors), so features_only=True "
            "does not apply; use model.forward_features(x) for its feature vector"
        )
    return EquilibriumFeatures(model, out_indices)


def check_card_kwargs(kwargs: Any, source: str) -> dict[str, Any]:
    """A card's ``architecture_kwargs`` (a JSON object) with its solver settings inside
    :data:`CARD_SOLVER_BOUNDS`: a card cannot make a model loop for a billion steps or stop at once."""
    import math

    from mdeq.core import list_solvers

    if not isinstance(kwargs, dict):
        raise WeightsError(f"{source}: field 'architecture_kwargs' must be a JSON object, got {type(kwargs).__name__}")
    steps = kwargs.get("max_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= CARD_SOLVER_BOUNDS["max_steps"][1]):
        raise WeightsError(f"{source}: field 'architecture_kwargs.max_steps' must be an integer in [1, {CARD_SOLVER_BOUNDS['max_steps'][1]}], got {steps!r}")
    tol = kwargs.get("tol")
    if tol is not None and (not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or not 0 < tol <= 1):
        raise WeightsError(f"{source}: field 'architecture_kwargs.tol' must be a number in (0, 1], got {tol!r}")
    if kwargs.get("stop_mode") not in (None, "rel", "abs"):
        raise WeightsError(f"{source}: field 'architecture_kwargs.stop_mode' must be 'rel' or 'abs', got {kwargs['stop_mode']!r}")
    solver = kwargs.get("solver")
    name = solver.get("name") if isinstance(solver, dict) else solver
    if solver is not None and name not in list_solvers():
        raise WeightsError(f"{source}: field 'architecture_kwargs.solver' must name one of {list_solvers()}, got {solver!r}")
    return kwargs
