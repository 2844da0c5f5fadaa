"""Canaries for a one-run privacy audit (:mod:`fedtrain.audit`): what is
inserted into a run, and each canary's score after it.

Each of ``m`` canaries is included independently with probability ½ by a
coin from :mod:`secrets` (Steinke, Nasr & Jagielski 2023, "Privacy Auditing
with One (1) Training Run": the bound needs independent, fair, unpredictable
inclusion); an excluded canary never exists in the run. Two kinds:

* :class:`CanaryClients` (user-level DP, and runs without DP): Andrew et al.
  2024, "One-shot Empirical Privacy Estimation for Federated Learning"
  (ICLR 2024). A canary is a client of its own whose update, every round it is
  sampled, is one fixed isotropic random unit direction ``u_c`` scaled to the
  round's clip norm (``privacy.clip``, or the adaptive clip of that round),
  or without DP to the median norm of the first real updates seen
  (:data:`FALLBACK_NORM` before any), and claiming the median real client's
  record count (its FedAvg weight without DP; user-level DP weighs every
  client once): a typical client in all but its direction. It is sampled
  like every other client, at the configured rate, so amplification by
  sampling applies to it as to them.
  Score: ``⟨θ_T − θ_0, u_c⟩``. By telescoping this is the sum over rounds of
  the projections of each released model step, so it is the adversary of
  federated learning who sees every round's model and adds up its evidence.
* :class:`CanaryRecords` (sample-level DP): records with random inputs of the
  data's shape and range and random labels, each inserted into one client's
  training data (canary ``i`` into the ``i mod N``-th client). Score: minus
  the final model's loss on the record — a black-box audit, weaker than the
  white-box one but still a valid lower bound.
"""

from __future__ import annotations

import secrets
import statistics
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

from fedtrain.data.clients import ClientData
from fedtrain.training.executor import Executor, MappedSink, UpdateSink, takes_sink
from fedtrain.training.task import prediction
from fedtrain.training.train_task import TrainTask
from fedtrain.training.trainer import LocalTrainer
from fedtrain.types import ClientMetric, ClientUpdate, RoundOutcome, UpdateKind

FALLBACK_NORM = 1.0
"""A canary client's update norm without DP in the rounds before any real
client's update was seen (then the median of the first round's real norms)."""

SEED_BITS = 63
"""Bits of each canary's secret seed (a ``torch.Generator`` seed is a 64-bit integer)."""

CANARY_PREFIX = "canary-"

DIRECTION_CACHE_BYTES = 256 << 20
"""Memory the canary executor may keep directions in instead of drawing them
again each round (small models keep every one; large ones draw each anew)."""


@dataclass(frozen=True)
class CanaryDraw:
    """Which of the ``m`` canaries are in the run, and each one's secret seed."""

    included: tuple[bool, ...]
    seeds: tuple[int, ...]

    @classmethod
    def secret(cls, count: int) -> "CanaryDraw":
        """``count`` fair coins and seeds from the operating system's CSPRNG
        (:mod:`secrets`): nobody, ``run.seed`` included, can predict them."""
        if count < 2:
            raise ValueError(f"--canaries = {count}: an audit needs at least 2 canaries")
        included = tuple(bool(secrets.randbits(1)) for _ in range(count))
        seeds = tuple(secrets.randbits(SEED_BITS) for _ in range(count))
        return cls(included, seeds)

    @property
    def count(self) -> int:
        return len(self.included)


def canary_id(index: int) -> str:
    """The client id of canary ``index`` (never a real client's ``"0" … "N-1"``)."""
    return f"{CANARY_PREFIX}{index}"


