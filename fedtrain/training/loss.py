"""The loss a client trains and is evaluated on: classification cross-entropy.

Every loss the training layer computes goes through this module: the local
SGD / Adam step (:func:`mean_loss`); FedSGD's gradient and DP-SGD's
per-sample gradients (:func:`summed_loss`, handed to
:class:`~fedtrain.privacy.dpsgd.DpSgdStepper` as a callable, since the
privacy layer sits below this one); the batched engine's padded, masked
batches (:func:`per_record_loss`) and its per-sample gradients
(:func:`mean_loss` of one record); evaluation (:func:`evaluation_sums`). The
one other place that knows the loss is the written-out softmax-cross-entropy
backward of :mod:`fedtrain.training.stacked`, the batched fast path for MLPs,
which ``tests/test_stacked.py`` checks against autograd of
:func:`per_record_loss`.

Each reduction is its own function, torch's own reduction rather than one of
:func:`per_record_loss`: a batch mean and ``per_record_loss(...).mean()`` can
differ in the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_record_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of each record: ``logits`` ``(batch, classes, …)``, ``y`` ``(batch, …)``."""
    return F.cross_entropy(logits, y, reduction="none")


def mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean loss over the records of a batch, the objective of a local step."""
    return F.cross_entropy(logits, y)


def summed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed loss over the records of a batch: FedSGD divides it by the
    client's record count, DP-SGD needs each record's gradient unscaled."""
    return F.cross_entropy(logits, y, reduction="sum")


def evaluation_sums(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's summed loss, as float64 (an evaluation adds up many batches),
    and its number of correctly classified records."""
    return summed_loss(logits, y).double(), (logits.argmax(dim=1) == y).sum()
