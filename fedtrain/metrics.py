"""The names of what a task reports, as the results files, the plot and the
progress bar need them; a module of its own so that the plotting process
and the command line read them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricNames:
    """What a task reports: its metrics in order, the one where higher is
    better (``score``: the progress bar, the best round) and the one the loss
    plot shows (``loss``)."""

    names: tuple[str, ...]
    score: str
    loss: str


CLASSIFICATION_METRICS = MetricNames(("accuracy", "loss"), "accuracy", "loss")
"""The built-in classification task's, and the rows of runs from before tasks existed."""
