"""How the coordinator draws each round's cohort, and where any sample's
randomness comes from.

Privacy amplification by subsampling — of clients into a cohort (user-level
and distributed DP) and of records into DP-SGD's batches (sample level) —
assumes the sample is secret: the analysis (Abadi et al. 2016, "Deep Learning
with Differential Privacy"; Mironov, Talwar & Zhang 2019, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism") credits an adversary with
everything but the coin flips. ``run.seed`` is published (``config.toml``,
``summary.json``), so a sample derived from it is no sample at all: everyone
can replay it. Under DP with ``privacy.secure_noise = true`` samples
therefore come from :class:`SecretRandomness`; the seeded sources
(:class:`SeededRandomness`, :class:`TorchRandomness`) remain for
reproducible experiments.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from fedtrain.config import PrivacyConfig, PrivacyMode, Sampling
from fedtrain.privacy.keystream import Keystream


class Randomness(Protocol):
    """A source of the coin flips and choices a sample is made of."""

    def bernoulli(self, count: int, p: float) -> np.ndarray:
        """``count`` independent booleans, each ``True`` with probability ``p``."""
        ...

    def choose(self, n: int, k: int) -> np.ndarray:
        """``k`` distinct indices of ``range(n)``, uniformly at random, ascending."""
        ...


def _check_choice(n: int, k: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"sample size k = {k}: must be in [0, n = {n}]")


@dataclass(frozen=True)
class SeededRandomness:
    """Draws from a seeded numpy ``Generator``: reproducible, not secret. The
    calls are those the samplers always made, so seeded runs stay
    bit-identical."""

    generator: np.random.Generator

    def bernoulli(self, count: int, p: float) -> np.ndarray:
        return self.generator.random(count) < p

    def choose(self, n: int, k: int) -> np.ndarray:
        _check_choice(n, k)
        return np.sort(self.generator.choice(n, size=k, replace=False))


@dataclass(frozen=True)
class TorchRandomness:
    """Draws from a seeded ``torch.Generator`` (a client's per-round generator):
    reproducible, not secret; ``bernoulli`` is DP-SGD's historical
    ``torch.rand(n) < q`` mask."""

    generator: torch.Generator

    def bernoulli(self, count: int, p: float) -> np.ndarray:
        return (torch.rand(count, generator=self.generator) < p).numpy()

    def choose(self, n: int, k: int) -> np.ndarray:
        _check_choice(n, k)
        return np.sort(torch.randperm(n, generator=self.generator)[:k].numpy())


class SecretRandomness:
    """Draws nobody can replay: coin flips from a
    :class:`~fedtrain.privacy.keystream.Keystream` (ChaCha20 under a key from
    :mod:`secrets`), choices from :class:`secrets.SystemRandom` (the operating
    system's CSPRNG; its ``sample`` draws each index with an unbiased
    ``randbelow``). There is no state to checkpoint: a resumed run draws from
    a fresh key, as :class:`~fedtrain.privacy.noise.SecureGaussian` does."""

    def __init__(self) -> None:
        self._stream = Keystream()
        self._system = secrets.SystemRandom()

    def bernoulli(self, count: int, p: float) -> np.ndarray:
        return self._stream.bernoulli(count, p).numpy()

    def choose(self, n: int, k: int) -> np.ndarray:
        _check_choice(n, k)
        return np.array(sorted(self._system.sample(range(n), k)), dtype=np.int64)


def secret_sampling(privacy: PrivacyConfig) -> bool:
    """Whether samples must be secret: under any DP mode with
    ``privacy.secure_noise = true`` (the default). With ``secure_noise =
    false`` the reported ε holds only while ``run.seed`` stays secret."""
    return privacy.mode is not PrivacyMode.NONE and privacy.secure_noise


class Sampler(Protocol):
    """Draws a round's cohort; ``expected_size`` and ``rate`` feed privacy accounting."""

    def sample(self, clients: Sequence[str], randomness: Randomness) -> tuple[str, ...]: ...

    def expected_size(self, num_clients: int) -> float: ...


@dataclass(frozen=True)
class UniformSampler:
    """A fixed-size cohort drawn uniformly without replacement."""

    clients_per_round: int

    def sample(self, clients: Sequence[str], randomness: Randomness) -> tuple[str, ...]:
        if self.clients_per_round > len(clients):
            raise ValueError(
                f"strategy.clients_per_round = {self.clients_per_round}: only {len(clients)} clients available"
            )
        return tuple(clients[i] for i in randomness.choose(len(clients), self.clients_per_round))

    def expected_size(self, num_clients: int) -> float:
        return float(self.clients_per_round)


@dataclass(frozen=True)
class PoissonSampler:
    """Each client joins independently with probability ``rate``; the cohort
    size varies. This is the sampling under which privacy amplification by
    subsampling holds (Abadi et al. 2016; Mironov et al. 2019), provided the
    coin flips are secret (see the module docstring)."""

    rate: float

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"sampling rate = {self.rate}: must be in (0, 1]")

    def sample(self, clients: Sequence[str], randomness: Randomness) -> tuple[str, ...]:
        chosen = np.flatnonzero(randomness.bernoulli(len(clients), self.rate))
        return tuple(clients[i] for i in chosen)

    def expected_size(self, num_clients: int) -> float:
        return self.rate * num_clients


def make_sampler(kind: Sampling, clients_per_round: int, num_clients: int) -> UniformSampler | PoissonSampler:
    """The sampler for ``strategy.sampling``; Poisson's rate is
    ``clients_per_round / num_clients`` so both draw the same expected cohort."""
    if kind is Sampling.POISSON:
        return PoissonSampler(clients_per_round / num_clients)
    return UniformSampler(clients_per_round)
