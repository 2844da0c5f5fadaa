"""Local training on one client's partition: the work a client does in a round.

The same :class:`LocalTrainer` runs inside the in-process simulation and inside
a deployed client process, so a round means the same thing in both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam as adam_update
from torch.optim.sgd import sgd as sgd_update

from fedtrain.config import ClientConfig, ConfigError, Optimizer
from fedtrain.layout import ParamLayout
from fedtrain.privacy.mechanisms import clip_rows_
from fedtrain.privacy.noise import NoiseSource, SecureGaussian, SeededGaussian
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.privacy.user_level import UNCLIPPED
from fedtrain.sampling import Randomness, SecretRandomness, TorchRandomness
from fedtrain.types import Evaluation, RoundPlan, UpdateKind

if TYPE_CHECKING:
    from fedtrain.privacy.dpsgd import DpSgdStepper


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


@dataclass(frozen=True)
class LocalResult:
    """What local training produced: the update is written to the caller's buffer."""

    num_examples: int
    metrics: dict[str, float]


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


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""``torch.optim.Adam``'s defaults, which :class:`LocalOptimizer` and the batched engine use."""


def _scalar_dtype() -> torch.dtype:
    """The dtype of Adam's step count, as ``torch.optim.Adam`` chooses it (unfused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class LocalOptimizer:
    """A client's SGD or Adam, exactly as ``torch.optim.SGD`` / ``torch.optim.Adam``
    (with their defaults) compute it: ``step`` calls the functional update that
    those classes' ``step`` calls (``torch.optim.sgd.sgd`` /
    ``torch.optim.adam.adam``, which pick the same single-tensor or foreach
    kernel) on the parameters that have a gradient, and keeps the same state
    (momentum buffers; Adam's step count and moments), so the updates are
    bit-identical.

    The optimiser classes themselves are not used: their constructor, ``step``
    and ``zero_grad`` are wrapped to disable ``torch.compile``, and the first
    call of any of them imports ``torch._dynamo``, which costs more start-up
    than a short simulation's whole training. Nothing here compiles.
    """

    def __init__(self, params: list[nn.Parameter], task: TrainTask) -> None:
        if not params:
            raise ValueError("the model has no parameters to optimise")
        self.params = params
        self.kind = task.optimizer
        self.lr = task.lr
        self.momentum = task.momentum
        self.weight_decay = task.weight_decay
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}

    def reset(self) -> None:
        """Forget the momentum / moments: the next step is a first step."""
        self.state.clear()

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``, torch's default)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        if self.kind is Optimizer.ADAM:
            self._adam(params, grads)
        else:
            self._sgd(params, grads)

    def _sgd(self, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params] if self.momentum else []
        sgd_update(
            params, grads, buffers,
            has_sparse_grad=any(g.is_sparse for g in grads), foreach=None, fused=None,
            weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr,
            dampening=0, nesterov=False, maximize=False,
        )
        for p, buffer in zip(params, buffers):
            self.state[p] = {"momentum_buffer": buffer}

    def _adam(self, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("Adam does not support sparse gradients")
            if p not in self.state:
                self.state[p] = {
                    "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        states = [self.state[p] for p in params]
        beta1, beta2 = ADAM_BETAS
        adam_update(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states],
            foreach=None, capturable=False, differentiable=False, fused=None,
            has_complex=any(torch.is_complex(p) for p in params), decoupled_weight_decay=False,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=self.lr, weight_decay=self.weight_decay,
            eps=ADAM_EPS, maximize=False,
        )


class LocalTrainer:
    """Trains one reusable model instance for whichever client is asked.

    The model is loaded from the flat global vector before each client, so one
    instance (and its memory) serves every client of a simulation. When all
    federated tensors are float32, they are re-pointed at slices of one flat
    buffer: loading a client is then one ``copy_`` and its update one
    ``sub``, instead of a dozen small copies per client.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, device: torch.device) -> None:
        self.model = model.to(device)
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
        training loss is not reported, since nothing accounts for it.
        """
        n = len(y)
        if n == 0:
            raise ValueError("client has no training records")
        self.load_(params)
        dp_sgd = task.privacy.dp_sgd
        if task.kind is UpdateKind.GRADIENT:
            if dp_sgd is not None:
                raise ValueError("gradient updates (FedSGD) cannot be combined with privacy.mode = 'sample'")
            loss = self._mean_gradient(x, y, task.batch_size, out)
        else:
            if dp_sgd is not None:
                loss = self._train_dp_sgd(x, y, task, generator)
            else:
                loss = self._train_sgd(x, y, task, generator)
            self._write_delta(params, out)
        metrics: dict[str, float] = {}
        if task.privacy.clip > 0:
            norm = float(clip_rows_(out, task.privacy.clip)[0])
            metrics[UNCLIPPED] = 1.0 if norm <= task.privacy.clip else 0.0
        if dp_sgd is None and task.privacy.clip <= 0:
            metrics["train_loss"] = loss
        return LocalResult(num_examples=n, metrics=metrics)

    def _proximal_anchor(self, task: TrainTask) -> list[torch.Tensor] | None:
        return [p.detach().clone() for p in self.model.parameters()] if task.proximal_mu > 0 else None

    def _train_sgd(self, x: torch.Tensor, y: torch.Tensor, task: TrainTask, generator: torch.Generator) -> float:
        n = len(y)
        self.model.train()
        optimizer = self._optimizer(task)
        anchor = self._proximal_anchor(task)
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        for _ in range(task.epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, task.batch_size):
                idx = order[start : start + task.batch_size]
                xb, yb = x[idx], y[idx]
                optimizer.zero_grad()
                loss = F.cross_entropy(self.model(xb), yb)
                losses.append(loss.detach())
                sizes.append(len(idx))
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), anchor))
                    loss = loss + 0.5 * task.proximal_mu * prox
                loss.backward()
                optimizer.step()
        weights = torch.tensor(sizes, dtype=torch.float32, device=self.device)
        return float(torch.stack(losses) @ weights) / n / task.epochs

    def _noise(self, secure: bool, generator: torch.Generator) -> NoiseSource:
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
        batched backend draws its masks here too, so both trainers sample
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
        if self._stepper is None:
            self._stepper = DpSgdStepper(self.model)
        n = len(y)
        q = sample_rate(n, task.batch_size)
        noise = self._noise(dp_sgd.secure_noise, generator)
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
