"""Sample-level DP: each client runs DP-SGD; the coordinator keeps a mirror of
every client's ledger and reports the worst client's ε.

A client's privacy spend composes over every round it takes part in: its
events are ``(σ, q = batch/n, steps = epochs·⌈n/batch⌉)`` per round. Client
sampling is not credited with any amplification (a client cannot verify it
was sampled at random), so the ledger is an upper bound for every client.

Record counts come from the clients (a deployed client declares its own), so
no count may set another client's privacy or utility:

* with ``privacy.target_epsilon`` each client's σ is calibrated from its own
  ``n`` (:func:`calibrate_client_noise`), so that its own ε after
  ``run.rounds`` rounds meets the target; a client claiming one record gets a
  large σ for itself instead of for everyone;
* a client with fewer than ``privacy.min_records`` records is left out
  (:func:`size_refusal`) with a logged reason: DP-SGD on a handful of records
  is mostly noise, which an unweighted strategy would average in at full
  weight.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Sequence

from fedtrain.config import AccountantKind, Config, ConfigError, GradSampleMode, PrivacyMode
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.dpsgd import DpSgdTask, client_event
from fedtrain.privacy.events import GaussianEvent
from fedtrain.aggregation import Reduction, UpdateFold, strategy_reduction
from fedtrain.privacy.policy import ClientPrivacy, PrivacyReport, Release, fold_release
from fedtrain.types import MAX_RECORDS, ClientUpdate

log = logging.getLogger(__name__)


def min_records(config: Config) -> int:
    """The fewest records a client may join ``config``'s run with:
    ``privacy.min_records`` under sample-level DP, else 1."""
    return config.privacy.min_records if config.privacy.mode is PrivacyMode.SAMPLE else 1


def size_refusal(num_records: int, minimum: int) -> str | None:
    """Why a client declaring ``num_records`` records cannot take part when
    the run allows ``minimum`` … :data:`~fedtrain.types.MAX_RECORDS`, or None."""
    if isinstance(num_records, bool) or not isinstance(num_records, int):
        return f"num_records = {num_records!r}: expected an integer"
    if num_records > MAX_RECORDS:
        return f"num_records = {num_records}: more than the {MAX_RECORDS} records a client may declare"
    if num_records < minimum:
        if minimum > 1:
            return (
                f"num_records = {num_records}: below privacy.min_records = {minimum} "
                "(DP-SGD on fewer records is mostly noise)"
            )
        return f"num_records = {num_records}: a client needs at least 1 record"
    return None


def calibrate_client_noise(
    target_epsilon: float,
    delta: float,
    kind: AccountantKind,
    client_sizes: Mapping[str, int],
    batch_size: int,
    epochs: int,
    rounds: int,
) -> dict[str, float]:
    """Each client's DP-SGD noise multiplier: the smallest whose ε after
    taking part in all ``rounds`` rounds is at most ``target_epsilon`` for
    that client alone (:func:`fedtrain.privacy.accountant.calibrate_noise`,
    which checks with the ledger's own accountant). Clients whose rounds are
    the same event share one calibration (cached: a resumed run or a
    rebuilt policy pays nothing)."""
    noise: dict[str, float] = {}
    for cid, n in client_sizes.items():
        event = client_event(1.0, n, batch_size, epochs)
        try:
            noise[cid] = _calibrated(target_epsilon, delta, kind, event.sample_rate, event.steps * rounds)
        except ValueError as exc:
            raise ConfigError(
                f"privacy.target_epsilon = {target_epsilon}: cannot be reached for client {cid} ({n} records: "
                f"sample rate {event.sample_rate:.4g} over {event.steps * rounds} steps) at δ = {delta} ({exc})"
            ) from exc
    return noise


@functools.lru_cache(maxsize=4096)
def _calibrated(target_epsilon: float, delta: float, kind: AccountantKind, sample_rate: float, steps: int) -> float:
    from fedtrain.privacy.accountant import calibrate_noise

    return calibrate_noise(target_epsilon, delta, sample_rate, steps, kind)


class SampleLevelDP:
    """The coordinator's side of DP-SGD on the clients.

    ``noise_multipliers`` gives each client its own σ (default: the task's
    for all); ``excluded`` names the clients left out, with the reason each
    gets as its failure whenever it is asked to train.
    """

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
        noise_multipliers: Mapping[str, float] | None = None,
        excluded: Mapping[str, str] | None = None,
    ) -> None:
        if task.noise_multiplier <= 0:
            raise ValueError(f"privacy.noise_multiplier = {task.noise_multiplier}: must be > 0")
        self.sizes = dict(client_sizes)
        for cid, n in self.sizes.items():
            reason = size_refusal(n, 1)
            if reason is not None:
                raise ValueError(f"client {cid}: {reason}; leave it out through excluded")
        given = dict(noise_multipliers or {})
        unknown = sorted(set(given) - set(self.sizes))
        if unknown:
            raise ValueError(f"noise_multipliers: client {unknown[0]} has no record count in client_sizes")
        self.noise = {cid: float(given.get(cid, task.noise_multiplier)) for cid in self.sizes}
        low = min(self.noise.items(), key=lambda item: item[1], default=("", task.noise_multiplier))
        if low[1] <= 0:
            raise ValueError(f"noise_multipliers[{low[0]!r}] = {low[1]}: must be > 0")
        self.kind = kind
        self.task = task
        self.excluded = dict(excluded or {})
        self.batch_size = batch_size
        self.epochs = epochs
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.ledgers: dict[str, Accountant] = {}
        self.worst = 0.0
        self._own = {cid: s for cid, s in self.noise.items() if s != task.noise_multiplier}

    @classmethod
    def of(cls, config: Config, client_sizes: Mapping[str, int], mode: GradSampleMode) -> SampleLevelDP:
        """The policy of ``config`` for clients of ``client_sizes`` records:
        clients below ``privacy.min_records`` left out (logged), the others'
        noise configured or calibrated each for itself. ``mode`` is the
        resolved Opacus mode."""
        p, c = config.privacy, config.client
        admitted: dict[str, int] = {}
        excluded: dict[str, str] = {}
        for cid, n in client_sizes.items():
            reason = size_refusal(n, p.min_records)
            if reason is None:
                admitted[cid] = n
            else:
                excluded[cid] = f"left out of sample-level DP: {reason}"
                log.warning("client %s left out: %s", cid, reason)
        if not admitted:
            largest = max(client_sizes.values(), default=0)
            raise ConfigError(
                f"privacy.min_records = {p.min_records}: no client has that many records "
                f"(the largest has {largest}); lower it or give the clients more data"
            )
        if p.noise_multiplier > 0:
            noise = {cid: p.noise_multiplier for cid in admitted}
        else:
            noise = calibrate_client_noise(
                p.target_epsilon, p.delta, p.accountant, admitted, c.batch_size, c.epochs, config.run.rounds
            )
        task = DpSgdTask(
            noise_multiplier=max(noise.values()),
            max_grad_norm=p.max_grad_norm,
            mode=mode,
            secure_noise=p.secure_noise,
        )
        return cls(
            kind=p.accountant, task=task, client_sizes=admitted, batch_size=c.batch_size, epochs=c.epochs,
            delta=p.delta, max_epsilon=p.max_epsilon, noise_multipliers=noise, excluded=excluded,
        )

    def event(self, client_id: str) -> GaussianEvent:
        """Client ``client_id``'s privacy event of one round, at its own σ."""
        return client_event(self.noise[client_id], self.sizes[client_id], self.batch_size, self.epochs)

    def _ledger(self, client_id: str) -> Accountant:
        if client_id not in self.ledgers:
            self.ledgers[client_id] = Accountant(self.kind)
        return self.ledgers[client_id]

    def client_privacy(self, rnd: int) -> ClientPrivacy:
        return ClientPrivacy(dp_sgd=self.task, noise_multipliers=self._own, excluded=self.excluded)

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None:
        if self.max_epsilon <= 0:
            return None
        for cid in cohort:
            if cid not in self.sizes:
                continue
            after = self._ledger(cid).epsilon_if(self.event(cid), self.delta)
            if after > self.max_epsilon:
                return (
                    f"round {rnd} would raise client {cid}'s ε to {after:.4g} > "
                    f"privacy.max_epsilon = {self.max_epsilon}"
                )
        return None

    def release(self, rnd: int, cohort: Sequence[str], updates: Sequence[ClientUpdate]) -> Release:
        """Compose each admitted client's round; an update from a client left
        out is refused (its executor should not have trained it)."""
        events = {cid: (self.event(cid),) for cid in cohort if cid in self.sizes}
        self.compose_release_(events)
        refused = [(u.client_id, self.excluded[u.client_id]) for u in updates if u.client_id in self.excluded]
        return Release(tuple(u for u in updates if u.client_id not in self.excluded), tuple(refused), events)

    def reduction(self, needs_individual_updates: bool, weighted: bool) -> Reduction | None:
        """The strategy's own reduction: the release passes updates through."""
        return strategy_reduction(needs_individual_updates, weighted)

    def admit(self, update: ClientUpdate, norm: float) -> str | None:
        """The reason of a client left out, as :meth:`release` refuses it."""
        return self.excluded.get(update.client_id)

    def release_fold(self, rnd: int, cohort: Sequence[str], fold: UpdateFold, validated: int) -> Release:
        """:meth:`release` of the admitted updates, folded into one mean."""
        events = {cid: (self.event(cid),) for cid in cohort if cid in self.sizes}
        self.compose_release_(events)
        return fold_release(fold, events)

    def compose_release_(self, events: Mapping[str, Sequence[GaussianEvent]]) -> None:
        for cid, client_events in events.items():
            ledger = self._ledger(cid)
            for event in client_events:
                ledger.compose(event)
            self.worst = max(self.worst, ledger.epsilon(self.delta))

    def epsilon(self, client_id: str) -> float:
        """Client ``client_id``'s ε so far (0.0 before its first round)."""
        return self._ledger(client_id).epsilon(self.delta) if client_id in self.ledgers else 0.0

    def report(self) -> PrivacyReport:
        """The worst client's ε; the smallest and the largest noise multiplier
        any client trains with (equal without per-client calibration)."""
        return PrivacyReport(
            epsilon=self.worst,
            delta=self.delta,
            extra={
                "noise_multiplier": min(self.noise.values(), default=self.task.noise_multiplier),
                "max_noise_multiplier": max(self.noise.values(), default=self.task.noise_multiplier),
            },
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
