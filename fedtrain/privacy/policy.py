"""What the engine asks of a privacy setting, and the setting with no privacy.

A policy tells clients how to protect their work (:meth:`client_privacy`),
says before a round whether the budget allows it (:meth:`check`), and turns
the round's valid updates into what the strategy may see (:meth:`release`),
composing the round's privacy cost into its ledger *first*, so that no model
computed from a round leaves the coordinator without its cost recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from fedtrain.aggregation import Reduction, UpdateFold, strategy_reduction
from fedtrain.config import PrivacyMode
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.events import GaussianEvent
from fedtrain.types import ClientUpdate

COORDINATOR_LEDGER = "coordinator"
"""The ledger name in :attr:`Release.events` of a policy that keeps one
ledger for the whole run (user-level and distributed DP)."""


@dataclass(frozen=True)
class ClientPrivacy:
    """How clients protect a round's work: clip the update (user level) and/or
    train with DP-SGD (sample level).

    ``distributed_noise`` (distributed DP) is the std ``z·C`` of the Gaussian
    noise the round's sum must carry; inside secure aggregation each of the
    ``n`` planned clients adds ``N(0, (distributed_noise / √n)²)`` to its
    clipped update (see :mod:`fedtrain.privacy.distributed`).

    ``noise_multipliers`` (sample level with ``privacy.target_epsilon``) is
    each client's own DP-SGD noise multiplier, calibrated from its own record
    count, so that no client's size sets another's noise. An executor hands a
    client :meth:`for_client`'s setting; ``dp_sgd.noise_multiplier`` is the
    largest of them, what a client missing from the map trains with.
    ``excluded`` names the clients the policy leaves out (e.g. below
    ``privacy.min_records``) with the reason: an executor does not train them
    and reports the reason as their failure (:meth:`refusal`).
    """

    clip: float = 0.0
    dp_sgd: DpSgdTask | None = None
    distributed_noise: float = 0.0
    noise_multipliers: Mapping[str, float] = field(default_factory=dict, hash=False)
    excluded: Mapping[str, str] = field(default_factory=dict, hash=False)

    def refusal(self, client_id: str) -> str | None:
        """Why client ``client_id`` may not train under this setting, or None."""
        return self.excluded.get(client_id)

    def noise_multiplier_for(self, client_id: str) -> float:
        """Client ``client_id``'s DP-SGD noise multiplier (0.0 without DP-SGD)."""
        if self.dp_sgd is None:
            return 0.0
        return self.noise_multipliers.get(client_id, self.dp_sgd.noise_multiplier)

    def for_client(self, client_id: str) -> ClientPrivacy:
        """The setting client ``client_id`` trains with: DP-SGD at its own noise
        multiplier, and nothing about the other clients."""
        if not self.noise_multipliers and not self.excluded:
            return self
        dp_sgd = self.dp_sgd
        own = self.noise_multipliers.get(client_id)
        if dp_sgd is not None and own is not None:
            dp_sgd = replace(dp_sgd, noise_multiplier=own)
        return ClientPrivacy(self.clip, dp_sgd, self.distributed_noise)


@dataclass(frozen=True)
class Release:
    """The updates a strategy may aggregate, and those refused with a reason."""

    updates: tuple[ClientUpdate, ...]
    rejected: tuple[tuple[str, str], ...] = ()
    events: Mapping[str, tuple[GaussianEvent, ...]] = field(default_factory=dict)
    """The privacy events this release composed, by ledger (``COORDINATOR_LEDGER``,
    or a client id at sample level). The engine journals them before the round
    is published, so that a resume whose checkpoint lost this ledger composes
    them again (:meth:`PrivacyPolicy.compose_release_`) instead of forgetting
    a release that was seen."""


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

    def compose_release_(self, events: Mapping[str, Sequence[GaussianEvent]]) -> None:
        """Compose a release made earlier, as its :attr:`Release.events` said."""
        ...


@runtime_checkable
class FoldingPolicy(Protocol):
    """A policy whose release depends on the round's updates only through
    their sum or mean, so that the engine folds them in as they arrive
    (:class:`~fedtrain.aggregation.UpdateFold`) instead of holding the cohort.

    The engine admits each update that passed validation (:meth:`admit`,
    which sees its norm), folds the admitted ones as :meth:`reduction` says,
    and calls :meth:`release_fold` once instead of :meth:`PrivacyPolicy.release`;
    the release it returns is the one :meth:`PrivacyPolicy.release` would give
    for the same updates (its ``rejected`` left to :meth:`admit`).
    """

    def reduction(self, needs_individual_updates: bool, weighted: bool) -> Reduction | None:
        """How the round's updates are folded for a strategy with these
        properties, or None when they may not be (the strategy must see each)."""
        ...

    def admit(self, update: ClientUpdate, norm: float) -> str | None:
        """Why the policy refuses a valid ``update`` of L2 norm ``norm``, or None."""
        ...

    def release_fold(self, rnd: int, cohort: Sequence[str], fold: UpdateFold, validated: int) -> Release:
        """The round's release from the admitted updates folded in ``fold``;
        ``validated`` counts the updates that passed validation, admitted or not."""
        ...


def fold_release(fold: UpdateFold, events: Mapping[str, tuple[GaussianEvent, ...]] | None = None) -> Release:
    """The release of a policy that passes the admitted updates through: the
    fold's one mean update (nothing when no update was admitted)."""
    return Release((fold.aggregate(),) if fold.count else (), (), dict(events or {}))


def coordinator_events(events: Mapping[str, Sequence[GaussianEvent]], mode: PrivacyMode) -> tuple[GaussianEvent, ...]:
    """The events of a one-ledger policy's release; raises, naming the ledger,
    on events of any other ledger (they belong to another privacy mode)."""
    unknown = sorted(set(events) - {COORDINATOR_LEDGER})
    if unknown:
        raise ValueError(
            f"release events ledger {unknown[0]!r}: privacy.mode = {mode.value!r} keeps one ledger, "
            f"{COORDINATOR_LEDGER!r}"
        )
    return tuple(events.get(COORDINATOR_LEDGER, ()))


class NoPrivacy:
    """Updates pass unchanged; nothing is accounted."""

    mode = PrivacyMode.NONE

    def client_privacy(self, rnd: int) -> ClientPrivacy:
        return ClientPrivacy()

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None:
        return None

    def release(self, rnd: int, cohort: Sequence[str], updates: Sequence[ClientUpdate]) -> Release:
        return Release(tuple(updates))

    def reduction(self, needs_individual_updates: bool, weighted: bool) -> Reduction | None:
        return strategy_reduction(needs_individual_updates, weighted)

    def admit(self, update: ClientUpdate, norm: float) -> str | None:
        return None

    def release_fold(self, rnd: int, cohort: Sequence[str], fold: UpdateFold, validated: int) -> Release:
        return fold_release(fold)

    def report(self) -> PrivacyReport:
        return PrivacyReport()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError("privacy.mode = 'none' keeps no privacy state")

    def compose_release_(self, events: Mapping[str, Sequence[GaussianEvent]]) -> None:
        if any(events.values()):
            raise ValueError(f"release events for ledgers {sorted(events)}: privacy.mode = 'none' keeps no ledger")
