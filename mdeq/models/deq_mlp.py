"""The MNIST DEQ of the Julia Language blog post "Composability in Julia: Implementing Deep Equilibrium
Models via Neural ODEs" (julialang.org/blog/2021/10/DEQ, DiffEqFlux.jl, 2021): a small MLP DEQ solved as a
continuous DEQ (ODE steady state)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
from mdeq.models.classifier_api import check_head_options, default_pool, linear_or_identity, refuse_symbolic_tracing
from mdeq.nn.deq import DEQ


class MLPInjectionCell(nn.Module):
    """f(z, x) = MLP(z + x) with tanh layers ``widths[0] -> ... -> widths[-1]`` (the blog's
    20 -> 10 -> 10 -> 20): input injection by addition."""

    def __init__(self, widths: tuple[int, ...] = (20, 10, 10, 20)) -> None:
        super().__init__()
        if len(widths) < 2 or widths[0] != widths[-1]:
            raise ValueError(f"widths must start and end with the state size, got {widths}")
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.mlp = nn.Sequential(*layers)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.mlp(z + x)


class DEQMLPClassifier(nn.Module):
    """Flatten -> tanh MLP encoder -> DEQ(MLPInjectionCell) -> MLP head.

    Defaults follow the blog post: encoder 784 -> 200 -> 20 (tanh), cell 20 -> 10 -> 10 -> 20,
    head 20 -> 15 -> 10, solved by the continuous solver (``"ode"``: integrate dz/dt = f - z to
    steady state) at relative tolerance 1e-2.

    Head and feature API (:mod:`mdeq.models.classifier_api`): the features are vectors, not maps
    (as in timm's MLP models): ``forward_features`` is the head's last hidden layer
    (``num_features = head_hidden_size``, 15 wide by default) and ``forward_head`` the output layer.
    The input size is fixed; there are no spatial feature levels (no ``features_only``).
    """

    first_conv = "encoder.1"
    fixed_input_size = True

    def __init__(
        self,
        encoder: tuple[int, ...] = (200, 20),
        cell: tuple[int, ...] = (20, 10, 10, 20),
        head: tuple[int, ...] = (15,),
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        in_channels: int | None = None,
        global_pool: str = "avg",
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        if encoder[-1] != cell[0]:
            raise ValueError(f"the encoder's output ({encoder[-1]}) must match the cell's state size ({cell[0]})")
        check_head_options(num_classes, global_pool, type(self).__name__)
        self.input_shape = (in_channels, *tuple(input_shape)[1:]) if in_channels is not None else tuple(input_shape)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = (cell[-1], *head)[-1]
        enc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip((math.prod(self.input_shape), *encoder[:-1]), encoder):
            enc += [nn.Linear(a, b), nn.Tanh()]
        self.encoder = nn.Sequential(*enc)
        kwargs = {"solver": "ode", "tol": 1e-2, "max_steps": 50, **deq_kwargs}
        self.deq = DEQ(MLPInjectionCell(cell), **kwargs)
        hd: list[nn.Module] = []
        for a, b in zip((cell[-1], *head), head):
            hd += [nn.Linear(a, b), nn.Tanh()]
        self.head = nn.Sequential(*hd, linear_or_identity(self.head_hidden_size, num_classes))

    @property
    def in_chans(self) -> int:
        """Input channels (timm's name)."""
        return self.input_shape[0]

    @property
    def classifier_name(self) -> str:
        return f"head.{len(self.head) - 1}"

    def get_classifier(self) -> nn.Module:
        return self.head[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh output layer for ``num_classes`` (0: none, the last hidden layer out)."""
        pool = default_pool(self.global_pool, num_classes) if global_pool is None else global_pool
        check_head_options(num_classes, pool, type(self).__name__)
        ref = self.encoder[1].weight
        self.head[-1] = linear_or_identity(self.head_hidden_size, num_classes).to(device=ref.device, dtype=ref.dtype).train(self.training)
        self.num_classes, self.global_pool = num_classes, pool

    def _solve(self, x: Tensor, unroll: int | None = None) -> tuple[Tensor, DEQSolution]:
        refuse_symbolic_tracing(x)
        if x.dim() < 2 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected inputs of shape (batch, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return self.deq(self.encoder(x), unroll=unroll)

    def forward_features(self, x: Tensor) -> Tensor:
        """The head's last hidden layer, ``(B, num_features)``."""
        return self.head[:-1](self._solve(x)[0])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head[-1](x)

    def forward(self, x: Tensor, return_solution: bool = False, unroll: int | None = None) -> Tensor | tuple[Tensor, DEQSolution]:  # type: ignore[override]
        z, solution = self._solve(x, unroll)
        logits = self.head(z)
        return (logits, solution) if return_solution else logits


def deq_mlp_mnist(**overrides: Any) -> DEQMLPClassifier:
    """The julialang.org DiffEqFlux blog post's MNIST DEQ (784-200-20 encoder, 20-10-10-20 cell with
    z + x injection, 20-15-10 head, ODE steady-state solver at tol 1e-2; ~0.16M parameters)."""
    return DEQMLPClassifier(**overrides)
