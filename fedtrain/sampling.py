"""How the coordinator draws each round's cohort from the available clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class UniformSampler:
    """A fixed-size cohort drawn uniformly without replacement."""

    clients_per_round: int

    def sample(self, clients: Sequence[str], rng: np.random.Generator) -> tuple[str, ...]:
        if self.clients_per_round > len(clients):
            raise ValueError(
                f"strategy.clients_per_round = {self.clients_per_round}: only {len(clients)} clients available"
            )
        chosen = rng.choice(len(clients), size=self.clients_per_round, replace=False)
        return tuple(clients[i] for i in np.sort(chosen))
