"""The solver registry: solvers are looked up by name, built from names, dicts or instances."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, TypeVar, Union

from mdeq.core.solvers.base import Solver

_REGISTRY: dict[str, type[Solver]] = {}

S = TypeVar("S", bound=type[Solver])

SolverSpec = Union[str, Mapping[str, Any], Solver]


def register_solver(cls: S) -> S:
    """Class decorator: make a :class:`Solver` subclass available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a solver named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_solvers() -> list[str]:
    """Names of all registered solvers."""
    return sorted(_REGISTRY)


SCIML_SOLVERS: dict[str, tuple[str, str]] = {
    "NewtonRaphson": ("newton", "exact Newton: per-sample Jacobian and LU, for states of up to a few hundred dimensions; newton_krylov (GMRES on exact JVPs) for larger ones"),
    "KrylovJL_GMRES": ("newton_krylov", "Newton with a GMRES linear solve"),
    "TrustRegion": ("trust_region", "Newton with a dogleg trust region, exact per-sample Jacobian"),
    "LimitedMemoryBroyden": ("broyden", "limited-memory Broyden (option memory)"),
    "Broyden": ("broyden", "limited-memory Broyden (option memory)"),
    "Tsit5": ("ode", "integrate dz/dt = f(z) - z to steady state (option method='tsit5')"),
    "VCAB3": ("ode", "integrate dz/dt = f(z) - z to steady state; mdeq's integrators are Tsit5 and Dopri5"),
    "DynamicSS": ("ode", "steady state of dz/dt = f(z) - z"),
    "SSRootfind": ("broyden", "a root-finding solver"),
    "Anderson": ("anderson", "Anderson acceleration"),
}
"""DeepEquilibriumNetworks.jl / SciML solver names, with mdeq's counterpart (README: "Coming from
DeepEquilibriumNetworks.jl"). An unknown name that is one of them says which to use."""


def _unknown(name: str, known: list[str], what: str) -> ValueError:
    if what == "solver" and name in SCIML_SOLVERS:
        ours, how = SCIML_SOLVERS[name]
        return ValueError(f"unknown solver {name!r}: that is a DeepEquilibriumNetworks.jl / SciML name; use solver={ours!r} ({how}). Available: {', '.join(known)}.")
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown {what} {name!r}.{hint} Available: {', '.join(known)}.")


def get_solver(spec: SolverSpec, **options: Any) -> Solver:
    """Build a solver from a name (``"anderson"``), a mapping (``{"name": "anderson", "m": 6}``)
    or return an instance unchanged. Unknown names and unknown options raise ``ValueError``."""
    if isinstance(spec, Solver):
        if options:
            return dataclasses.replace(spec, **_checked(type(spec), options))
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"a solver given as a mapping needs a 'name' key, got keys {sorted(spec)}")
        name = spec.pop("name")
        return get_solver(name, **{**spec, **options})
    if not isinstance(spec, str):
        raise TypeError(f"solver must be a name, a mapping or a Solver instance, got {type(spec).__name__}")
    if spec not in _REGISTRY:
        raise _unknown(spec, list_solvers(), "solver")
    cls = _REGISTRY[spec]
    return cls(**_checked(cls, options))


def _checked(cls: type[Solver], options: Mapping[str, Any]) -> dict[str, Any]:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown option {key!r} for solver {cls.name!r}.{hint} Valid options: {', '.join(valid) or 'none'}."
            )
    return dict(options)
