"""The MNIST DEQ of the DeepEquilibriumNetworks.jl blog post: a small MLP DEQ solved as a
continuous DEQ (ODE steady state)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
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
    """

    def __init__(
        self,
        in_features: int = 784,
        encoder: tuple[int, ...] = (200, 20),
        cell: tuple[int, ...] = (20, 10, 10, 20),
        head: tuple[int, ...] = (15,),
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        if encoder[-1] != cell[0]:
            raise ValueError(f"the encoder's output ({encoder[-1]}) must match the cell's state size ({cell[0]})")
        self.input_shape = tuple(input_shape)
        enc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip((in_features, *encoder[:-1]), encoder):
            enc += [nn.Linear(a, b), nn.Tanh()]
        self.encoder = nn.Sequential(*enc)
        kwargs = {"solver": "ode", "tol": 1e-2, "max_steps": 50, **deq_kwargs}
        self.deq = DEQ(MLPInjectionCell(cell), **kwargs)
        hd: list[nn.Module] = []
        for a, b in zip((cell[-1], *head), head):
            hd += [nn.Linear(a, b), nn.Tanh()]
        self.head = nn.Sequential(*hd, nn.Linear((cell[-1], *head)[-1], num_classes))

    def forward(self, x: Tensor, return_solution: bool = False, unroll: int | None = None) -> Tensor | tuple[Tensor, DEQSolution]:  # type: ignore[override]
        if x.dim() < 2 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected inputs of shape (batch, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        z, solution = self.deq(self.encoder(x), unroll=unroll)
        logits = self.head(z)
        return (logits, solution) if return_solution else logits


def deq_mlp_mnist(**overrides: Any) -> DEQMLPClassifier:
    """The DeepEquilibriumNetworks.jl blog's MNIST DEQ (784-200-20 encoder, 20-10-10-20 cell with
    z + x injection, 20-15-10 head, ODE steady-state solver at tol 1e-2; ~0.16M parameters)."""
    return DEQMLPClassifier(**overrides)
