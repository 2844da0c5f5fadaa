"""Where each client's records come from: the view an executor has of the data.

An executor asks for one client's records only when that client trains, so
memory grows with the cohort, not with the population: partitions are index
lists into one in-memory data set, and a generated federated data set
(:mod:`fedtrain.data.synthetic`) makes a client's records from the seed on
demand.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np
import torch


class ClientData(Protocol):
    """The training records of every client, by client id."""

    @property
    def ids(self) -> Sequence[str]: ...

    def size(self, client_id: str) -> int: ...

    def load(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]: ...


class PartitionedData:
    """Clients as index lists into one data set held in memory (on ``device``)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        partitions: Mapping[str, np.ndarray],
        device: torch.device,
    ) -> None:
        self.x = x.to(device)
        self.y = y.to(device)
        self._indices = {
            cid: torch.as_tensor(idx, dtype=torch.long, device=device) for cid, idx in partitions.items()
        }
        self._ids = tuple(partitions)

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def size(self, client_id: str) -> int:
        return len(self._indices[client_id])

    def load(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._indices[client_id]
        return self.x[idx], self.y[idx]


def partitions_by_id(parts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Client ids ``"0" … "N-1"`` for a list of partitions."""
    return {str(i): p for i, p in enumerate(parts)}
