"""Jacobian-vector products of a batched map and its dense per-sample Jacobian, shared by the
Newton-type solvers (newton_krylov, newton, trust_region)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from mdeq.core.options import Rule, choice, integer
from mdeq.core.solvers.base import Map, Solver

JVP_MODES = ("auto", "forward_ad", "finite_diff")
"""How a solver takes J v: exact forward-mode AD, a finite difference, or "auto" (forward AD,
falling back to finite differences the first time f has an operation without a forward rule)."""


_DECOMPOSITIONS_LOADED = False


def make_dual(z: Tensor, v: Tensor) -> Tensor:
    """``torch.autograd.forward_ad.make_dual``. Its first call in a process loads torch's
    forward-AD decompositions with ``torch.jit.script``, which warns that TorchScript is deprecated:
    torch's own internals, nothing a user can act on, so that one warning is kept out of their output."""
    global _DECOMPOSITIONS_LOADED
    if _DECOMPOSITIONS_LOADED:
        return fwAD.make_dual(z, v)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        dual = fwAD.make_dual(z, v)
    _DECOMPOSITIONS_LOADED = True
    return dual


def jacobian_vector_product(state: dict[str, Any], f: Map, z: Tensor, fz: Tensor, v: Tensor) -> Tensor:
    """(df/dz at z) v per sample, for (batch, dim) tensors; ``fz = f(z)``.

    ``state["jvp"]`` holds the mode (see :data:`JVP_MODES`); "auto" is rewritten to
    "finite_diff" for the rest of the solve once forward AD fails. Every product is one f call."""
    if state["jvp"] in ("auto", "forward_ad"):
        try:
            with fwAD.dual_level():
                out = f(make_dual(z, v))
                tangent = fwAD.unpack_dual(out).tangent
            return torch.zeros_like(z) if tangent is None else tangent
        except (NotImplementedError, RuntimeError):
            if state["jvp"] == "forward_ad":
                raise
            state["jvp"] = "finite_diff"
    vnorm = torch.linalg.vector_norm(v, dim=1).clamp_min(torch.finfo(z.dtype).tiny)
    znorm = torch.linalg.vector_norm(z, dim=1)
    h = torch.finfo(z.dtype).eps ** 0.5 * (1.0 + znorm) / vnorm
    return (f(z + h[:, None] * v) - fz) / h[:, None]


def dense_jacobian(state: dict[str, Any], f: Map, z: Tensor, fz: Tensor, jvp: Map | None = None) -> Tensor:
    """The exact per-sample Jacobian of f at z, (batch, dim, dim), from ``dim`` products with the
    unit vectors (``jvp``, when the caller has the exact linear map, else
    :func:`jacobian_vector_product`). Column i is J e_i."""
    b, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    columns = []
    for i in range(d):
        e = eye[i].expand(b, d)
        columns.append(jvp(e) if jvp is not None else jacobian_vector_product(state, f, z, fz, e))
    return torch.stack(columns, dim=2)


def check_dense_dim(solver: str, dim: int, max_dim: int) -> None:
    """A clear error before a dense method forms a Jacobian it should not: ``dim`` f calls per step
    and ``dim**2`` numbers per sample."""
    if dim > max_dim:
        raise ValueError(
            f"solver {solver!r} forms the exact {dim} x {dim} Jacobian of every sample ({dim} f-evaluations per step): "
            f"this state has {dim} dimensions, above its max_dim={max_dim}. Use solver='newton_krylov' (Newton on "
            f"matrix-free Jacobian products) or 'anderson' for large states, or raise max_dim."
        )


@dataclass(kw_only=True)
class DenseJacobianSolver(Solver):
    """What the dense-Jacobian solvers (newton, trust_region) share: how J v is taken (``jvp``, one
    of :data:`JVP_MODES`), the largest state they accept (``max_dim``; each step costs ``dim``
    f-evaluations and ``dim**2`` numbers per sample), and the per-solve state holding the JVP mode."""

    jvp: str = "auto"
    max_dim: int = 1024

    dense_option_rules: ClassVar[dict[str, Rule]] = {"jvp": choice(*JVP_MODES), "max_dim": integer(1)}

    def init_state(self, z0: Any) -> Any:
        check_dense_dim(self.name, z0.shape[1], self.max_dim)
        return {"jvp": self.jvp}
