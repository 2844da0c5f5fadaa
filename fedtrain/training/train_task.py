"""``TrainTask``: everything a client needs to know about one round's local work."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fedtrain.config import ClientConfig, Optimizer
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.types import RoundPlan, UpdateKind


@dataclass(frozen=True)
class TrainTask:
    """Everything a client needs to know about this round's local work."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: Optimizer = Optimizer.SGD
    proximal_mu: float = 0.0
    kind: UpdateKind = UpdateKind.DELTA
    privacy: ClientPrivacy = field(default_factory=ClientPrivacy)

    @classmethod
    def of(cls, client: ClientConfig, plan: RoundPlan, privacy: ClientPrivacy) -> "TrainTask":
        """The client config with the strategy's plan and the privacy setting applied."""
        if plan.proximal_mu < 0:
            raise ValueError(f"RoundPlan.proximal_mu = {plan.proximal_mu}: must be >= 0")
        return cls(
            epochs=client.epochs,
            batch_size=client.batch_size,
            lr=client.lr,
            momentum=client.momentum,
            weight_decay=client.weight_decay,
            optimizer=client.optimizer,
            proximal_mu=plan.proximal_mu,
            kind=plan.kind,
            privacy=privacy,
        )

    def as_json(self) -> dict[str, Any]:
        """The task as plain JSON data, for clients in other processes."""
        row = asdict(self)
        row["optimizer"] = self.optimizer.value
        row["kind"] = self.kind.value
        if self.privacy.dp_sgd is not None:
            row["privacy"]["dp_sgd"]["mode"] = self.privacy.dp_sgd.mode.value
        return row

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "TrainTask":
        """The inverse of :meth:`as_json`; raises ``ValueError`` on a malformed task."""
        from fedtrain.config import GradSampleMode
        from fedtrain.privacy.dpsgd import DpSgdTask

        try:
            privacy = row["privacy"]
            dp = privacy["dp_sgd"]
            return cls(
                epochs=int(row["epochs"]),
                batch_size=int(row["batch_size"]),
                lr=float(row["lr"]),
                momentum=float(row["momentum"]),
                weight_decay=float(row["weight_decay"]),
                optimizer=Optimizer(row["optimizer"]),
                proximal_mu=float(row["proximal_mu"]),
                kind=UpdateKind(row["kind"]),
                privacy=ClientPrivacy(
                    clip=float(privacy["clip"]),
                    distributed_noise=float(privacy.get("distributed_noise", 0.0)),
                    dp_sgd=None if dp is None else DpSgdTask(
                        noise_multiplier=float(dp["noise_multiplier"]),
                        max_grad_norm=float(dp["max_grad_norm"]),
                        mode=GradSampleMode(dp["mode"]),
                        secure_noise=bool(dp["secure_noise"]),
                    ),
                ),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed training task: missing or mistyped {exc}") from exc
