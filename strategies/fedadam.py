"""FedAdam: Adam on the server, applied to the pseudo-gradient ``-Δ``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from fedtrain import ClientUpdate, ServerOptimizer, Strategy, UpdateKind, weighted_mean


class FedAdam(Strategy):
    """Server ``torch.optim.Adam(lr=server_lr, betas=(beta1, beta2), eps=tau)``
    stepped on ``-Δ``, ``Δ`` the weighted mean delta.

    ``tau`` is the adaptivity constant of Reddi et al. 2021. Unlike their
    Algorithm 2, ``torch.optim.Adam`` applies bias correction, so the first
    step moves each coordinate by about ``server_lr`` in the direction of ``Δ``.
    The moments are kept in :meth:`state_dict`.
    """

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        for name, value in (("server_lr", server_lr), ("tau", tau)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a finite number > 0")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} = {value!r}: must be in [0, 1)")
        if not isinstance(weighted, bool):
            raise ValueError(f"weighted = {weighted!r}: must be true or false")
        self.server_lr, self.beta1, self.beta2, self.tau = (
            float(server_lr), float(beta1), float(beta2), float(tau))
        self.weighted = weighted
        lr, betas, eps = self.server_lr, (self.beta1, self.beta2), self.tau
        self._optimizer = ServerOptimizer(lambda ps: torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps))

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        bad = [u.client_id for u in updates if u.kind != UpdateKind.DELTA]
        if bad:
            raise ValueError(f"FedAdam aggregates model deltas; clients {bad} sent another kind")
        return self._optimizer.step(params, weighted_mean(updates, self.weighted))

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._optimizer.load_state_dict(state)
