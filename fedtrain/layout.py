"""What is federated, and its map to one flat ``float32`` vector.

Only what trains travels: the parameters with ``requires_grad`` (a tensor
tied to two names, such as GPT-2's token embedding and head, once) and the
floating-point buffers of the modules they belong to (BatchNorm's running
statistics). Frozen parameters — a LoRA model's base — and the buffers of
frozen modules stay on each party as its model has them: they never travel,
get no noise and never enter secure aggregation; :func:`frozen_fingerprint`
lets a coordinator refuse a client whose frozen part differs from its own.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

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
            raise ValueError("model has no trainable floating-point parameters to federate")
        return cls(
            names=tuple(k for k, _ in items),
            shapes=tuple(tuple(v.shape) for _, v in items),
            dtypes=tuple(v.dtype for _, v in items),
        )

    @classmethod
    def of_model(cls, model: nn.Module) -> "ParamLayout":
        """The federated tensors of ``model``, in ``state_dict`` order (which
        for a model without buffers is its parameters' order)."""
        return cls.of(federated_state(model))

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


def _frozen(module: nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    return bool(own) and not any(p.requires_grad for p in own)


def federated_state(model: nn.Module) -> Params:
    """The tensors of ``model`` that are federated, by their ``state_dict``
    name: trainable parameters (the first name of a tied one) and the
    persistent floating-point buffers of modules that are not frozen (a
    module is frozen when it has parameters and none of them trains)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    modules = dict(model.named_modules())
    seen: set[int] = set()
    out: Params = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        if isinstance(tensor, nn.Parameter):
            keep = id(tensor) in trainable
        else:
            owner = modules.get(name.rpartition(".")[0])
            keep = tensor.is_floating_point() and owner is not None and not _frozen(owner)
        if keep:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(all, trainable)`` parameter counts of ``model``, a tied tensor once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def frozen_fingerprint(model: nn.Module, layout: ParamLayout) -> str:
    """SHA-256 (hex) of everything of ``model``'s state that stays on each
    party — names, shapes, dtypes and bytes of each tensor outside
    ``layout`` (a name tied to a federated tensor is the federated tensor) —
    and of the layout's own names and shapes: two parties with the same
    fingerprint train the same frozen model in the same layout."""
    h = hashlib.sha256()
    for name, shape in zip(layout.names, layout.shapes):
        h.update(f"federated {name} {shape}\n".encode())
    state = model.state_dict(keep_vars=True)
    federated = {id(state[n]) for n in layout.names}
    for name, tensor in state.items():
        if id(tensor) in federated:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"frozen {name} {tuple(t.shape)} {t.dtype}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
