"""``Task``: what a batch is, the loss of each record, and the metrics a
model is evaluated on — the one place a training path learns what it trains.

Every training path calls the run's task: the sequential trainer (local
steps, FedSGD's gradient, evaluation), the batched executor (its padded,
masked batches and per-sample gradients), DP-SGD (Opacus' per-sample
gradients of :meth:`Task.summed_loss`), and a deployed client, which builds
the same task from the run's config. The written-out softmax-cross-entropy
backward of :mod:`fedtrain.training.stacked` is the one other place that
knows a loss; it runs only for a task whose :attr:`Task.stacked_exact` says
that loss is its own (classification).

Built in: ``classification`` (cross-entropy over ``(batch, classes)``
logits; accuracy and loss), ``language_model`` (next-token cross-entropy
over ``(batch, time, vocabulary)`` logits; loss per token, perplexity,
next-token accuracy) and ``regression`` (squared error; ``mse`` and ``r2``).
``task.name = "module:Class"`` or ``"file.py:Class"`` loads a user's own
subclass, with ``task.options`` as its keyword arguments, as a strategy is
loaded.

A model may return its prediction as a tensor, a tuple whose first element
it is, or a mapping with ``"logits"`` (as Hugging Face models do):
:func:`prediction` takes it out.

Each reduction is torch's own (``reduction="mean"`` / ``"sum"``) rather than
a reduction of :meth:`Task.per_record_loss`: a batch mean and
``per_record_loss(...).mean()`` can differ in the last bit, and the built-in
classification must compute what it computed before tasks existed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedtrain.config import ConfigError
from fedtrain.errors import DataError
from fedtrain.plugin import PluginError, load_object
from fedtrain.metrics import MetricNames


def prediction(output: Any) -> torch.Tensor:
    """The prediction tensor of a model's ``output``: the tensor itself, the
    first element of a tuple, or the ``"logits"`` of a mapping."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the model returned a {type(output).__name__}; expected a tensor, a tuple starting with one, "
        "or a mapping with a 'logits' tensor"
    )


class Task:
    """Base class of a task; subclass it for your own (name it in ``task.name``).

    ``metrics`` names what :meth:`evaluation` reports, in the order
    ``metrics.jsonl`` and the plot show them; ``score`` is the one where
    higher is better (the progress bar, the summary's best round),
    ``loss_metric`` the one the loss plot shows next to the clients'
    training loss. ``stacked_exact``: the written-out backward of
    :mod:`fedtrain.training.stacked` computes this task's loss exactly.
    """

    name: str = "task"
    metrics: tuple[str, ...] = ()
    score: str = ""
    loss_metric: str = ""
    stacked_exact: bool = False

    @property
    def metric_names(self) -> MetricNames:
        """:attr:`metrics`, :attr:`score` and :attr:`loss_metric` as one value."""
        return MetricNames(tuple(self.metrics), self.score, self.loss_metric)

    def check_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, where: str) -> None:
        """Refuse records this task cannot train on, naming ``where`` (raise :class:`DataError`)."""

    def check_output(self, output: torch.Tensor, y: torch.Tensor) -> None:
        """Refuse a model whose prediction ``output`` for records with targets
        ``y`` does not fit this task, naming both shapes (raise :class:`ConfigError`)."""

    def per_record_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of each record, shape ``(batch,)``: what weighting, masks
        of padded batches and DP-SGD's per-record clipping act on."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_record_loss()")

    def mean_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss over a batch's records: the objective of a local step."""
        return self.per_record_loss(output, y).mean()

    def summed_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The summed loss over a batch's records: FedSGD divides it by the
        client's record count; DP-SGD needs each record's gradient unscaled."""
        return self.per_record_loss(output, y).sum()

    def evaluation_sums(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Statistics of one batch that add up over batches (float64 or int64 tensors)."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluation_sums()")

    def evaluation(self, sums: Sequence[torch.Tensor], num_records: int) -> dict[str, float]:
        """The metrics, named as :attr:`metrics`, from the summed statistics of all batches."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluation()")


