"""Batched restart-free GMRES: one Krylov space per sample, Givens-rotation least squares."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mdeq.core.solvers.base import _StopCheck, batched_dot, linear_algebra_dtype


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    max_iter: int = 20,
    rtol: float = 1e-3,
) -> tuple[Tensor, Tensor, int]:
    """Solve A x = b per sample for (batch, dim) ``b``, where ``matvec(v) = A v`` is batched.

    Returns ``(x, relative_residual, iterations)``. Stops when every sample's residual is at
    most ``rtol * ||b||`` or after ``max_iter`` Arnoldi steps. Written without in-place updates so
    it is differentiable when run under autograd. The system is solved for ``b`` scaled to unit
    peak per sample (A is linear, so x scales back exactly): at the scale 1e-23 or 1e23 the norms
    and inner products of the raw vectors would underflow or overflow in float32.
    """
    peak = b.detach().abs().amax(dim=1) if b.shape[1] else torch.zeros(b.shape[0], dtype=b.dtype, device=b.device)
    unit = (peak > 0) & torch.isfinite(peak) & torch.isfinite(peak.reciprocal())
    peak = torch.where(unit, peak, torch.ones_like(peak))
    x, rel, k = _gmres_unit(matvec, b / peak[:, None], max_iter=max_iter, rtol=rtol)
    return x * peak[:, None], rel, k


def _gmres_unit(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    max_iter: int,
    rtol: float,
) -> tuple[Tensor, Tensor, int]:
    """GMRES for a right-hand side of moderate scale (see :func:`gmres`)."""
    tiny = torch.finfo(b.dtype).tiny
    beta = torch.linalg.vector_norm(b, dim=1)
    safe_beta = torch.where(beta > 0, beta, torch.ones_like(beta))
    basis = [b / safe_beta[:, None]]
    cs: list[Tensor] = []
    sn: list[Tensor] = []
    g = [beta]
    cols: list[list[Tensor]] = []
    stop = _StopCheck(b.device)
    res = beta
    # Per-sample number of Krylov columns used: a sample stops growing its space as soon as it
    # meets its tolerance, so its answer does not depend on the other samples in the batch.
    used = torch.zeros_like(beta, dtype=torch.long)
    growing = beta > 0
    for j in range(max_iter):
        w = matvec(basis[j])
        h = []
        for v in basis:  # modified Gram-Schmidt
            hij = batched_dot(w, v)
            h.append(hij)
            w = w - hij[:, None] * v
        h_next = torch.linalg.vector_norm(w, dim=1)
        basis.append(w / torch.where(h_next > tiny, h_next, torch.ones_like(h_next))[:, None])
        for i in range(j):
            hi, hi1 = h[i], h[i + 1]
            h[i] = cs[i] * hi + sn[i] * hi1
            h[i + 1] = -sn[i] * hi + cs[i] * hi1
        denom = torch.sqrt(h[j] ** 2 + h_next**2)
        nz = denom > tiny
        safe = torch.where(nz, denom, torch.ones_like(denom))
        c = torch.where(nz, h[j] / safe, torch.ones_like(denom))
        s = torch.where(nz, h_next / safe, torch.zeros_like(denom))
        h[j] = torch.where(nz, denom, h[j])
        cs.append(c)
        sn.append(s)
        g.append(-s * g[j])
        g[j] = c * g[j]
        cols.append(h)
        used = torch.where(growing, used + 1, used)
        res = torch.where(growing, g[j + 1].abs(), res)
        growing = growing & (res > rtol * beta)
        if j == max_iter - 1 or stop.all_stopped(growing):
            break
    k = len(cols)
    R = torch.stack([torch.stack(col + [torch.zeros_like(beta)] * (k - len(col)), dim=1) for col in cols], dim=2)
    keep = torch.arange(k, device=b.device)[None, :] < used[:, None]  # (batch, k)
    R = torch.where(keep[:, :, None] & keep[:, None, :], R, torch.zeros_like(R))
    diag = R.diagonal(dim1=1, dim2=2)
    bad = diag.abs() <= tiny
    R = R + torch.diag_embed(torch.where(bad, torch.ones_like(diag), torch.zeros_like(diag)))
    rhs = torch.stack(g[:k], dim=1)
    rhs = torch.where(bad | ~keep, torch.zeros_like(rhs), rhs)
    wide = linear_algebra_dtype(R.dtype)  # float16/bfloat16: the triangular solve in float32
    y = torch.linalg.solve_triangular(R.to(wide), rhs[:, :, None].to(wide), upper=True)[..., 0].to(R.dtype)
    x = (y[:, :, None] * torch.stack(basis[:k], dim=1)).sum(dim=1)
    return x, res / safe_beta, k
