"""Maps with known fixed points, shared by the tests."""

from __future__ import annotations

import torch
from torch import Tensor


def contraction_matrix(dim: int, norm: float, *, dtype: torch.dtype = torch.float64, generator=None) -> Tensor:
    """Random matrix with spectral norm (largest singular value) exactly ``norm``."""
    a = torch.randn(dim, dim, dtype=dtype, generator=generator)
    return a * (norm / torch.linalg.matrix_norm(a, ord=2))


def linear_fixed_point(a: Tensor, b: Tensor) -> Tensor:
    """Closed-form z* of z = z @ a.T + b for batched b (batch, dim)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(eye - a, b.T).T


def iterate_to_fixed_point(f, z: Tensor, steps: int = 5000) -> Tensor:
    """Reference solution by long plain iteration (for contractions)."""
    with torch.no_grad():
        for _ in range(steps):
            z = f(z)
    return z
