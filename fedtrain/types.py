"""Plain data that crosses the boundaries of one federated round.

Everything here is a frozen dataclass or an enum: the engine, the executors and
the strategies exchange these values and nothing else, so a strategy never
learns whether it runs in a simulation or in a deployment.

Model parameters travel as one flat ``float32`` vector (see
:class:`fedtrain.layout.ParamLayout`): aggregation then is a single matrix-vector
product over a stacked buffer, the fastest reduction on a CPU, and every
strategy (median, Krum, server optimisers) is a few lines of vector algebra.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

Params = dict[str, torch.Tensor]
"""A model's state by name, as ``torch.nn.Module.state_dict`` returns it."""

MAX_RECORDS = 10**9
"""The most training records one client may declare (in its hello, or as an
update's ``num_examples``). Counts come from the clients and weight every
aggregate: the bound keeps a weight a plain float (``10**400`` overflows one)
and leaves no client a share of an average that a genuine data set could not
earn; a billion records is beyond any one client of a federated run."""


class ClientMetric(str, enum.Enum):
    """The metrics a client may report with its update; anything else is refused.

    ``TRAIN_LOSS``: mean training loss of the round (only without DP: nothing
    accounts for it). ``UNCLIPPED``: 1.0 when the update's norm was within the
    user-level clip before clipping, else 0.0 (adaptive clipping counts it).
    """

    TRAIN_LOSS = "train_loss"
    UNCLIPPED = "unclipped"


class UpdateKind(str, enum.Enum):
    """What a client sends back.

    ``DELTA``: ``local − global`` after local training (model averaging, FedAvg).
    ``GRADIENT``: the mean gradient of the loss over the client's data at the
    global model, without a local step (gradient aggregation, FedSGD).
    """

    DELTA = "delta"
    GRADIENT = "gradient"


@dataclass(frozen=True)
class RoundPlan:
    """What a strategy asks of the clients in one round.

    ``clients`` is the subset of the sampled cohort that trains (usually all of
    it). ``proximal_mu`` adds FedProx' term ``mu/2 ||w - w_global||^2`` to the
    local loss (Li et al. 2020, "Federated Optimization in Heterogeneous
    Networks").
    """

    clients: tuple[str, ...]
    kind: UpdateKind = UpdateKind.DELTA
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round.

    ``vector`` is a flat ``float32`` tensor in the global model's layout: the
    model delta or the gradient, as ``kind`` says. ``num_examples`` is the
    number of training records behind it (the FedAvg weight): an integer in
    1 … :data:`MAX_RECORDS` per contributor. ``metrics`` holds only
    :class:`ClientMetric` names with finite float values
    (:func:`fedtrain.validation.rejection_reason` refuses anything else).
    ``contributors`` is how many clients it stands for: 1, or, for the one
    update secure aggregation yields, the clients whose updates it sums.
    """

    client_id: str
    vector: torch.Tensor
    num_examples: int
    kind: UpdateKind = UpdateKind.DELTA
    metrics: Mapping[str, float] = field(default_factory=dict)
    contributors: int = 1


class AggregateOrigin(str, enum.Enum):
    """Where an :class:`AggregateUpdate` comes from; its value is the
    update's ``client_id`` (what logs and ``metrics.jsonl`` name it by).

    ``SECURE_SUM``: the one update of a secure-aggregation round, the
    survivors' weighted mean (:mod:`fedtrain.secure.round`).
    ``DP_FEDAVG``: user-level DP's noisy mean (:mod:`fedtrain.privacy.user_level`).
    ``DISTRIBUTED_DP``: distributed DP's release of a secure sum
    (:mod:`fedtrain.privacy.distributed`).
    ``CLIENT_MEAN``: the (weighted) mean of the round's updates, folded in
    by the engine as they arrived (:class:`fedtrain.aggregation.UpdateFold`).
    """

    SECURE_SUM = "secure-aggregate"
    DP_FEDAVG = "dp-fedavg"
    DISTRIBUTED_DP = "distributed-dp"
    CLIENT_MEAN = "client-mean"


@dataclass(frozen=True, kw_only=True)
class AggregateUpdate(ClientUpdate):
    """An update that stands for several clients, made by fedtrain itself
    rather than sent by a client: what it is, is its type and ``origin``,
    never its id or a coincidence of its counts.

    ``client_id`` is not passed: it is ``origin.value``. ``unit_weights``
    says that the vector is the mean of ``contributors`` contributions each
    weighted 1, so that ``num_examples == contributors`` (checked): a secure
    sum under unit weights, which is the only input distributed DP may
    release. It is false where ``num_examples`` is a weight of its own (the
    DP releases carry 1).
    """

    client_id: str = field(init=False)
    origin: AggregateOrigin
    unit_weights: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.origin, AggregateOrigin):
            raise TypeError(f"origin = {self.origin!r}: expected an AggregateOrigin")
        if self.contributors < 1:
            raise ValueError(f"contributors = {self.contributors}: an aggregate stands for at least one client")
        if self.unit_weights and self.num_examples != self.contributors:
            raise ValueError(
                f"num_examples = {self.num_examples} with unit_weights: must equal contributors = {self.contributors}"
            )
        object.__setattr__(self, "client_id", self.origin.value)


class _Metrics:
    """``accuracy`` and ``loss`` of a task's ``metrics``, for the tasks that report them."""

    metrics: Mapping[str, float]

    @property
    def accuracy(self) -> float | None:
        """The accuracy, for a task that reports one."""
        return self.metrics.get("accuracy")

    @property
    def loss(self) -> float | None:
        """The loss, for a task that reports one under that name."""
        return self.metrics.get("loss")


