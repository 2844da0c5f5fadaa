"""A progress bar per round, with the latest accuracy and loss."""

from __future__ import annotations

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedtrain.types import RoundRecord


class RoundProgress:
    """An engine observer that advances a rich progress bar each round."""

    def __init__(self, rounds: int, done: int = 0, description: str = "rounds") -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acc {task.fields[accuracy]}  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task(description, total=rounds, completed=done, accuracy="-", loss="-")

    def __enter__(self) -> "RoundProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_round(self, record: RoundRecord, params: torch.Tensor | None = None) -> None:
        self._progress.update(
            self._task,
            advance=1,
            accuracy=f"{record.accuracy:.4f}",
            loss=f"{record.loss:.4f}",
        )
