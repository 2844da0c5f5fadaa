"""The run folder: files a person can read and a plot they can look at.

- ``config.toml``: the fully resolved config, written before training starts;
- ``metrics.jsonl``: one JSON object per round, appended and flushed as it ends;
- ``summary.json``, ``model.pt`` and ``curves.png`` when the run ends;
- ``tensorboard/`` with ``run.tensorboard = true`` (:mod:`fedtrain.tensorboard_log`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from fedtrain.config import Config, dumps
from fedtrain.curves import PlotTitle, Rows, plot_curves
from fedtrain.metrics import CLASSIFICATION_METRICS, MetricNames
from fedtrain.strategy import BUILTIN_STRATEGIES
from fedtrain.types import Params, RoundRecord

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
CURVES_FILE = "curves.png"

Plot = Callable[[Rows, Path, MetricNames, PlotTitle], None]
"""Draws ``curves.png`` at the path from the rounds' rows and the task's metric names, under the title."""

TIMESTAMP_SUFFIX = re.compile(r"-\d{8}-\d{6}$")
"""The ``-YYYYmmdd-HHMMSS`` that ``fedtrain simulate`` puts after the config's name in a default run folder."""


@dataclass(frozen=True)
class Summary:
    """The headline of a finished run, as written to ``summary.json``.

    ``wall_seconds`` runs from the start of the run (``started_at``, Unix
    time, after the imports) to this summary; of it, ``setup_seconds`` went
    to data, model and checks before the first round and ``rounds_seconds``
    to the rounds (with their checkpoints). The last three are ``None`` in
    folders written before they were recorded.

    ``final_metrics`` holds every metric of the task's last evaluation;
    ``score`` names the one where higher is better and ``best_score`` is its
    best round's. ``final_accuracy`` / ``best_accuracy`` (and ``final_loss``)
    are those of a task that reports an accuracy (a loss), else ``None``.

    ``num_parameters`` counts every parameter of the model (a tied tensor
    once), ``num_trainable_parameters`` those that train and are federated
    (``None`` in folders written before it was recorded)."""

    final_accuracy: float | None
    final_loss: float | None
    best_accuracy: float | None
    rounds: int
    wall_seconds: float
    seed: int
    strategy: str
    dataset: str
    num_clients: int
    clients_per_round: int
    num_parameters: int
    privacy_mode: str
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    stopped_early: str | None
    started_at: float | None = None
    setup_seconds: float | None = None
    rounds_seconds: float | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    score: str = "accuracy"
    best_score: float | None = None
    num_trainable_parameters: int | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None

    def with_traffic(self, records: Sequence[RoundRecord]) -> Summary:
        """This summary with ``bytes_up`` / ``bytes_down``, the rounds'
        totals (:attr:`RoundRecord.bytes_up`), filled in where unset."""
        return replace(
            self,
            bytes_up=sum(r.bytes_up for r in records) if self.bytes_up is None else self.bytes_up,
            bytes_down=sum(r.bytes_down for r in records) if self.bytes_down is None else self.bytes_down,
        )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    """Writes one run folder; an observer of the engine."""

    def __init__(
        self, out_dir: str | Path, config: Config, records: Sequence[RoundRecord] = (), plot: Plot = plot_curves,
        names: MetricNames = CLASSIFICATION_METRICS,
    ) -> None:
        """Start the folder; a resumed run passes the records it already has,
        and ``metrics.jsonl`` is rewritten to exactly those first. ``plot``
        draws ``curves.png`` from the rows (e.g. a :class:`~fedtrain.curves.CurvesProcess`'s ``draw``)."""
        self.dir = Path(out_dir)
        self._plot = plot
        self._names = names
        self.dir.mkdir(parents=True, exist_ok=True)
        text = dumps(config)
        _write_atomic(self.dir / CONFIG_FILE, text.encode())
        self._tensorboard = None
        if config.run.tensorboard:
            from fedtrain.tensorboard_log import TensorBoardLog

            self._tensorboard = TensorBoardLog(self.dir, text, first_round=len(records) + 1)
        self._metrics = open(self.dir / METRICS_FILE, "w", encoding="utf-8")
        self.records: list[RoundRecord] = []
        for record in records:
            self._write(record)

    def _write(self, record: RoundRecord) -> dict[str, object]:
        self.records.append(record)
        row = record.as_json()
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        return row

    def on_round(self, record: RoundRecord, params: torch.Tensor) -> None:
        row = self._write(record)
        if self._tensorboard is not None:
            self._tensorboard.add_round_(row, self._names.names)

    def finish(self, summary: Summary, state: Params) -> None:
        """Write the summary, ``model.pt`` (``state``: the model's whole
        ``state_dict``, frozen tensors included, a tied tensor under each of
        its names) and the plot."""
        self._metrics.close()
        _write_atomic(self.dir / SUMMARY_FILE, (json.dumps(asdict(summary), indent=2) + "\n").encode())
        tmp = self.dir / (MODEL_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.dir / MODEL_FILE)
        if self._tensorboard is not None:
            self._tensorboard.close()
        title = PlotTitle(run_name(self.dir), headline(summary))
        self._plot([r.as_json() for r in self.records], self.dir / CURVES_FILE, self._names, title)


def run_name(run_dir: Path) -> str:
    """A run's name for people: its folder's, less the time stamp of a default folder (so the config's)."""
    return TIMESTAMP_SUFFIX.sub("", Path(run_dir).resolve().name)


def strategy_label(name: str) -> str:
    """``strategy.name`` as a person reads it: a built-in's class name (``FedAvg``), a plug-in's ``Class``."""
    return BUILTIN_STRATEGIES.get(name.lower(), name).rpartition(":")[2] or name


def headline(summary: Summary) -> str:
    """The strategy and the final score (and ε with privacy): ``FedAvg, 0.958``."""
    final = summary.final_metrics.get(summary.score, summary.final_accuracy)
    parts = [strategy_label(summary.strategy), "-" if final is None else f"{final:.3f}"]
    if summary.epsilon is not None:
        parts.append(f"ε = {summary.epsilon:.2f}")
    return ", ".join(parts)


def read_metrics(run_dir: str | Path) -> list[dict[str, float | int | None]]:
    """The rows of a run's ``metrics.jsonl``."""
    lines = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_summary(run_dir: str | Path) -> Summary:
    """A finished run's ``summary.json``."""
    return Summary(**json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8")))