def canary_direction(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    """An isotropic unit vector of ``numel`` coordinates: a normalised
    Gaussian from a generator seeded with ``seed``."""
    v = torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (v / v.norm()).to(device)


class CanaryPlan(Protocol):
    """What :func:`fedtrain.simulation.simulate` lets an audit add to a run:
    extra clients, extra records, an executor decorator; and the canaries'
    scores after the run."""

    draw: CanaryDraw

    def extra_clients(self) -> Mapping[str, int]:
        """The included canary clients (id → record count), joining the population."""
        ...

    def add_records_(self, data: ClientData) -> ClientData:
        """``data`` with the included canary records inserted."""
        ...

    def wrap_executor_(self, executor: Executor, trainer: LocalTrainer) -> Executor:
        """The run's executor, decorated; ``trainer`` holds the initial model."""
        ...

    def scores(self, final: torch.Tensor) -> list[float]:
        """Every canary's score (included or not) for the final flat model ``final``."""
        ...


class CanaryExecutor:
    """Trains the real clients of a round through ``inner`` (streaming into
    the sink as it would alone) and makes each sampled canary's update
    directly: ``±scale · u_c``, ``num_examples`` records, kind of the round's task (a
    gradient points against the step, so its sign flips: the model moves
    along ``u_c`` either way)."""

    def __init__(self, inner: Executor, seeds: Mapping[str, int], num_examples: int = 1) -> None:
        self.inner = inner
        self.seeds = dict(seeds)
        self.num_examples = num_examples
        self.real_norm: float | None = None
        self._directions: dict[str, torch.Tensor] = {}

    def _direction(self, client_id: str, numel: int, device: torch.device) -> torch.Tensor:
        u = self._directions.get(client_id)
        if u is None or u.numel() != numel or u.device != device:
            u = canary_direction(self.seeds[client_id], numel, device)
            if (len(self._directions) + 1) * numel * u.element_size() <= DIRECTION_CACHE_BYTES:
                self._directions[client_id] = u
        return u

    def _scale(self, task: TrainTask) -> float:
        if task.privacy.clip > 0:
            return task.privacy.clip
        return FALLBACK_NORM if self.real_norm is None else self.real_norm

    def _update(self, client_id: str, task: TrainTask, params: torch.Tensor) -> ClientUpdate:
        sign = -1.0 if task.kind is UpdateKind.GRADIENT else 1.0
        vector = self._direction(client_id, params.numel(), params.device) * (sign * self._scale(task))
        metrics = {ClientMetric.UNCLIPPED.value: 1.0} if task.privacy.clip > 0 else {}
        return ClientUpdate(client_id, vector, num_examples=self.num_examples, kind=task.kind, metrics=metrics)

    def train_round(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        sink: UpdateSink | None = None,
    ) -> RoundOutcome:
        real = [c for c in clients if c not in self.seeds]
        canaries = [c for c in clients if c in self.seeds]
        norms: list[float] = []

        def measured(update: ClientUpdate) -> ClientUpdate:
            norms.append(float(update.vector.norm()))
            return update

        outcome = RoundOutcome((), ())
        streaming = sink is not None and takes_sink(self.inner)
        if real:
            if streaming and sink is not None:
                outcome = self.inner.train_round(rnd, real, task, params, sink=MappedSink(sink, measured))
            else:
                outcome = self.inner.train_round(rnd, real, task, params)
            norms.extend(float(u.vector.norm()) for u in outcome.updates)
        if self.real_norm is None and norms:
            self.real_norm = statistics.median(norms)
        made = [self._update(c, task, params) for c in canaries]
        if streaming and sink is not None:
            for update in made:
                sink.push(update)
            return outcome
        return RoundOutcome((*outcome.updates, *made), outcome.failures)


class CanaryClients:
    """Canary clients (user level, and runs without DP): see the module docstring."""

    def __init__(self, draw: CanaryDraw) -> None:
        self.draw = draw
        self.seeds = {canary_id(i): s for i, (s, inside) in enumerate(zip(draw.seeds, draw.included)) if inside}
        self.initial: torch.Tensor | None = None
        self.executor: CanaryExecutor | None = None
        self.num_examples = 1

    def extra_clients(self) -> Mapping[str, int]:
        return {cid: self.num_examples for cid in self.seeds}

    def add_records_(self, data: ClientData) -> ClientData:
        """``data`` as it is; a canary client claims the median real client's
        record count (its FedAvg weight without DP; user-level DP weighs every
        client once)."""
        sizes = [data.size(cid) for cid in data.ids]
        self.num_examples = max(1, int(statistics.median(sizes))) if sizes else 1
        return data

    def wrap_executor_(self, executor: Executor, trainer: LocalTrainer) -> Executor:
        self.initial = trainer.layout.flatten(trainer.model.state_dict()).detach().to(trainer.device).clone()
        self.executor = CanaryExecutor(executor, self.seeds, self.num_examples)
        return self.executor

    def scores(self, final: torch.Tensor) -> list[float]:
        if self.initial is None:
            raise RuntimeError("CanaryClients.scores before the run: wrap_executor_() was never called")
        moved = (final.to(self.initial.device) - self.initial).to(torch.float32)
        return [float(moved @ canary_direction(seed, moved.numel(), moved.device)) for seed in self.draw.seeds]


class CanaryData:
    """A client's records with its canary records appended (same ids, larger sizes)."""

    def __init__(self, inner: ClientData, records: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.inner = inner
        self.records = dict(records)

    @property
    def ids(self) -> Sequence[str]:
        return self.inner.ids

    def size(self, client_id: str) -> int:
        extra = self.records.get(client_id)
        return self.inner.size(client_id) + (0 if extra is None else len(extra[1]))

    def load(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inner.load(client_id)
        extra = self.records.get(client_id)
        if extra is None:
            return x, y
        return torch.cat([x, extra[0].to(x.device)]), torch.cat([y, extra[1].to(y.device)])


def _uniform_like(template: torch.Tensor, count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    shape = (count, *template.shape[1:])
    if template.is_floating_point():
        return (low + (high - low) * torch.rand(shape, generator=generator)).to(template.dtype)
    return torch.randint(int(low), int(high) + 1, shape, generator=generator).to(template.dtype)


class CanaryRecords:
    """Canary records (sample level): see the module docstring."""

    def __init__(self, draw: CanaryDraw) -> None:
        self.draw = draw
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.trainer: LocalTrainer | None = None

    def extra_clients(self) -> Mapping[str, int]:
        return {}

    def add_records_(self, data: ClientData) -> ClientData:
        """Draw every canary record (inputs uniform over the range of the
        data's inputs, labels uniform over the labels' range) and insert
        the included ones."""
        ids = list(data.ids)
        loaded = [data.load(cid) for cid in ids]
        xs = [x for x, _ in loaded if len(x)]
        ys = [y for _, y in loaded if len(y)]
        if not xs:
            raise ValueError("audit: every client is empty; there is no record shape to make canaries of")
        generator = torch.Generator().manual_seed(secrets.randbits(SEED_BITS))
        m = self.draw.count
        self.x = _uniform_like(xs[0], m, min(float(x.min()) for x in xs), max(float(x.max()) for x in xs), generator)
        self.y = _uniform_like(ys[0], m, min(float(y.min()) for y in ys), max(float(y.max()) for y in ys), generator)
        chosen: dict[str, list[int]] = {}
        for i, inside in enumerate(self.draw.included):
            if inside:
                chosen.setdefault(ids[i % len(ids)], []).append(i)
        return CanaryData(data, {cid: (self.x[rows], self.y[rows]) for cid, rows in chosen.items()})

    def wrap_executor_(self, executor: Executor, trainer: LocalTrainer) -> Executor:
        self.trainer = trainer
        return executor

    def scores(self, final: torch.Tensor) -> list[float]:
        trainer = self.trainer
        if trainer is None or self.x is None or self.y is None:
            raise RuntimeError("CanaryRecords.scores before the run: add_records_() and wrap_executor_() were never called")
        before = trainer.layout.flatten(trainer.model.state_dict()).detach().clone()
        training = trainer.model.training
        trainer.load_(final)
        trainer.model.eval()
        try:
            with torch.no_grad():
                output = prediction(trainer.model(self.x.to(trainer.device)))
                losses = trainer.objective.per_record_loss(output, self.y.to(trainer.device))
        finally:
            trainer.model.train(training)
            trainer.load_(before)
        return [-float(v) for v in losses.reshape(len(self.y), -1).mean(dim=1)]
