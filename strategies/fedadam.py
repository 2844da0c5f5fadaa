"""FedAdam: Adam on the server, applied to the pseudo-gradient ``-Δ``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from fedtrain import ClientUpdate, ServerOptimizer, Strategy, UpdateKind, weighted_mean
from fedtrain import flag, fraction, positive, require_kind


class FedAdam(Strategy):
    """Server ``torch.optim.Adam(lr=server_lr, betas=(beta1, beta2), eps=tau)``
    stepped on ``-Δ``, ``Δ`` the weighted mean delta.

    ``tau`` is the adaptivity constant of Reddi et al. 2021. Unlike their
    Algorithm 2, ``torch.optim.Adam`` applies bias correction, so the first
    step moves each coordinate by about ``server_lr`` in the direction of ``Δ``.
    The moments are kept in :meth:`state_dict`.
    """

    needs_individual_updates = False

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        self.server_lr = positive("server_lr", server_lr)
        self.tau = positive("tau", tau)
        self.beta1 = fraction("beta1", beta1)
        self.beta2 = fraction("beta2", beta2)
        self.weighted = flag("weighted", weighted)
        lr, betas, eps = self.server_lr, (self.beta1, self.beta2), self.tau
        self._optimizer = ServerOptimizer(lambda ps: torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps))

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("FedAdam", updates, UpdateKind.DELTA)
        return self._optimizer.step(params, weighted_mean(updates, self.weighted))

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._optimizer.load_state_dict(state)
