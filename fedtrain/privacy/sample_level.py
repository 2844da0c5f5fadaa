"""Sample-level DP: each client runs DP-SGD; the coordinator keeps a mirror of
every client's ledger and reports the worst client's ε.

A client's privacy spend composes over every round it takes part in: its
events are ``(σ, q = batch/n, steps = epochs·⌈n/batch⌉)`` per round. Client
sampling is not credited with any amplification (a client cannot verify it
was sampled at random), so the ledger is an upper bound for every client.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedtrain.config import AccountantKind, PrivacyMode
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.dpsgd import DpSgdTask, client_event
from fedtrain.privacy.events import GaussianEvent
from fedtrain.privacy.policy import ClientPrivacy, PrivacyReport, Release
from fedtrain.types import ClientUpdate


class SampleLevelDP:
    """The coordinator's side of DP-SGD on the clients."""

    mode = PrivacyMode.SAMPLE

    def __init__(
        self,
        kind: AccountantKind,
        task: DpSgdTask,
        client_sizes: Mapping[str, int],
        batch_size: int,
        epochs: int,
        delta: float,
        max_epsilon: float,
    ) -> None:
        if task.noise_multiplier <= 0:
            raise ValueError(f"privacy.noise_multiplier = {task.noise_multiplier}: must be > 0")
        self.kind = kind
        self.task = task
        self.sizes = dict(client_sizes)
        self.batch_size = batch_size
        self.epochs = epochs
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.ledgers: dict[str, Accountant] = {}
        self.worst = 0.0

    def event(self, client_id: str) -> GaussianEvent:
        return client_event(self.task.noise_multiplier, self.sizes[client_id], self.batch_size, self.epochs)

    def _ledger(self, client_id: str) -> Accountant:
        if client_id not in self.ledgers:
            self.ledgers[client_id] = Accountant(self.kind)
        return self.ledgers[client_id]

    def client_privacy(self, rnd: int) -> ClientPrivacy:
        return ClientPrivacy(dp_sgd=self.task)

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None:
        if self.max_epsilon <= 0:
            return None
        for cid in cohort:
            after = self._ledger(cid).epsilon_if(self.event(cid), self.delta)
            if after > self.max_epsilon:
                return (
                    f"round {rnd} would raise client {cid}'s ε to {after:.4g} > "
                    f"privacy.max_epsilon = {self.max_epsilon}"
                )
        return None

    def release(self, rnd: int, cohort: Sequence[str], updates: Sequence[ClientUpdate]) -> Release:
        for cid in cohort:
            ledger = self._ledger(cid)
            ledger.compose(self.event(cid))
            self.worst = max(self.worst, ledger.epsilon(self.delta))
        return Release(tuple(updates))

    def report(self) -> PrivacyReport:
        return PrivacyReport(
            epsilon=self.worst,
            delta=self.delta,
            extra={"noise_multiplier": self.task.noise_multiplier},
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "ledgers": {cid: acc.state_dict() for cid, acc in self.ledgers.items()},
            "worst": self.worst,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ledgers = {}
        for cid, acc_state in state["ledgers"].items():
            self._ledger(cid).load_state_dict(acc_state)
        self.worst = float(state["worst"])
