"""The run folder: files a person can read and a plot they can look at.

- ``config.toml``: the fully resolved config, written before training starts;
- ``metrics.jsonl``: one JSON object per round, appended and flushed as it ends;
- ``summary.json``, ``model.pt`` and ``curves.png`` when the run ends.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fedtrain.config import Config, dumps
from fedtrain.curves import Rows, plot_curves
from fedtrain.metrics import CLASSIFICATION_METRICS, MetricNames
from fedtrain.types import Params, RoundRecord

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
CURVES_FILE = "curves.png"

Plot = Callable[[Rows, Path, MetricNames], None]
"""Draws ``curves.png`` at the path from the rounds' rows and the task's metric names."""


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
        _write_atomic(self.dir / CONFIG_FILE, dumps(config).encode())
        self._metrics = open(self.dir / METRICS_FILE, "w", encoding="utf-8")
        self.records: list[RoundRecord] = []
        for record in records:
            self.on_round(record, torch.empty(0))

    def on_round(self, record: RoundRecord, params: torch.Tensor) -> None:
        self.records.append(record)
        self._metrics.write(json.dumps(record.as_json()) + "\n")
        self._metrics.flush()

    def finish(self, summary: Summary, state: Params) -> None:
        """Write the summary, ``model.pt`` (``state``: the model's whole
        ``state_dict``, frozen tensors included, a tied tensor under each of
        its names) and the plot."""
        self._metrics.close()
        _write_atomic(self.dir / SUMMARY_FILE, (json.dumps(asdict(summary), indent=2) + "\n").encode())
        tmp = self.dir / (MODEL_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.dir / MODEL_FILE)
        self._plot([r.as_json() for r in self.records], self.dir / CURVES_FILE, self._names)


def read_metrics(run_dir: str | Path) -> list[dict[str, float | int | None]]:
    """The rows of a run's ``metrics.jsonl``."""
    lines = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_summary(run_dir: str | Path) -> Summary:
    """A finished run's ``summary.json``."""
    return Summary(**json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8")))
