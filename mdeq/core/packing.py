"""Packing a state (a tensor or a tuple of tensors) into one flat (batch, dim) tensor."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

State = Union[Tensor, tuple[Tensor, ...]]


def _describe(z: object) -> str:
    if isinstance(z, Tensor):
        return f"tensor of shape {tuple(z.shape)}"
    if isinstance(z, (tuple, list)):
        return "(" + ", ".join(_describe(t) for t in z) + ")"
    return type(z).__name__


class StatePacker:
    """Flattens a state with a shared batch dimension into (batch, dim) and back.

    A state is a single tensor or a tuple of tensors of different per-sample shapes (one per
    scale). :meth:`pack` concatenates the flattened parts; :meth:`unpack` returns views of the
    flat tensor. The per-sample shapes are fixed at construction; anything else is an error that
    names expected and actual shapes.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], is_tuple: bool) -> None:
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        self.is_tuple = bool(is_tuple)
        if not self.is_tuple and len(self.shapes) != 1:
            raise ValueError("a single-tensor state has exactly one shape")
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        self.dim = sum(self.sizes)

    @classmethod
    def from_state(cls, z: State) -> "StatePacker":
        """Packer for states shaped like ``z`` (batch dimension first)."""
        if isinstance(z, Tensor):
            if z.dim() < 1:
                raise ValueError("a state needs a batch dimension; got a 0-d tensor")
            return cls([z.shape[1:]], is_tuple=False)
        if isinstance(z, (tuple, list)) and z and all(isinstance(t, Tensor) for t in z):
            if any(t.dim() == 0 for t in z) or any(t.shape[0] != z[0].shape[0] for t in z[1:]):  # (no set: symbolic sizes under torch.export)
                raise ValueError(f"all parts of a tuple state need the same batch size; got {_describe(z)}")
            return cls([t.shape[1:] for t in z], is_tuple=True)
        raise TypeError(f"a state must be a tensor or a non-empty tuple of tensors, got {_describe(z)}")

    def expected(self, batch: int | str = "B") -> str:
        parts = [f"({batch}, {', '.join(map(str, s))})" if s else f"({batch},)" for s in self.shapes]
        return "(" + ", ".join(parts) + ")" if self.is_tuple else parts[0]

    def check(self, z: State, what: str = "state") -> None:
        """Raise a clear error if ``z`` does not have this packer's structure and shapes."""
        parts = z if isinstance(z, (tuple, list)) else None
        ok = (parts is not None) == self.is_tuple
        if ok:
            parts = tuple(parts) if parts is not None else (z,)
            ok = len(parts) == len(self.shapes) and all(
                isinstance(t, Tensor) and t.dim() >= 1 and tuple(t.shape[1:]) == s for t, s in zip(parts, self.shapes)
            )
            ok = ok and all(t.shape[0] == parts[0].shape[0] for t in parts[1:])
        if not ok:
            raise ValueError(f"{what} has the wrong shape: expected {self.expected()}, got {_describe(z)}")

    def pack(self, z: State, what: str = "state") -> Tensor:
        """(batch, dim) tensor holding all parts of ``z``."""
        self.check(z, what)
        if not self.is_tuple:
            return z.reshape(z.shape[0], self.dim)  # type: ignore[union-attr]
        return torch.cat([t.reshape(t.shape[0], n) for t, n in zip(z, self.sizes)], dim=1)  # type: ignore[union-attr]

    def unpack(self, flat: Tensor) -> State:
        """Views of ``flat`` shaped like the state."""
        b = flat.shape[0]
        if not self.is_tuple:
            return flat.reshape(b, *self.shapes[0])
        return tuple(p.reshape(b, *s) for p, s in zip(torch.split(flat, self.sizes, dim=1), self.shapes))
