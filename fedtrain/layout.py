"""The map between a model's named tensors and one flat ``float32`` vector."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from fedtrain.types import Params


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and dtypes of the floating-point tensors of a model state.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are not
    federated: they stay as each model has them.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, state: Params) -> "ParamLayout":
        items = [(k, v) for k, v in state.items() if v.is_floating_point()]
        if not items:
            raise ValueError("model has no floating-point parameters to federate")
        return cls(
            names=tuple(k for k, _ in items),
            shapes=tuple(tuple(v.shape) for _, v in items),
            dtypes=tuple(v.dtype for _, v in items),
        )

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, state: Params, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the layout's tensors of ``state`` into one flat float32 vector."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"state lacks parameters {missing}")
        parts = [state[n].detach().reshape(-1).to(torch.float32) for n in self.names]
        if out is None:
            return torch.cat(parts)
        return torch.cat(parts, out=out)

    def unflatten(self, vector: torch.Tensor) -> Params:
        """Named tensors (copies in the original dtypes) from a flat vector."""
        if vector.shape != (self.numel,):
            raise ValueError(
                f"vector has shape {tuple(vector.shape)}, the layout needs ({self.numel},)"
            )
        chunks = torch.split(vector.detach(), self.sizes)
        return {
            n: c.reshape(s).to(d, copy=True)
            for n, s, d, c in zip(self.names, self.shapes, self.dtypes, chunks)
        }

    def views(self, vector: torch.Tensor) -> Params:
        """Named views into a flat vector (no copy), for in-place loading; of a
        ``(k, numel)`` matrix, ``(k, *shape)`` views of its rows."""
        chunks = torch.split(vector, self.sizes, dim=-1)
        lead = tuple(vector.shape[:-1])
        return {n: c.view(*lead, *s) for n, s, c in zip(self.names, self.shapes, chunks)}
