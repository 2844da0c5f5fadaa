"""Local training on one client's partition: the work a client does in a round.

The same :class:`LocalTrainer` runs inside the in-process simulation and inside
a deployed client process, so a round means the same thing in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from fedtrain.config import ConfigError, Precision
from fedtrain.layout import ParamLayout
from fedtrain.privacy.mechanisms import clip_rows_
from fedtrain.privacy.noise import NoiseSource, SecureGaussian, SeededGaussian
from fedtrain.sampling import Randomness, SecretRandomness, TorchRandomness
from fedtrain.training.task import Classification, Task, prediction
from fedtrain.training.optimizer import LocalOptimizer
from fedtrain.training.train_task import TrainTask, precision_context
from fedtrain.types import ClientMetric, Evaluation, UpdateKind

if TYPE_CHECKING:
    from fedtrain.privacy.dpsgd import DpSgdStepper


@dataclass(frozen=True)
class LocalResult:
    """What local training produced: the update is written to the caller's buffer."""

    num_examples: int
    metrics: dict[str, float]


def clip_and_report_(updates: torch.Tensor, mean_losses: Sequence[float], task: TrainTask) -> list[dict[str, float]]:
    """Clip each client's update, a row of ``updates`` (``(k, P)``, or one
    ``(P,)`` vector), in place to ``task.privacy.clip`` when that is positive,
    and return each client's metrics: under clipping whether its update was
    within the clip (:attr:`ClientMetric.UNCLIPPED`, what adaptive clipping
    counts); its mean training loss ``mean_losses[i]``
    (:attr:`ClientMetric.TRAIN_LOSS`) only without DP-SGD and without
    clipping, since under differential privacy the update is the only output
    derived from the data that is accounted for."""
    clip = task.privacy.clip
    k = 1 if updates.dim() == 1 else updates.shape[0]
    if len(mean_losses) != k:
        raise ValueError(f"{len(mean_losses)} training losses for {k} updates")
    metrics: list[dict[str, float]] = [{} for _ in range(k)]
    if clip > 0:
        for m, norm in zip(metrics, clip_rows_(updates, clip).tolist()):
            m[ClientMetric.UNCLIPPED.value] = 1.0 if norm <= clip else 0.0
    if task.privacy.dp_sgd is None and clip <= 0:
        for m, loss in zip(metrics, mean_losses):
            m[ClientMetric.TRAIN_LOSS.value] = loss
    return metrics


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
    instance (and its memory) serves every client of a simulation. When all
    federated tensors are float32, they are re-pointed at slices of one flat
    buffer: loading a client is then one ``copy_`` and its update one
    ``sub``, instead of a dozen small copies per client.
    """

    def __init__(
        self, model: nn.Module, layout: ParamLayout, device: torch.device, objective: Task | None = None
    ) -> None:
        self.model = model.to(device)
        self.objective = Classification() if objective is None else objective
        self.layout = layout
        self.device = device
        state = self.model.state_dict(keep_vars=True)
        self._tensors = [state[n] for n in layout.names]
        self._flat = self._flatten_storage_()
        self._optimizers: dict[tuple[object, ...], LocalOptimizer] = {}
        self._stepper: DpSgdStepper | None = None
        self._secure_noise: SecureGaussian | None = None
        self._secret_batches: SecretRandomness | None = None

    def _flatten_storage_(self) -> torch.Tensor | None:
        if any(d != torch.float32 for d in self.layout.dtypes):
            return None
        flat = torch.empty(self.layout.numel, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for tensor, view in zip(self._tensors, self.layout.views(flat).values()):
                view.copy_(tensor)
                tensor.data = view
        return flat

    def load_(self, params: torch.Tensor) -> None:
        """Copy the flat vector ``params`` into the model, in place."""
        with torch.no_grad():
            if self._flat is not None:
                self._flat.copy_(params)
                return
            for tensor, view in zip(self._tensors, self.layout.views(params.to(self.device)).values()):
                tensor.copy_(view)

    def _write_delta(self, params: torch.Tensor, out: torch.Tensor) -> None:
        if self._flat is not None:
            torch.sub(self._flat, params.to(self._flat.device), out=out)
            return
        self.layout.flatten(self.model.state_dict(), out=out)
        out.sub_(params.to(out.device))

    def _optimizer(self, task: TrainTask) -> LocalOptimizer:
        """One optimiser per setting, reused with its state cleared for each
        client (building a new one per client costs as much as a small step)."""
        key = (task.optimizer, task.lr, task.momentum, task.weight_decay)
        optimizer = self._optimizers.get(key)
        if optimizer is None:
            optimizer = LocalOptimizer(list(self.model.parameters()), task)
            self._optimizers[key] = optimizer
        optimizer.reset()
        return optimizer

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
        (``local − global``, or the mean gradient) into the flat vector ``out``.

        Under differential privacy the update is the only output derived from
        the data (plus the clipped bit adaptive clipping accounts for): the
        training loss is not reported (:func:`clip_and_report_`).
        """
        n = len(y)
        if n == 0:
            raise ValueError("client has no training records")
        self.load_(params)
        dp_sgd = task.privacy.dp_sgd
        if task.kind is UpdateKind.GRADIENT:
            if dp_sgd is not None:
                raise ValueError("gradient updates (FedSGD) cannot be combined with privacy.mode = 'sample'")
            loss = self._mean_gradient(x, y, task.batch_size, out, task.precision)
        else:
            if dp_sgd is not None:
                loss = self._train_dp_sgd(x, y, task, generator)
            else:
                loss = self._train_sgd(x, y, task, generator)
            self._write_delta(params, out)
        return LocalResult(num_examples=n, metrics=clip_and_report_(out, [loss], task)[0])

    def _proximal_anchor(self, task: TrainTask) -> list[torch.Tensor] | None:
        return [p.detach().clone() for p in self.model.parameters()] if task.proximal_mu > 0 else None

    def _train_sgd(self, x: torch.Tensor, y: torch.Tensor, task: TrainTask, generator: torch.Generator) -> float:
        """Local epochs; each optimiser step sums the gradients of
        ``grad_accum_steps`` micro-batches of ``batch_size`` records, each
        micro-batch's mean loss weighted by its share of the logical batch,
        so the step is one step on the whole logical batch up to float
        rounding; forward and loss under ``task.precision``."""
        n = len(y)
        self.model.train()
        optimizer = self._optimizer(task)
        anchor = self._proximal_anchor(task)
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        logical_size = task.batch_size * task.grad_accum_steps
        for _ in range(task.epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, logical_size):
                logical = order[start : start + logical_size]
                micro_batches = logical.split(task.batch_size)
                optimizer.zero_grad()
                for m, idx in enumerate(micro_batches):
                    xb, yb = x[idx], y[idx]
                    with precision_context(task.precision, self.device):
                        loss = self.objective.mean_loss(prediction(self.model(xb)), yb)
                    losses.append(loss.detach().float())
                    sizes.append(len(idx))
                    if len(idx) != len(logical):
                        loss = loss * (len(idx) / len(logical))
                    if anchor is not None and m == len(micro_batches) - 1:
                        prox = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), anchor))
                        loss = loss + 0.5 * task.proximal_mu * prox
                    loss.backward()
                optimizer.step()
        weights = torch.tensor(sizes, dtype=torch.float32, device=self.device)
        return float(torch.stack(losses) @ weights) / n / task.epochs

    def noise_source(self, secure: bool, generator: torch.Generator) -> NoiseSource:
        """Where a client's DP-SGD noise comes from: with ``secure``
        (``privacy.secure_noise``) this trainer's one cryptographic source,
        whoever the client; otherwise a Gaussian seeded by one draw from the
        client's ``generator``, its first draw of the round, for reproducible
        experiments. The batched engine takes its clients' noise here too, so
        both draw alike."""
        if not secure:
            return SeededGaussian(int(torch.randint(0, 2**62, (1,), generator=generator)))
        if self._secure_noise is None:
            self._secure_noise = SecureGaussian()
        return self._secure_noise

    def batch_randomness(self, secret: bool, generator: torch.Generator) -> Randomness:
        """Where DP-SGD's Poisson batches come from. Amplification by sampling
        (Abadi et al. 2016; Mironov et al. 2019) credits a batch nobody can
        replay, so with ``secret`` (``privacy.secure_noise``) it is this
        trainer's one secret stream, whoever the client; otherwise the
        client's seeded ``generator``, for reproducible experiments. The
        batched executor draws its masks here too, so both trainers sample
        alike."""
        if not secret:
            return TorchRandomness(generator)
        if self._secret_batches is None:
            self._secret_batches = SecretRandomness()
        return self._secret_batches

    def _train_dp_sgd(self, x: torch.Tensor, y: torch.Tensor, task: TrainTask, generator: torch.Generator) -> float:
        """DP-SGD with Poisson-sampled batches (rate ``batch_size / n``, drawn
        from :meth:`batch_randomness`), as its accounting assumes; the
        proximal term, being data-independent, is added after the noise."""
        from fedtrain.privacy.dpsgd import DpSgdStepper, sample_rate, steps_per_round

        dp_sgd = task.privacy.dp_sgd
        if dp_sgd is None:
            raise ValueError("no DP-SGD settings in this task")
        if task.precision is not Precision.FP32 or task.grad_accum_steps != 1:
            raise ValueError(
                f"client.precision = {task.precision.value!r}, client.grad_accum_steps = {task.grad_accum_steps} "
                "with privacy.mode = 'sample': DP-SGD trains in fp32 with grad_accum_steps = 1 only"
            )
        if self._stepper is None:
            self._stepper = DpSgdStepper(self.model, self.summed_loss)
        n = len(y)
        q = sample_rate(n, task.batch_size)
        noise = self.noise_source(dp_sgd.secure_noise, generator)
        coins = self.batch_randomness(dp_sgd.secure_noise, generator)
        self.model.train()
        optimizer = self._optimizer(task)
        anchor = self._proximal_anchor(task)
        total_loss, seen = 0.0, 0
        for _ in range(steps_per_round(n, task.batch_size, task.epochs)):
            idx = torch.from_numpy(np.flatnonzero(coins.bernoulli(n, q))).to(self.device)
            optimizer.zero_grad()
            total_loss += self._stepper.noisy_gradient(x[idx], y[idx], q * n, dp_sgd, noise)
            seen += len(idx)
            if anchor is not None:
                for p, a in zip(self.model.parameters(), anchor):
                    p.grad.add_(p.detach() - a, alpha=task.proximal_mu)
            optimizer.step()
        return total_loss / max(seen, 1)

    def _mean_gradient(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, out: torch.Tensor,
        precision: Precision,
    ) -> float:
        """FedSGD: the mean gradient over all records at the loaded
        parameters, summed over batches (gradient accumulation is what it
        always does); forward and loss under ``precision``."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        n = len(y)
        total_loss = 0.0
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            with precision_context(precision, self.device):
                loss = self.summed_loss(self.model(xb), yb)
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

    def summed_loss(self, output: object, y: torch.Tensor) -> torch.Tensor:
        """The run's task's summed loss of a model ``output`` (any form
        :func:`~fedtrain.training.task.prediction` takes): FedSGD's objective,
        and the loss DP-SGD takes per-sample gradients of."""
        return self.objective.summed_loss(prediction(output), y)

    @torch.no_grad()
    def evaluate(
        self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
    ) -> Evaluation:
        """The task's metrics of ``params`` on ``(x, y)``, from statistics summed over batches."""
        self.load_(params)
        self.model.eval()
        sums: tuple[torch.Tensor, ...] = ()
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            batch = self.objective.evaluation_sums(prediction(self.model(xb)), yb)
            sums = batch if not sums else tuple(a + b for a, b in zip(sums, batch))
        n = len(y)
        return Evaluation(metrics=self.objective.evaluation(sums, n), num_examples=n)
