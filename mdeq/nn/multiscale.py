"""Multiscale DEQs (Bai et al., 2020) in the style of DeepEquilibriumNetworks.jl.

A multiscale DEQ is a :class:`~mdeq.nn.deq.DEQ` whose state is a tuple (one tensor per scale)
and whose cell is :class:`MultiScaleMap`: per-scale main layers, then a matrix of mapping layers
that carries every scale to every other, then optional per-scale post-fuse layers.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from mdeq.core.neural_ode import NeuralODE
from mdeq.nn.deq import DEQ, check_cell_signature


class NoConnection(nn.Module):
    """Placeholder for an absent off-diagonal mapping (scale i does not feed scale j)."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("NoConnection is a placeholder and is never called")


def _as_module(layer: Any, what: str) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    raise TypeError(f"{what} must be an nn.Module (or None), got {type(layer).__name__}")


class MultiScaleMap(nn.Module):
    """One application of the multiscale cell: z -> new z for a tuple state.

    y_i = main_layers[i](z_i) (``main_layers[0](z_0, x)`` also receives the injection x);
    new z_j = post_fuse_layers[j](sum_i mapping_layers[i][j](y_i)).

    ``mapping_layers[i][j]`` carries scale i to scale j. ``None`` on the diagonal is the
    identity; ``None`` off the diagonal means scale i does not feed scale j.
    """

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[nn.Module | None]],
        post_fuse_layers: Sequence[nn.Module | None] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(main_layers, nn.Module) and not isinstance(main_layers, (nn.ModuleList, nn.Sequential)):
            raise TypeError("main_layers must be a tuple/list of modules, one per scale")
        main = list(main_layers)
        n = len(main)
        if n < 1:
            raise ValueError("main_layers needs at least one layer (one per scale)")
        self.main_layers = nn.ModuleList(_as_module(m, f"main_layers[{i}]") for i, m in enumerate(main))
        check_cell_signature(self.main_layers[0])
        rows = list(mapping_layers)
        shape_ok = len(rows) == n and all(isinstance(r, (list, tuple, nn.ModuleList)) and len(r) == n for r in rows)
        if not shape_ok:
            got = f"{len(rows)} rows of lengths {[len(r) if hasattr(r, '__len__') else '?' for r in rows]}"
            raise ValueError(f"mapping_layers must be an n x n matrix for n = {n} main layers; got {got}")
        matrix = []
        for i, row in enumerate(rows):
            entries = []
            for j, layer in enumerate(row):
                if layer is None:
                    entries.append(nn.Identity() if i == j else NoConnection())
                else:
                    entries.append(_as_module(layer, f"mapping_layers[{i}][{j}]"))
            matrix.append(nn.ModuleList(entries))
        self.mapping_layers = nn.ModuleList(matrix)
        for j in range(n):
            if all(isinstance(self.mapping_layers[i][j], NoConnection) for i in range(n)):
                raise ValueError(f"scale {j} receives no input: column {j} of mapping_layers is empty")
        if post_fuse_layers is None:
            self.post_fuse_layers = None
        else:
            post = list(post_fuse_layers)
            if len(post) != n:
                raise ValueError(f"post_fuse_layers needs one entry per scale ({n}), got {len(post)}")
            self.post_fuse_layers = nn.ModuleList(
                nn.Identity() if p is None else _as_module(p, f"post_fuse_layers[{j}]") for j, p in enumerate(post)
            )

    @property
    def num_scales(self) -> int:
        return len(self.main_layers)

    def forward(self, z: tuple[Tensor, ...], x: Any) -> tuple[Tensor, ...]:
        n = self.num_scales
        if not isinstance(z, (tuple, list)) or len(z) != n:
            raise ValueError(f"the multiscale state must be a tuple of {n} tensors, got {type(z).__name__}")
        ys = [self.main_layers[0](z[0], x)] + [self.main_layers[i](z[i]) for i in range(1, n)]
        out = []
        for j in range(n):
            acc: Tensor | None = None
            for i in range(n):
                layer = self.mapping_layers[i][j]
                if isinstance(layer, NoConnection):
                    continue
                part = layer(ys[i])
                acc = part if acc is None else acc + part
            assert acc is not None
            out.append(acc if self.post_fuse_layers is None else self.post_fuse_layers[j](acc))
        return tuple(out)


