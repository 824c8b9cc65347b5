"""Solver budgets passed per call, never poked into layers.

A training recipe, an evaluation or a convergence guard often wants another solver budget than the
layer's own (a few steps while training, more at test time, a tighter tol for a check), or wants
Jacobian regularization on for one step and off for the next. Rewriting ``layer.tol`` for that
would silently replace what the user set. Instead the budget travels with the call::

    with solver_budget(max_steps=100, tol=1e-5):
        logits = model(x)          # every DEQ layer inside solves to this budget
    model.deq.tol                  # still the value the user set

Budgets nest: an inner ``solver_budget`` overrides the fields it sets and keeps the outer ones.
A field left at ``None`` keeps the layer's own value. The budget is held in a
:class:`contextvars.ContextVar`, so threads and asyncio tasks each see their own, and it is
readable inside ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace
from typing import Any, Iterator

from mdeq.core.options import check_option, integer, real

KEEP = "keep"
"""``SolverBudget.jacobian`` value that keeps each layer's own Jacobian regularization."""


@dataclass(frozen=True)
class SolverBudget:
    """Overrides for one call of every DEQ layer: ``None`` (or :data:`KEEP` for ``jacobian``) keeps
    the layer's own setting.

    Attributes:
        max_steps: forward solver iterations at most (an integer >= 1).
        tol: forward stopping tolerance (a number >= 0).
        jacobian: Jacobian regularization for this call: a
            :class:`~mdeq.core.jacobian.JacobianRegularization` to use in training mode, ``None``
            to turn it off, or :data:`KEEP` (default) for the layer's own.
        record_trace: keep the residual of every iteration in ``solution.trace`` (None: the
            layer's own setting).
        fixed: run exactly ``max_steps`` iterations with no host read: no early stop, no check of
            the input for NaN, no convergence report (the solution still records residuals). What
            ``torch.export`` and ``torch.compile(fullgraph=True)`` need: a static graph
            (:mod:`mdeq.deploy`). None: the layer's own ``early_stop``/``check_input``/``on_divergence``.
        quiet: the caller reports convergence itself (it reads the solution records, as the
            Lightning modules and the convergence guard do): layers whose ``on_divergence`` is
            "warn" issue no ``ConvergenceWarning`` for this call; "raise" still raises. None/False:
            the layer's own policy.
    """

    max_steps: int | None = None
    tol: float | None = None
    jacobian: Any = KEEP
    record_trace: bool | None = None
    fixed: bool | None = None
    quiet: bool | None = None

    def __post_init__(self) -> None:
        if self.max_steps is not None:
            check_option("solver_budget", "max_steps", self.max_steps, integer(1, 1_000_000))
        if self.tol is not None:
            check_option("solver_budget", "tol", self.tol, real(0.0))
        if self.record_trace is not None and not isinstance(self.record_trace, bool):
            raise TypeError(f"solver_budget: record_trace must be True, False or None, got {self.record_trace!r}")
        for name in ("fixed", "quiet"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"solver_budget: {name} must be True, False or None, got {value!r}")
        if self.jacobian is not KEEP and self.jacobian != KEEP and self.jacobian is not None:
            from mdeq.core.jacobian import JacobianRegularization

            if not isinstance(self.jacobian, JacobianRegularization):
                raise TypeError(
                    f"solver_budget: jacobian must be a JacobianRegularization, None (off) or 'keep', got {type(self.jacobian).__name__}"
                )

    def over(self, outer: SolverBudget | None) -> SolverBudget:
        """This budget with the fields it leaves open taken from ``outer``."""
        if outer is None:
            return self
        return replace(
            outer,
            **{
                k: v
                for k, v in (
                    ("max_steps", self.max_steps), ("tol", self.tol), ("record_trace", self.record_trace),
                    ("fixed", self.fixed), ("quiet", self.quiet),
                )
                if v is not None
            },
            **({} if _keeps(self.jacobian) else {"jacobian": self.jacobian}),
        )

    def resolve(self, max_steps: int, tol: float, jacobian: Any, record_trace: bool) -> tuple[int, float, Any, bool]:
        """(max_steps, tol, jacobian, record_trace) for a layer whose own settings are the arguments."""
        return (
            max_steps if self.max_steps is None else self.max_steps,
            tol if self.tol is None else self.tol,
            jacobian if _keeps(self.jacobian) else self.jacobian,
            record_trace if self.record_trace is None else self.record_trace,
        )


def _keeps(jacobian: Any) -> bool:
    return isinstance(jacobian, str) and jacobian == KEEP


_CURRENT: contextvars.ContextVar[SolverBudget | None] = contextvars.ContextVar("mdeq_solver_budget", default=None)


def current_budget() -> SolverBudget | None:
    """The budget of the innermost :func:`solver_budget` block, or None outside any."""
    return _CURRENT.get()


@contextlib.contextmanager
def solver_budget(
    budget: SolverBudget | None = None,
    *,
    max_steps: int | None = None,
    tol: float | None = None,
    jacobian: Any = KEEP,
    record_trace: bool | None = None,
    fixed: bool | None = None,
    quiet: bool | None = None,
) -> Iterator[SolverBudget]:
    """Within the block, every DEQ layer solves with this budget (see :class:`SolverBudget`);
    give a ``SolverBudget`` or its fields. Nested blocks override only the fields they set."""
    fields_given = max_steps is not None or tol is not None or not _keeps(jacobian) or record_trace is not None or fixed is not None or quiet is not None
    if budget is not None and fields_given:
        raise TypeError("solver_budget takes a SolverBudget or its fields, not both")
    inner = budget if budget is not None else SolverBudget(max_steps, tol, jacobian, record_trace, fixed, quiet)
    effective = inner.over(_CURRENT.get())
    token = _CURRENT.set(effective)
    try:
        yield effective
    finally:
        _CURRENT.reset(token)


__all__ = ["KEEP", "SolverBudget", "current_budget", "solver_budget"]
