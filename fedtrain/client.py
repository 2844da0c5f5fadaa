"""Local training on one client's partition: the work a client does in a round.

The same :class:`LocalTrainer` runs inside the in-process simulation and inside
a deployed client process, so a round means the same thing in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtrain.config import ClientConfig, ConfigError, Optimizer
from fedtrain.layout import ParamLayout
from fedtrain.types import Evaluation, RoundPlan, UpdateKind


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

    @classmethod
    def of(cls, client: ClientConfig, plan: RoundPlan) -> "TrainTask":
        """The client config with the strategy's per-round plan applied."""
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
        )


@dataclass(frozen=True)
class LocalResult:
    """What local training produced: the update is written to the caller's buffer."""

    num_examples: int
    train_loss: float


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"client.device = {name!r}: no CUDA device is available here; use 'auto' or 'cpu'")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"client.device = {name!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    return device


class LocalTrainer:
    """Trains one reusable model instance for whichever client is asked.

    The model is loaded from the flat global vector before each client, so one
    instance (and its memory) serves every client of a simulation.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, device: torch.device) -> None:
        self.model = model.to(device)
        self.layout = layout
        self.device = device
        state = self.model.state_dict(keep_vars=True)
        self._tensors = [state[n] for n in layout.names]

    def load_(self, params: torch.Tensor) -> None:
        """Copy the flat vector ``params`` into the model, in place."""
        with torch.no_grad():
            for tensor, view in zip(self._tensors, self.layout.views(params.to(self.device)).values()):
                tensor.copy_(view)

    def _optimizer(self, task: TrainTask) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        if task.optimizer is Optimizer.ADAM:
            return torch.optim.Adam(params, lr=task.lr, weight_decay=task.weight_decay)
        return torch.optim.SGD(
            params, lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay
        )

    def train(
        self,
        params: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        task: TrainTask,
        generator: torch.Generator,
        out: torch.Tensor,
    ) -> LocalResult:
        """Run ``task`` on ``(x, y)`` from global ``params``; write the update
        (``local − global``, or the mean gradient) into the flat vector ``out``."""
        n = len(y)
        if n == 0:
            raise ValueError("client has no training records")
        self.load_(params)
        if task.kind is UpdateKind.GRADIENT:
            loss = self._mean_gradient(x, y, task.batch_size, out)
            return LocalResult(num_examples=n, train_loss=loss)
        self.model.train()
        optimizer = self._optimizer(task)
        anchor = [p.detach().clone() for p in self.model.parameters()] if task.proximal_mu > 0 else None
        total_loss = torch.zeros((), device=self.device)
        seen = 0
        for _ in range(task.epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, task.batch_size):
                idx = order[start : start + task.batch_size]
                xb, yb = x[idx], y[idx]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(xb), yb)
                total_loss += loss.detach() * len(idx)
                seen += len(idx)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), anchor))
                    loss = loss + 0.5 * task.proximal_mu * prox
                loss.backward()
                optimizer.step()
        self.layout.flatten(self.model.state_dict(), out=out)
        out.sub_(params.to(out.device))
        return LocalResult(num_examples=n, train_loss=float(total_loss) / seen)

    def _mean_gradient(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, out: torch.Tensor
    ) -> float:
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        n = len(y)
        total_loss = 0.0
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            loss = F.cross_entropy(self.model(xb), yb, reduction="sum")
            (loss / n).backward()
            total_loss += float(loss.detach())
        named = dict(self.model.named_parameters())
        grads = {
            name: (named[name].grad if name in named and named[name].grad is not None
                   else torch.zeros_like(t))
            for name, t in zip(self.layout.names, self._tensors)
        }
        self.layout.flatten(grads, out=out)
        self.model.zero_grad(set_to_none=True)
        return total_loss / n

    @torch.no_grad()
    def evaluate(
        self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
    ) -> Evaluation:
        """Mean cross-entropy and accuracy of ``params`` on ``(x, y)``."""
        self.load_(params)
        self.model.eval()
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = self.model(xb)
            total_loss += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(dim=1) == yb).sum()
        n = len(y)
        return Evaluation(loss=float(total_loss) / n, accuracy=int(correct) / n, num_examples=n)