class MultiScaleInit(nn.Module):
    """Per-scale initial guess for a multiscale skip-DEQ: x -> (init_layers[i](x) for each scale)."""

    def __init__(self, init_layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.init_layers = nn.ModuleList(_as_module(m, f"init_layers[{i}]") for i, m in enumerate(init_layers))

    def forward(self, x: Any) -> tuple[Tensor, ...]:
        return tuple(layer(x) for layer in self.init_layers)


def _check_scales(scales: Any, n: int) -> tuple[tuple[int, ...], ...] | None:
    if scales is None:
        return None
    try:
        parsed = tuple(tuple(int(d) for d in s) for s in scales)
    except TypeError:
        raise ValueError(f"scales must be a tuple of per-sample shapes, e.g. ((4,), (3,)); got {scales!r}") from None
    if len(parsed) != n:
        raise ValueError(f"scales lists {len(parsed)} shapes but there are {n} main layers")
    return parsed


class MultiScaleDEQ(DEQ):
    """A DEQ over a tuple state built from per-scale main layers and a mapping-layer matrix.

    Args:
        main_layers: one module per scale; ``main_layers[0]`` is called as ``m(z_0, x)``.
        mapping_layers: n x n matrix; ``mapping_layers[i][j]`` carries scale i to scale j.
        post_fuse_layers: None or one module (or None) per scale, applied after the sum.
        scales: per-sample state shape of each scale, e.g. ``((4,), (3,), (2,), (1,))``; may be
            None when every call passes ``z0`` (e.g. image models whose sizes follow the input).
        **kwargs: everything :class:`DEQ` takes (solver, backward, tol, max_steps,
            jacobian_regularization, on_divergence, init, ...).

    Returns ``(zs, solution)`` with ``zs`` a tuple of per-scale equilibria. Only a constructor
    over :class:`DEQ`: the same core solves, differentiates and reports.
    """

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[nn.Module | None]],
        post_fuse_layers: Sequence[nn.Module | None] | None = None,
        solver: Any = "anderson",
        scales: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        if "state_shape" in kwargs:
            raise TypeError("MultiScaleDEQ takes scales=..., not state_shape")
        cell = MultiScaleMap(main_layers, mapping_layers, post_fuse_layers)
        parsed = _check_scales(scales, cell.num_scales)
        super().__init__(cell, solver, state_shape=parsed, **kwargs)
        self.scales = parsed


class MultiScaleSkipDEQ(MultiScaleDEQ):
    """Multiscale skip-DEQ: ``init_layers`` (one module per scale, each called on x) predict
    the initial state; ``init_layers=None`` is the skip-reg variant (z0 = f(0, x)). Add
    ``solution.skip_loss`` to the training loss."""

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[nn.Module | None]],
        post_fuse_layers: Sequence[nn.Module | None] | None = None,
        solver: Any = "anderson",
        scales: Sequence[Sequence[int]] | None = None,
        init_layers: Sequence[nn.Module] | None = None,
        **kwargs: Any,
    ) -> None:
        if "init" in kwargs:
            raise TypeError("MultiScaleSkipDEQ takes init_layers, not init")
        if init_layers is not None and len(list(init_layers)) != len(list(main_layers)):
            raise ValueError(f"init_layers needs one module per scale ({len(list(main_layers))}), got {len(list(init_layers))}")
        init = MultiScaleInit(init_layers) if init_layers is not None else "f0"
        super().__init__(main_layers, mapping_layers, post_fuse_layers, solver, scales, init=init, **kwargs)


class MultiScaleNeuralODE(MultiScaleDEQ):
    """The multiscale cell integrated over a fixed time span instead of solved to equilibrium
    (DeepEquilibriumNetworks.jl's ``MultiScaleNeuralODE``): returns the per-scale z(T) of
    dz/dt = f(z, x) - z. ``t_span=(t0, T)``, or ``mode=NeuralODE(...)`` for method, tolerances
    and ``gradient="adjoint"`` / ``"backprop"``. Only a constructor over :class:`DEQ`."""

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[nn.Module | None]],
        post_fuse_layers: Sequence[nn.Module | None] | None = None,
        t_span: tuple[float, float] | None = (0.0, 1.0),
        scales: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        mode = kwargs.pop("mode", "neural_ode")
        if mode != "neural_ode" and not isinstance(mode, NeuralODE):
            raise ValueError(f"MultiScaleNeuralODE is the neural-ODE mode; got mode={mode!r}")
        if isinstance(mode, NeuralODE):
            t_span = None
        super().__init__(main_layers, mapping_layers, post_fuse_layers, scales=scales, mode=mode, t_span=t_span, **kwargs)
