"""The head and feature API every mdeq image classifier offers besides ``forward``.

It is the interface timm's tools expect of a model (``num_classes``, ``num_features``,
``head_hidden_size``, ``get_classifier``, ``reset_classifier``, ``forward_features``,
``forward_head``, ``feature_info``, ``forward_intermediates``), kept here without importing timm:
the models stay plain ``nn.Module``s and the zoo attaches timm's configuration.

``forward_features`` runs the solve and returns the unpooled features the head reads;
``forward_head(features, pre_logits=True)`` pools them; ``num_classes=0`` (at construction or
through ``reset_classifier(0)``) makes ``forward`` return those pooled features, and
``global_pool=''`` with it returns the unpooled map.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mdeq.core.solution import SolutionSlot

GLOBAL_POOLS = ("avg", "")
"""``"avg"``: the architecture's own average pooling before the classifier; ``""``: none (the
unpooled features; only without a classifier)."""


def check_head_options(num_classes: Any, global_pool: Any, model: str) -> None:
    """Clear errors for a class count or pooling mode that a classifier head cannot take."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"{model}: num_classes must be a non-negative integer (0 = no classifier, pooled features out), got {num_classes!r}")
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"{model}: global_pool must be one of {list(GLOBAL_POOLS)} ('avg' = the model's pooling, '' = none), got {global_pool!r}")
    if global_pool == "" and num_classes > 0:
        raise ValueError(f"{model}: global_pool='' (no pooling) needs num_classes=0: a classifier reads pooled features")


def default_pool(current: str, num_classes: int) -> str:
    """The pooling ``reset_classifier(num_classes)`` keeps when none is given: the current one,
    except that a classifier after no pooling ('') brings the model's pooling back (a classifier
    reads pooled features)."""
    return "avg" if current == "" and num_classes > 0 else current


def refuse_symbolic_tracing(x: Any) -> None:
    """``torch.fx`` symbolic tracing passes proxies, not tensors: a DEQ's solve stops on values it
    computes, which a symbolic trace cannot follow. Say so instead of failing on the proxy."""
    import torch.fx

    if isinstance(x, torch.fx.Proxy):
        raise RuntimeError(
            "torch.fx symbolic tracing cannot follow a DEQ: its solve stops on values computed at run time. "
            "Use the eager model, forward_intermediates() for features, or torch.compile for a compiled graph."
        )


def linear_or_identity(in_features: int, num_classes: int) -> nn.Module:
    """The classifier layer: ``Linear(in_features, num_classes)``, or ``Identity`` for 0 classes."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def select_levels(num_levels: int, indices: int | Sequence[int] | None) -> list[int]:
    """Feature levels to return: all (None), the last ``n`` (an int) or the given indices
    (negative ones count from the end). Out-of-range indices are an error naming the range."""
    if indices is None:
        return list(range(num_levels))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= num_levels:
            raise ValueError(f"indices={indices}: this model has {num_levels} feature levels; ask for the last 1..{num_levels}")
        return list(range(num_levels - indices, num_levels))
    out = []
    for i in indices:
        j = i + num_levels if i < 0 else i
        if not 0 <= j < num_levels:
            raise ValueError(f"feature level {i} does not exist: this model has levels 0..{num_levels - 1}")
        out.append(j)
    return out


def pick_intermediates(
    levels: Sequence[Tensor],
    final: Any,
    solution: Any,
    indices: int | Sequence[int] | None,
    intermediates_only: bool,
    return_solution: bool,
) -> Any:
    """What ``forward_intermediates`` returns: the selected ``levels``, after ``final()`` (the
    forward_features output) unless ``intermediates_only``, with the solve's record appended when
    ``return_solution``."""
    picked = [levels[i] for i in select_levels(len(levels), indices)]
    out: Any = picked if intermediates_only else (final(), picked)
    return (out, solution) if return_solution else out


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt != "NCHW":
        raise ValueError(f"output_fmt must be 'NCHW' (the feature levels are NCHW maps), got {output_fmt!r}")


class FeatureInfo:
    """Per-level description of a feature extractor's outputs (channels, reduction = input size /
    feature size, and the module that computes it), with the accessors timm's ``FeatureInfo`` has."""

    def __init__(self, levels: Sequence[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [dict(d) for d in levels]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[self.out_indices[i]][key] for i in idx]
        return self.info[self.out_indices[idx]][key]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        pick = (lambda d: dict(d)) if keys is None else (lambda d: {k: d[k] for k in keys})
        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[self.out_indices[i]]) for i in idx]
        return pick(self.info[self.out_indices[idx]])

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[self.out_indices[item]]

    def __len__(self) -> int:
        return len(self.out_indices)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.get_dicts()})"


class EquilibriumFeatures(nn.Module):
    """A classifier's feature levels as a backbone (timm's ``features_only=True``): ``forward(x)``
    returns one tensor per selected level, described by ``feature_info``. For a multiscale DEQ the
    levels are the injection (stem) features and the equilibrium state of every scale, so it feeds
    detection or segmentation heads. The classifier head is dropped (no unused parameters).

    The solve's record of the last call is kept in ``last_solution``."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        levels = list(model.feature_info)  # type: ignore[arg-type]
        self.out_indices = select_levels(len(levels), out_indices)
        model.prune_intermediate_layers(prune_head=True)  # type: ignore[operator]
        self.model = model
        self.feature_info = FeatureInfo(levels, self.out_indices)
        self._last_solution = SolutionSlot()  # (deep copies and pickles get an empty one)

    @property
    def last_solution(self) -> Any:
        """The solve's record of the last call (None before one)."""
        return self._last_solution.value

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        feats, self._last_solution.value = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True, return_solution=True)  # type: ignore[operator]
        return feats


def pooled_average(y: Tensor) -> Tensor:
    """Global average over the spatial dimensions of an NCHW map."""
    return torch.mean(y, dim=(2, 3))
