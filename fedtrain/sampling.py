"""How the coordinator draws each round's cohort from the available clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from fedtrain.config import Sampling


class Sampler(Protocol):
    """Draws a round's cohort; ``expected_size`` and ``rate`` feed privacy accounting."""

    def sample(self, clients: Sequence[str], rng: np.random.Generator) -> tuple[str, ...]: ...

    def expected_size(self, num_clients: int) -> float: ...


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

    def expected_size(self, num_clients: int) -> float:
        return float(self.clients_per_round)


@dataclass(frozen=True)
class PoissonSampler:
    """Each client joins independently with probability ``rate``; the cohort
    size varies. This is the sampling under which privacy amplification by
    subsampling holds (Abadi et al. 2016; Mironov et al. 2019)."""

    rate: float

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"sampling rate = {self.rate}: must be in (0, 1]")

    def sample(self, clients: Sequence[str], rng: np.random.Generator) -> tuple[str, ...]:
        chosen = np.flatnonzero(rng.random(len(clients)) < self.rate)
        return tuple(clients[i] for i in chosen)

    def expected_size(self, num_clients: int) -> float:
        return self.rate * num_clients


def make_sampler(kind: Sampling, clients_per_round: int, num_clients: int) -> UniformSampler | PoissonSampler:
    """The sampler for ``strategy.sampling``; Poisson's rate is
    ``clients_per_round / num_clients`` so both draw the same expected cohort."""
    if kind is Sampling.POISSON:
        return PoissonSampler(clients_per_round / num_clients)
    return UniformSampler(clients_per_round)
