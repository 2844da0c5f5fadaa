"""``fedtrain compare RUN_DIR...``: several run folders side by side.

What a researcher does after every sweep, without a notebook: one markdown
table of each run's final and best metrics, rounds, wall time, ε and the
config keys whose values differ between the runs, and one plot that
overlays their curves (the task's metrics, and ε with privacy) against the
round and, where every run recorded them, against virtual time
(``virtual_time``) and the bytes sent (``bytes_up`` + ``bytes_down``, summed
over the rounds). The legend names each run by what differs in its config.
matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fedtrain.curves import lay_out_
from fedtrain.errors import DataError, MissingFileError, UsageError
from fedtrain.results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, Summary, read_metrics, read_summary, run_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NOT_PLOTTED = frozenset({"round", "failures", "delta", "virtual_time", "bytes_up", "bytes_down"})
"""Fields of a ``metrics.jsonl`` row that are not curves (the round, the axes, the reasons)."""


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'strategy': {'name': 'fedavg'}}`` → ``{'strategy.name': 'fedavg'}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _value(value: Any) -> str:
    """A config value as it is written after ``--set``: ``fedadam``, ``0.1``, ``true``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class ComparedRun:
    """One finished run folder: its config (flattened to dotted keys), summary and rows."""

    dir: Path
    config: Mapping[str, Any]
    summary: Summary
    rows: Sequence[Mapping[str, Any]]

    @classmethod
    def read(cls, run_dir: str | Path) -> ComparedRun:
        folder = Path(run_dir)
        for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE):
            if not (folder / name).is_file():
                raise MissingFileError(
                    f"RUN_DIR {str(folder)!r}: no {name}; give the folders of finished runs (written by "
                    "fedtrain simulate or fedtrain server)"
                )
        try:
            config = flatten(tomllib.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
            summary = read_summary(folder)
            rows = read_metrics(folder)
        except (ValueError, TypeError) as exc:
            raise DataError(f"RUN_DIR {str(folder)!r}: cannot be read as a run folder ({exc})") from None
        return cls(folder, config, summary, rows)

    def final(self, metric: str) -> float | None:
        return self.summary.final_metrics.get(metric)

    def best(self) -> float | None:
        s = self.summary
        return s.best_score if s.best_score is not None else s.best_accuracy


@dataclass(frozen=True)
class Comparison:
    """Runs to compare, and the config keys whose values differ between them
    (a key that some runs' configs lack, e.g. one added since, differs only
    when the runs that have it disagree)."""

    runs: tuple[ComparedRun, ...]
    differing: tuple[str, ...]

    @classmethod
    def of(cls, run_dirs: Sequence[str | Path]) -> Comparison:
        if not run_dirs:
            raise UsageError("give at least one RUN_DIR to compare")
        runs = tuple(ComparedRun.read(d) for d in run_dirs)
        keys: list[str] = []
        for run in runs:
            keys.extend(k for k in run.config if k not in keys)
        differing = tuple(
            k for k in keys if len({_value(r.config[k]) for r in runs if k in r.config}) > 1
        )
        return cls(runs, differing)

    def labels(self) -> list[str]:
        """Each run's name in the legend: what differs in its config
        (``strategy.name=fedadam, run.seed=1``), or its folder's name when
        that does not tell the runs apart."""
        by_config = [
            ", ".join(f"{k}={_value(r.config[k])}" if k in r.config else f"{k}=-" for k in self.differing)
            for r in self.runs
        ]
        if self.differing and len(set(by_config)) == len(by_config):
            return by_config
        return [run_name(r.dir) for r in self.runs]

    def metric_names(self) -> list[str]:
        """The task's metrics of the runs, in order (their summaries' ``final_metrics``)."""
        names: list[str] = []
        for run in self.runs:
            names.extend(m for m in run.summary.final_metrics if m not in names)
        return names

    def curves(self) -> list[str]:
        """What ``--metric`` may name: every number a round row of some run holds."""
        names: list[str] = []
        for run in self.runs:
            for row in run.rows:
                names.extend(k for k, v in row.items() if k not in NOT_PLOTTED and k not in names
                             and isinstance(v, (int, float)) and not isinstance(v, bool))
        return names

    def table(self) -> str:
        """The markdown table: one line per run."""
        scores = {r.summary.score for r in self.runs}
        best = f"best {scores.pop()}" if len(scores) == 1 else "best score"
        metrics = self.metric_names()
        header = ["run", *self.differing, "rounds", *(f"final {m}" for m in metrics), best, "wall s", "ε"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run in self.runs:
            s = run.summary
            cells = [
                run.dir.name,
                *(_value(run.config[k]) if k in run.config else "-" for k in self.differing),
                str(s.rounds),
                *(_number(run.final(m), 4) for m in metrics),
                _number(run.best(), 4),
                _number(s.wall_seconds, 1),
                _number(s.epsilon, 3),
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)

    def _axes(self) -> list[str]:
        axes = ["round"]
        if all(r.rows and all(row.get("virtual_time") is not None for row in r.rows) for r in self.runs):
            axes.append("virtual_time")
        if all(r.rows and all(row.get("bytes_up") is not None for row in r.rows) for r in self.runs):
            axes.append("bytes")
        return axes

    def plotted(self, metric: str | None) -> list[str]:
        """The curves drawn: ``metric`` alone, or each run's score and loss (and ε with privacy)."""
        available = self.curves()
        if metric is not None:
            if metric not in available:
                raise UsageError(f"--metric {metric!r}: the runs record none; allowed: {', '.join(available)}")
            return [metric]
        chosen: list[str] = []
        for run in self.runs:
            loss = "loss" if "loss" in run.summary.final_metrics else None
            chosen.extend(m for m in (run.summary.score, loss) if m is not None and m not in chosen)
        if any(r.summary.epsilon is not None for r in self.runs):
            chosen.append("epsilon")
        return [m for m in chosen if m in available]

    def figure(self, metric: str | None = None) -> Figure:
        """One row of plots per curve, one column per x axis (round, then virtual
        time and bytes sent where recorded); one colour per run, the legend on the first plot."""
        from matplotlib.figure import Figure

        metrics, axes = self.plotted(metric), self._axes()
        fig = Figure(figsize=(5 * len(axes), 3.5 * len(metrics)))
        grid = fig.subplots(len(metrics), len(axes), squeeze=False)
        labels = self.labels()
        for i, name in enumerate(metrics):
            for j, axis in enumerate(axes):
                ax = grid[i][j]
                for k, (run, label) in enumerate(zip(self.runs, labels)):
                    points = [(x, row[name]) for row, x in zip(run.rows, self._xs(run.rows, axis))
                              if isinstance(row.get(name), (int, float))]
                    if points:
                        ax.plot(*zip(*points), marker=".", color=f"C{k % 10}", label=label)
                ax.set(xlabel="bytes sent" if axis == "bytes" else axis.replace("_", " "),
                       ylabel="ε" if name == "epsilon" else name.replace("_", " "))
                ax.grid(alpha=0.3)
                if axis == "round":
                    ax.xaxis.get_major_locator().set_params(integer=True)
        grid[0][0].legend(fontsize="small")
        fig.suptitle(f"{len(self.runs)} runs" + (f" — differ in {', '.join(self.differing)}" if self.differing else ""))
        lay_out_(fig)
        return fig

    @staticmethod
    def _xs(rows: Sequence[Mapping[str, Any]], axis: str) -> list[float]:
        if axis == "bytes":
            total, out = 0.0, []
            for row in rows:
                total += float(row.get("bytes_up") or 0) + float(row.get("bytes_down") or 0)
                out.append(total)
            return out
        return [float(row[axis]) if row.get(axis) is not None else math.nan for row in rows]

    def plot(self, path: str | Path, metric: str | None = None) -> Path:
        """Write the figure as a PNG at ``path``."""
        out = Path(path)
        if not out.parent.is_dir():
            raise MissingFileError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
        self.figure(metric).savefig(out, dpi=100)
        return out
