"""The run folder: files a person can read and a plot they can look at.

- ``config.toml``: the fully resolved config, written before training starts;
- ``metrics.jsonl``: one JSON object per round, appended and flushed as it ends;
- ``summary.json``, ``model.pt`` and ``curves.png`` when the run ends.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from fedtrain.config import Config, dumps
from fedtrain.layout import ParamLayout
from fedtrain.types import RoundRecord

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class Summary:
    """The headline of a finished run, as written to ``summary.json``."""

    final_accuracy: float
    final_loss: float
    best_accuracy: float
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    """Writes one run folder; an observer of the engine."""

    def __init__(self, out_dir: str | Path, config: Config, records: Sequence[RoundRecord] = ()) -> None:
        """Start the folder; a resumed run passes the records it already has,
        and ``metrics.jsonl`` is rewritten to exactly those first."""
        self.dir = Path(out_dir)
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

    def finish(self, summary: Summary, params: torch.Tensor, layout: ParamLayout) -> None:
        self._metrics.close()
        _write_atomic(self.dir / SUMMARY_FILE, (json.dumps(asdict(summary), indent=2) + "\n").encode())
        tmp = self.dir / (MODEL_FILE + ".tmp")
        torch.save(layout.unflatten(params.cpu()), tmp)
        os.replace(tmp, self.dir / MODEL_FILE)
        plot_curves(self.records, self.dir / CURVES_FILE)


def plot_curves(records: Sequence[RoundRecord], path: Path) -> None:
    """Test accuracy, loss and (with privacy) ε per round, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    private = [(r.round, r.epsilon) for r in records if r.epsilon is not None]
    fig, axes = plt.subplots(1, 3 if private else 2, figsize=(15 if private else 10, 4))
    ax_acc, ax_loss = axes[0], axes[1]
    ax_acc.plot(rounds, [r.accuracy for r in records], marker=".")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="Accuracy", ylim=(0, 1))
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(rounds, [r.loss for r in records], marker=".", color="tab:red", label="test")
    train = [(r.round, r.train_loss) for r in records if r.train_loss is not None]
    if train:
        ax_loss.plot(*zip(*train), marker=".", color="tab:orange", alpha=0.6, label="train (clients)")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if private:
        ax_eps = axes[2]
        ax_eps.plot(*zip(*private), marker=".", color="tab:purple")
        ax_eps.set(xlabel="round", ylabel="ε", title=f"Privacy spent (δ = {records[-1].delta:g})")
        ax_eps.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_metrics(run_dir: str | Path) -> list[dict[str, float | int | None]]:
    """The rows of a run's ``metrics.jsonl``."""
    lines = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_summary(run_dir: str | Path) -> Summary:
    """A finished run's ``summary.json``."""
    return Summary(**json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8")))