def _check_labels(y: torch.Tensor, shape: str, num_classes: int, where: str) -> None:
    if y.dtype != torch.int64:
        raise DataError(f"{where}: targets must be int64 {shape}, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{where}: targets hold {int(y.min())}..{int(y.max())}, outside [0, num_classes = {num_classes})"
        )


class Classification(Task):
    """One class per record: cross-entropy over ``(batch, classes)`` logits;
    accuracy and mean loss on the test split."""

    name = "classification"
    metrics = ("accuracy", "loss")
    score = "accuracy"
    loss_metric = "loss"
    stacked_exact = True

    def check_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, where: str) -> None:
        if x.dtype != torch.float32:
            raise DataError(f"{where}: inputs must be float32 for task.name = 'classification', got {x.dtype}")
        if y.dim() != 1:
            raise DataError(f"{where}: targets must be a 1-D int64 tensor of labels, got shape {tuple(y.shape)}")
        _check_labels(y, "labels", num_classes, where)

    def check_output(self, output: torch.Tensor, y: torch.Tensor) -> None:
        if output.dim() != 2 or output.shape[0] != y.shape[0]:
            raise ConfigError(
                f"task.name = 'classification': the model returned shape {tuple(output.shape)} for targets of "
                f"shape {tuple(y.shape)}; expected logits (batch, classes) = ({y.shape[0]}, num_classes)"
            )

    def per_record_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, y, reduction="none")

    def mean_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, y)

    def summed_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, y, reduction="sum")

    def evaluation_sums(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.summed_loss(output, y).double(), (output.argmax(dim=1) == y).sum()

    def evaluation(self, sums: Sequence[torch.Tensor], num_records: int) -> dict[str, float]:
        loss, correct = sums
        return {"accuracy": int(correct) / num_records, "loss": float(loss) / num_records}


class LanguageModel(Task):
    """Next-token prediction: inputs are int64 token ids ``(batch, time)``,
    targets the next token at every position, the model's logits
    ``(batch, time, vocabulary)``. A record is a sequence: its loss is the
    mean over its positions, so every record weighs the same in a batch and
    DP-SGD clips one gradient per sequence. Reported: ``loss`` (the mean per
    token), ``perplexity`` (its exponential) and next-token ``accuracy``,
    over every predicted position of the test split."""

    name = "language_model"
    metrics = ("loss", "perplexity", "accuracy")
    score = "accuracy"
    loss_metric = "loss"

    def check_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, where: str) -> None:
        if x.dtype != torch.int64 or x.dim() != 2:
            raise DataError(
                f"{where}: inputs must be int64 token ids (records, time) for task.name = 'language_model', "
                f"got {x.dtype} of shape {tuple(x.shape)}"
            )
        if y.shape != x.shape:
            raise DataError(f"{where}: targets have shape {tuple(y.shape)}, expected the inputs' {tuple(x.shape)}")
        _check_labels(x, "token ids", num_classes, where)
        _check_labels(y, "token ids", num_classes, where)

    def check_output(self, output: torch.Tensor, y: torch.Tensor) -> None:
        if output.dim() != 3 or tuple(output.shape[:2]) != tuple(y.shape):
            raise ConfigError(
                f"task.name = 'language_model': the model returned shape {tuple(output.shape)} for targets of "
                f"shape {tuple(y.shape)}; expected logits (batch, time, vocabulary) = "
                f"({y.shape[0]}, {y.shape[1] if y.dim() > 1 else '?'}, vocabulary)"
            )

    def per_record_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.transpose(1, 2), y, reduction="none").mean(dim=1)

    def mean_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, 1), y.flatten())

    def evaluation_sums(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = F.cross_entropy(output.flatten(0, 1), y.flatten(), reduction="sum").double()
        correct = (output.argmax(dim=-1) == y).sum()
        return tokens, correct, torch.tensor(y.numel(), dtype=torch.int64, device=y.device)

    def evaluation(self, sums: Sequence[torch.Tensor], num_records: int) -> dict[str, float]:
        loss_sum, correct, tokens = sums
        loss = float(loss_sum) / int(tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": int(correct) / int(tokens)}


class Regression(Task):
    """Real-valued targets ``(batch,)`` or ``(batch, outputs)``. A record's
    loss is half its squared error (the mean over outputs), whose gradient is
    the error itself: with the full squared error the curvature doubles, and
    the default ``client.lr`` of 0.3 diverges on standardised targets (the
    diabetes data). Reported: ``mse`` (the full mean squared error) and
    ``r2``, the coefficient of determination ``1 − SSE / SST`` of the test
    split (SST about the test targets' mean, pooled over outputs)."""

    name = "regression"
    metrics = ("mse", "r2")
    score = "r2"
    loss_metric = "mse"

    def check_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, where: str) -> None:
        if y.dtype != torch.float32 or y.dim() not in (1, 2):
            raise DataError(
                f"{where}: targets must be float32 (records,) or (records, outputs) for task.name = 'regression', "
                f"got {y.dtype} of shape {tuple(y.shape)}"
            )

    @staticmethod
    def _aligned(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``output`` shaped as ``y``: a model's ``(batch, 1)`` column for ``(batch,)`` targets."""
        return output.squeeze(-1) if y.dim() == 1 and output.dim() == 2 and output.shape[-1] == 1 else output

    def check_output(self, output: torch.Tensor, y: torch.Tensor) -> None:
        if self._aligned(output, y).shape != y.shape:
            raise ConfigError(
                f"task.name = 'regression': the model returned shape {tuple(output.shape)} for targets of "
                f"shape {tuple(y.shape)}; expected {tuple(y.shape)} (or ({y.shape[0]}, 1) for 1-D targets)"
            )

    def per_record_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        error = 0.5 * (self._aligned(output, y) - y) ** 2
        return error if error.dim() == 1 else error.mean(dim=1)

    def evaluation_sums(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        yd = y.double()
        sse = ((self._aligned(output, y).double() - yd) ** 2).sum()
        return sse, yd.sum(), (yd**2).sum(), torch.tensor(y.numel(), dtype=torch.int64, device=y.device)

    def evaluation(self, sums: Sequence[torch.Tensor], num_records: int) -> dict[str, float]:
        sse, total, squares, count = (float(s) for s in sums)
        sst = squares - total * total / count
        return {"mse": sse / count, "r2": 1.0 - sse / sst if sst > 0 else float("nan")}


BUILTIN_TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, LanguageModel, Regression)}
"""Built-in tasks by ``task.name``."""


def load_task(name: str, options: Mapping[str, Any]) -> Task:
    """The task ``task.name`` names, built with ``task.options``; a wrong name,
    class or option gets a :class:`~fedtrain.plugin.PluginError` naming it."""
    cls = BUILTIN_TASKS.get(name)
    if cls is None:
        cls = load_object(name, "task class", "task.name", kind=Task)
        if not (inspect.isclass(cls) and issubclass(cls, Task)):
            raise PluginError(f"task.name = {name!r}: {cls!r} is not a subclass of fedtrain.training.task.Task")
    try:
        task = cls(**dict(options))
    except TypeError as exc:
        raise PluginError(f"task.name = {name!r} with task.options = {dict(options)}: {exc}") from exc
    missing = [m for m in ("per_record_loss", "evaluation_sums", "evaluation")
               if getattr(type(task), m) is getattr(Task, m)]
    if missing or not task.metrics or task.score not in task.metrics or task.loss_metric not in task.metrics:
        raise PluginError(
            f"task.name = {name!r}: a task implements per_record_loss, evaluation_sums and evaluation "
            f"(missing: {missing or 'none'}) and names its metrics, with score and loss_metric among them "
            f"(metrics = {task.metrics}, score = {task.score!r}, loss_metric = {task.loss_metric!r})"
        )
    return task
