"""``TrainTask``: everything a client needs to know about one round's local work."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, ContextManager, Mapping

import torch

from fedtrain.config import ClientConfig, Optimizer, Precision
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.types import RoundPlan, UpdateKind


def precision_context(precision: Precision, device: torch.device) -> ContextManager[Any]:
    """Where local training runs its forward pass and loss: for ``BF16``
    ``torch.autocast`` in bfloat16 on ``device``'s kind (CPU or CUDA), which
    casts each op's inputs, not the float32 master weights, so gradients,
    optimiser state and the update stay float32 (bfloat16 keeps float32's
    exponent range, so no loss scaling is needed); for ``FP32`` nothing, the
    computation exactly as without it."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class TrainTask:
    """Everything a client needs to know about this round's local work.

    ``precision`` (``client.precision``) is the arithmetic of the forward pass
    and loss; ``grad_accum_steps`` (``client.grad_accum_steps``) is how many
    micro-batches of ``batch_size`` records make one optimiser step, so that
    a large logical batch fits in a small device's memory."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: Optimizer = Optimizer.SGD
    proximal_mu: float = 0.0
    kind: UpdateKind = UpdateKind.DELTA
    privacy: ClientPrivacy = field(default_factory=ClientPrivacy)
    precision: Precision = Precision.FP32
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError(f"client.grad_accum_steps = {self.grad_accum_steps}: must be >= 1")

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
            precision=client.precision,
            grad_accum_steps=client.grad_accum_steps,
        )

    def as_json(self) -> dict[str, Any]:
        """The task as plain JSON data, for clients in other processes."""
        row = asdict(self)
        row["optimizer"] = self.optimizer.value
        row["kind"] = self.kind.value
        row["precision"] = self.precision.value
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
                precision=Precision(row.get("precision", Precision.FP32.value)),
                grad_accum_steps=int(row.get("grad_accum_steps", 1)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed training task: missing or mistyped {exc}") from exc
