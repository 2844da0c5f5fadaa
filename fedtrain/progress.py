"""A progress bar per round, with the task's latest score and loss."""

from __future__ import annotations

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedtrain.metrics import CLASSIFICATION_METRICS, MetricNames
from fedtrain.types import RoundRecord


class RoundProgress:
    """An engine observer that advances a rich progress bar each round."""

    def __init__(
        self, rounds: int, done: int = 0, description: str = "rounds", names: MetricNames = CLASSIFICATION_METRICS
    ) -> None:
        self._names = names
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{_short(names.score)} {{task.fields[score]}}  {_short(names.loss)} {{task.fields[loss]}}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task(description, total=rounds, completed=done, score="-", loss="-")

    def __enter__(self) -> "RoundProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_round(self, record: RoundRecord, params: torch.Tensor | None = None) -> None:
        self._progress.update(
            self._task,
            advance=1,
            score=_shown(record.metrics.get(self._names.score)),
            loss=_shown(record.metrics.get(self._names.loss)),
        )


def _short(name: str) -> str:
    return "acc" if name == "accuracy" else name


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
