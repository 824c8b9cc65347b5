"""Jacobian regularization: a Hutchinson estimate of ||df/dz||_F^2 / dim at the equilibrium."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from mdeq.core.solvers.jacobian_products import make_dual

BACKENDS = ("vjp", "jvp", "finite_diff")


@dataclass(frozen=True)
class JacobianRegularization:
    """Settings of the Jacobian regularizer (Bai, Koltun & Kolter, "Stabilizing Equilibrium
    Models by Jacobian Regularization", 2021).

    The estimate is E_eps ||J eps||^2 / dim (or ||eps^T J||^2 / dim) with Gaussian probes,
    averaged over ``n_probes`` probes and the batch; it is differentiable with respect to f's
    parameters and inputs, so it can be added to the training loss.

    backend: ``"vjp"`` (reverse mode, uses the graph of the f call at z*), ``"jvp"`` (forward
    mode, one extra f evaluation per probe) or ``"finite_diff"`` ((f(z + h eps) - f(z)) / h).
    """

    backend: str = "vjp"
    n_probes: int = 1
    fd_eps: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"jacobian regularization backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {self.n_probes}")

    def __call__(self, f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor) -> Tensor:
        """Estimate at ``z`` (a leaf requiring grad for "vjp") given ``fz = f(z)`` with graph."""
        return jacobian_frobenius(f, z, fz, backend=self.backend, n_probes=self.n_probes, fd_eps=self.fd_eps)


JacobianSpec = Union[None, bool, str, JacobianRegularization, dict]


def get_jacobian_regularization(spec: Any) -> JacobianRegularization | None:
    """None/False: off; True or a backend name; a mapping of options; or an instance."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return JacobianRegularization()
    if isinstance(spec, JacobianRegularization):
        return spec
    if isinstance(spec, str):
        return JacobianRegularization(backend=spec)
    if isinstance(spec, dict):
        try:
            return JacobianRegularization(**spec)
        except TypeError as err:
            raise ValueError(
                f"bad jacobian_regularization options {sorted(spec)}; valid: backend, n_probes, fd_eps"
            ) from err
    raise TypeError(f"jacobian_regularization must be None, bool, a backend name, a dict or JacobianRegularization; got {spec!r}")


_PROBE_KEYS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("mdeq_probe_keys", default=None)

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _splitmix64(x: Tensor) -> Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic; shifts made logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def keyed_normal(keys: Tensor, dim: int, dtype: torch.dtype, stream: int = 0) -> Tensor:
    """Standard normal probes of shape (len(keys), dim) that depend only on each row's integer
    key (and ``stream``), not on the batch they sit in or the device: a counter-based generator
    (SplitMix64 hashes, Box-Muller). Used so that a sample gets the same Hutchinson probe in a
    single process and in any data-parallel shard."""
    keys = keys.to(torch.int64)
    idx = torch.arange(dim, device=keys.device, dtype=torch.int64)
    offset = _signed((stream * 0x94D049BB133111EB) & _MASK64)
    base = _splitmix64(keys * _GOLDEN + offset)[:, None] + idx[None, :] * _signed((2 * 0x9E3779B97F4A7C15) & _MASK64)
    b1, b2 = _splitmix64(base), _splitmix64(base + _GOLDEN)
    u1 = (((b1 >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) / float(1 << 53)
    u2 = ((b2 >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(dtype)


@contextlib.contextmanager
def probe_keys(keys: Tensor | None) -> Iterator[None]:
    """Within this context, Hutchinson probes are drawn per sample from ``keys`` (one integer per
    sample of the batch) instead of the global RNG: estimates are reproducible per sample and
    identical however the batch is sharded across processes."""
    token = _PROBE_KEYS.set(keys)
    try:
        yield
    finally:
        _PROBE_KEYS.reset(token)


def _probe(z: Tensor, p: int) -> Tensor:
    keys = _PROBE_KEYS.get()
    if keys is None:
        return torch.randn_like(z)
    if keys.shape != (z.shape[0],):
        raise ValueError(f"probe_keys has shape {tuple(keys.shape)} for a batch of {z.shape[0]} samples; give one key per sample")
    return keyed_normal(keys.to(z.device), z.shape[1], z.dtype, stream=p)


def jacobian_frobenius(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    fz: Tensor,
    *,
    backend: str = "vjp",
    n_probes: int = 1,
    fd_eps: float | None = None,
) -> Tensor:
    """Hutchinson estimate of mean over the batch of ||df/dz||_F^2 / dim for flat (batch, dim) z."""
    dim = z.shape[1]
    total = z.new_zeros(())
    for p in range(n_probes):
        eps = _probe(z, p)
        if backend == "vjp":
            if not z.requires_grad or fz.grad_fn is None:
                raise RuntimeError("the 'vjp' Jacobian estimate needs f(z) computed with a graph from z")
            (prod,) = torch.autograd.grad(fz, z, eps, create_graph=True, retain_graph=True)
        elif backend == "jvp":
            with fwAD.dual_level():
                out = f(make_dual(z.detach(), eps))
                prod = fwAD.unpack_dual(out).tangent
            if prod is None:
                prod = torch.zeros_like(z)
        elif backend == "finite_diff":
            zd = z.detach()
            h = fd_eps if fd_eps is not None else torch.finfo(z.dtype).eps ** 0.5 * (1.0 + (float(zd.abs().max()) if zd.numel() else 0.0))
            prod = (f(zd + h * eps) - fz) / h
        else:
            raise ValueError(f"unknown Jacobian backend {backend!r}; choose from {BACKENDS}")
        total = total + prod.pow(2).sum() / (max(prod.shape[0], 1) * dim)  # the batch mean; an empty batch gives 0, not NaN
    return total / n_probes


def jvp_fn(f: Callable[[Tensor], Tensor], z: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> (df/dz at z) v, by forward-mode AD (finite differences if f has no forward rule)."""
    fz = f(z)
    state = {"forward_ad": True}

    def jvp(v: Tensor) -> Tensor:
        if state["forward_ad"]:
            try:
                with fwAD.dual_level():
                    out = fwAD.unpack_dual(f(make_dual(z, v))).tangent
                return torch.zeros_like(z) if out is None else out
            except (NotImplementedError, RuntimeError):
                state["forward_ad"] = False
        vn = torch.linalg.vector_norm(v, dim=1).clamp_min(torch.finfo(z.dtype).tiny)
        h = torch.finfo(z.dtype).eps ** 0.5 * (1.0 + torch.linalg.vector_norm(z, dim=1)) / vn
        return (f(z + h[:, None] * v) - fz) / h[:, None]

    return jvp


def jacobian_eigenvalues(f: Callable[[Tensor], Tensor], z: Tensor, k: int = 20, seed: int = 0) -> Tensor:
    """Ritz values of df/dz at ``z`` per sample: ``k`` steps of batched Arnoldi on
    Jacobian-vector products. Returns a complex tensor (batch, k') with k' <= k; the extremal
    eigenvalues (largest modulus, rightmost real part) are the first to be resolved, and with
    k >= dim the values are exact up to rounding."""
    with torch.no_grad():
        jvp = jvp_fn(f, z)
        b, d = z.shape
        k = min(k, d)
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(b, d, generator=g, dtype=z.dtype).to(z.device)
        basis = [v / torch.linalg.vector_norm(v, dim=1, keepdim=True)]
        h = torch.zeros(b, k + 1, k, dtype=z.dtype, device=z.device)
        steps = 0
        for j in range(k):
            w = jvp(basis[j])
            for i, q in enumerate(basis):
                hij = (w * q).sum(dim=1)
                h[:, i, j] = hij
                w = w - hij[:, None] * q
            for i, q in enumerate(basis):  # re-orthogonalise: keeps the small Hessenberg honest
                c = (w * q).sum(dim=1)
                h[:, i, j] += c
                w = w - c[:, None] * q
            norm = torch.linalg.vector_norm(w, dim=1)
            h[:, j + 1, j] = norm
            steps = j + 1
            if bool((norm <= 1e-10 * h[:, : j + 1, : j + 1].abs().amax(dim=(1, 2)).clamp_min(1e-30)).all()):
                break
            basis.append(w / norm.clamp_min(torch.finfo(z.dtype).tiny)[:, None])
        return torch.linalg.eigvals(h[:, :steps, :steps].double())  # (float16 has no eig; k x k is cheap)


def spectral_summary(f: Callable[[Tensor], Tensor], z: Tensor, k: int = 20) -> tuple[Tensor, Tensor]:
    """Per-sample estimates of the spectral radius of df/dz (iteration is locally stable when
    < 1) and of the largest real part of its eigenvalues (the flow dz/dt = f(z) - z is locally
    stable when < 1)."""
    ev = jacobian_eigenvalues(f, z, k)
    return ev.abs().amax(dim=1), ev.real.amax(dim=1)