@dataclass(frozen=True)
class Evaluation(_Metrics):
    """A model's metrics on a held-out split, named and ordered by its task
    (:attr:`fedtrain.training.task.Task.metrics`)."""

    metrics: Mapping[str, float]
    num_examples: int


@dataclass(frozen=True)
class RoundRecord(_Metrics):
    """What one round did, as written to ``metrics.jsonl``: ``metrics`` are
    the task's evaluation of the round's model (for classification
    ``accuracy`` and ``loss``). ``bytes_up`` / ``bytes_down``: the bytes
    that crossed, summed over the round's clients (each update's wire size,
    and the broadcast's size times the clients it was sent to:
    :mod:`fedtrain.compression`). ``virtual_time``: simulated seconds since
    the start when the simulation keeps a virtual clock
    (:mod:`fedtrain.clock`), else None and not written. Under ``run.mode =
    "async"`` a record is one aggregation, and ``staleness`` /
    ``staleness_weights`` map each aggregated client to its update's
    staleness and the weight it got (:mod:`fedtrain.buffered`)."""

    round: int
    metrics: Mapping[str, float]
    num_clients: int
    num_failed: int
    train_loss: float | None
    seconds: float
    epsilon: float | None = None
    delta: float | None = None
    privacy: Mapping[str, float] = field(default_factory=dict)
    failures: Mapping[str, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    virtual_time: float | None = None
    staleness: Mapping[str, int] = field(default_factory=dict)
    staleness_weights: Mapping[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` row: the round, the task's metrics in its
        order, then the same keys every round (``epsilon`` and ``delta`` are
        null without privacy; ``failures`` maps each failed or rejected client
        to the reason), plus the privacy setting's own figures (e.g. the
        adaptive ``clip``) when there is one. ``virtual_time`` and the
        staleness maps appear only when set, so a run without them writes
        the rows it always wrote."""
        clocked: dict[str, Any] = {} if self.virtual_time is None else {"virtual_time": self.virtual_time}
        if self.staleness:
            clocked["staleness"] = dict(self.staleness)
            clocked["staleness_weights"] = dict(self.staleness_weights)
        return {
            "round": self.round,
            **self.metrics,
            "num_clients": self.num_clients,
            "num_failed": self.num_failed,
            "train_loss": self.train_loss,
            "seconds": self.seconds,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "failures": dict(self.failures),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            **clocked,
            **self.privacy,
        }

    @classmethod
    def from_json(cls, row: Mapping[str, Any], metric_names: Sequence[str]) -> "RoundRecord":
        """The record of a ``metrics.jsonl`` row (the inverse of :meth:`as_json`)
        of a task whose metrics are ``metric_names``."""
        maps = ("privacy", "failures", "metrics", "staleness", "staleness_weights")
        known = {f for f in cls.__dataclass_fields__ if f not in maps}
        taken = known | set(metric_names) | set(maps)
        return cls(
            **{k: row[k] for k in known if k in row},
            metrics={m: row[m] for m in metric_names if m in row},
            failures={str(k): str(v) for k, v in row.get("failures", {}).items()},
            staleness={str(k): int(v) for k, v in row.get("staleness", {}).items()},
            staleness_weights={str(k): float(v) for k, v in row.get("staleness_weights", {}).items()},
            privacy={k: float(v) for k, v in row.items() if k not in taken},
        )


@dataclass(frozen=True)
class ClientFailure:
    """A client that produced no usable update this round, and why."""

    client_id: str
    reason: str


@dataclass(frozen=True)
class RoundOutcome:
    """What an executor or transport brings back from one round of client work."""

    updates: tuple[ClientUpdate, ...]
    failures: tuple[ClientFailure, ...]
