"""Synthetic(α, β): the federated data set of Li et al. 2020 ("Federated
Optimization in Heterogeneous Networks", FedProx, §5.1), generated per client
from the seed.

Client ``k`` draws ``u_k ~ N(0, α²)`` and ``B_k ~ N(0, β²)`` (standard
deviations α and β, as the authors' generator does), a local model
``W_k ~ N(u_k, 1)^{60×10}``, ``b_k ~ N(u_k, 1)^{10}`` and a feature mean
``v_k ~ N(B_k, 1)^{60}``; its records are ``x ~ N(v_k, Σ)`` with
``Σ = diag(j^{-1.2})`` and ``y = argmax(W_kᵀx + b_k)``. β shifts each
client's features, and so its label mix; every client has its own ``W_k``.
As in the authors' generator, ``u_k`` (scale α) shifts all classes' logits by
the same amount, so under the argmax it leaves the labels unchanged.
``iid=True`` is the paper's Synthetic-IID: one shared ``W, b`` and ``v = 0``
for every client.

Nothing is stored per client: a client's records are regenerated from
``(seed, k)`` whenever it is sampled, so 100,000 clients cost memory only for
the ones that train. Record counts follow the authors' lognormal(4, 2) + 50,
capped at :data:`MAX_RECORDS` so that a round's memory stays bounded (their
uncapped tail reaches 10⁵ records for one client among 10⁵ clients). Each
client trains on the first ``1 − test_fraction`` of its records; the rest
is held out and unused, so record counts are what they always were.

The test set is nobody's data. Accuracy on it is published every round
without any privacy accounting, so it must not be computed from any client's
records — nor from any client's own labelling model ``W_k`` or feature mean
``v_k``, which are what a client's records are made of. It is the held-out
share of :data:`TEST_CLIENTS` fresh *test clients*, drawn from the same prior
as the population but from their own random stream: children spawned from a
``SeedSequence`` of ``(seed, test stream)``, a stream no client's
``(seed, client stream, k)`` can equal. So it does not depend on
``num_clients``, and it measures what a deployed model meets: a client it
never trained on (the "participation gap" of Yuan et al. 2022, "What Do We
Mean by Generalization in Federated Learning?"). For Synthetic-IID that is
the shared model's accuracy. For the non-IID variant an unseen client's
``W_k`` and ``b_k`` are independent of every other client's, so given ``x``
its ten logits are exchangeable and its label is uniform: in expectation over
test clients no global model beats chance (0.1; the 200 realised test
clients' label mix lets a model land somewhat above it), and the non-IID
variant shows scale and heterogeneity, not accuracy. (Evaluating on the
population's own ``W_k`` would score better and leak exactly what
user-level DP protects.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DIMENSION = 60
CLASSES = 10
MAX_RECORDS = 1000
TEST_CLIENTS = 200
"""Fresh clients, outside the population, whose held-out records form the test set."""

_STREAM = 0x5E7
_TEST_STREAM = 0x7E57


def _record_counts(rng: np.random.Generator, count: int) -> np.ndarray:
    """The authors' lognormal(4, 2) + 50 records per client, capped at :data:`MAX_RECORDS`."""
    return np.minimum(rng.lognormal(4.0, 2.0, count).astype(np.int64) + 50, MAX_RECORDS)


class SyntheticData:
    """Synthetic(α, β) clients; implements :class:`fedtrain.data.clients.ClientData`.

    Each client's records are split into a training part (what ``load``
    returns) and a held-out ``test_fraction`` that nothing uses; the test
    set is the held-out share of :data:`TEST_CLIENTS` test clients outside
    the population (see the module docstring).
    """

    def __init__(
        self,
        num_clients: int,
        alpha: float,
        beta: float,
        test_fraction: float,
        seed: int,
        device: torch.device,
        iid: bool = False,
    ) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"data.synthetic_alpha = {alpha}, data.synthetic_beta = {beta}: must be >= 0")
        self.num_clients = num_clients
        self.alpha = alpha
        self.beta = beta
        self.test_fraction = test_fraction
        self.seed = seed
        self.device = device
        self.iid = iid
        shared = np.random.default_rng(np.random.SeedSequence([seed, _STREAM, 2**40]))
        self._shared_model = (shared.normal(0.0, 1.0, (DIMENSION, CLASSES)), shared.normal(0.0, 1.0, CLASSES))
        self._totals = _record_counts(np.random.default_rng(np.random.SeedSequence([seed, _STREAM])), num_clients)
        self._ids = tuple(str(k) for k in range(num_clients))
        self._std = np.arange(1, DIMENSION + 1, dtype=np.float64) ** (-1.2 / 2)

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def _split(self, total: int) -> int:
        return max(1, int(round(total * (1.0 - self.test_fraction))))

    def size(self, client_id: str) -> int:
        return self._split(int(self._totals[int(client_id)]))

    def _records(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` records of a client drawn from the prior with ``rng``."""
        u = rng.normal(0.0, self.alpha)
        b_mean = rng.normal(0.0, self.beta)
        weights = rng.normal(u, 1.0, (DIMENSION, CLASSES))
        bias = rng.normal(u, 1.0, CLASSES)
        v = rng.normal(b_mean, 1.0, DIMENSION)
        if self.iid:
            weights, bias = self._shared_model
            v = np.zeros(DIMENSION)
        x = v + rng.standard_normal((count, DIMENSION)) * self._std
        y = np.argmax(x @ weights + bias, axis=1)
        return x.astype(np.float32), y.astype(np.int64)

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def load(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(client_id)
        if not 0 <= k < self.num_clients:
            raise KeyError(f"no synthetic client {client_id!r}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _STREAM, k]))
        x, y = self._records(rng, int(self._totals[k]))
        n = self._split(len(y))
        return self._tensors(x[:n], y[:n])

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out share of :data:`TEST_CLIENTS` test clients drawn from
        the prior on their own stream: the same for every ``num_clients``."""
        root = np.random.SeedSequence([self.seed, _TEST_STREAM])
        totals = _record_counts(np.random.default_rng(root), TEST_CLIENTS)
        xs, ys = [], []
        for child, total in zip(root.spawn(TEST_CLIENTS), totals.tolist()):
            x, y = self._records(np.random.default_rng(child), total - self._split(total))
            xs.append(x)
            ys.append(y)
        return self._tensors(np.concatenate(xs), np.concatenate(ys))
