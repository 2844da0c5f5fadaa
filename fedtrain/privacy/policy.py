"""What the engine asks of a privacy setting, and the setting with no privacy.

A policy tells clients how to protect their work (:meth:`client_privacy`),
says before a round whether the budget allows it (:meth:`check`), and turns
the round's valid updates into what the strategy may see (:meth:`release`),
composing the round's privacy cost into its ledger *first*, so that no model
computed from a round leaves the coordinator without its cost recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from fedtrain.config import PrivacyMode
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.types import ClientUpdate


@dataclass(frozen=True)
class ClientPrivacy:
    """How clients protect a round's work: clip the update (user level) and/or
    train with DP-SGD (sample level).

    ``distributed_noise`` (distributed DP) is the std ``z·C`` of the Gaussian
    noise the round's sum must carry; inside secure aggregation each of the
    ``n`` planned clients adds ``N(0, (distributed_noise / √n)²)`` to its
    clipped update (see :mod:`fedtrain.privacy.distributed`).
    """

    clip: float = 0.0
    dp_sgd: DpSgdTask | None = None
    distributed_noise: float = 0.0


@dataclass(frozen=True)
class Release:
    """The updates a strategy may aggregate, and those refused with a reason."""

    updates: tuple[ClientUpdate, ...]
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PrivacyReport:
    """The privacy state after a round, for ``metrics.jsonl``."""

    epsilon: float | None = None
    delta: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)


class BudgetExhausted(RuntimeError):
    """The next round would exceed ``privacy.max_epsilon``."""


class PrivacyPolicy(Protocol):
    mode: PrivacyMode

    def client_privacy(self, rnd: int) -> ClientPrivacy: ...

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None: ...

    def release(self, rnd: int, cohort: Sequence[str], updates: Sequence[ClientUpdate]) -> Release: ...

    def report(self) -> PrivacyReport: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class NoPrivacy:
    """Updates pass unchanged; nothing is accounted."""

    mode = PrivacyMode.NONE

    def client_privacy(self, rnd: int) -> ClientPrivacy:
        return ClientPrivacy()

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None:
        return None

    def release(self, rnd: int, cohort: Sequence[str], updates: Sequence[ClientUpdate]) -> Release:
        return Release(tuple(updates))

    def report(self) -> PrivacyReport:
        return PrivacyReport()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError("privacy.mode = 'none' keeps no privacy state")
