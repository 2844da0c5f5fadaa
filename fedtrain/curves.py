"""``curves.png``: a run's test accuracy, loss and (with privacy) ε per round.

The figure is drawn with matplotlib's object API (a ``Figure`` saved through
its Agg canvas), which neither imports pyplot nor changes the backend of the
process that calls it. Importing matplotlib costs about as much as a short
run's whole training, so ``fedtrain simulate`` draws in a
:class:`CurvesProcess`: a child started before the parent imports torch, which
imports matplotlib on another core meanwhile (and draws a warm-up figure, so
that fonts and caches are loaded) and draws as soon as the rows arrive. This
module imports neither torch nor matplotlib until it draws.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fedtrain.metrics import CLASSIFICATION_METRICS, MetricNames

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

Rows = Sequence[Mapping[str, Any]]
"""Rounds as ``metrics.jsonl`` rows (``RoundRecord.as_json()``)."""


@dataclass(frozen=True)
class PlotTitle:
    """The title of ``curves.png``: which run (``name``: its config) and its
    headline figure (``headline``: the strategy and the final score, e.g.
    ``FedAvg, 0.958``), so that a plot lifted out of its folder still says
    what it shows."""

    name: str
    headline: str

    def text(self) -> str:
        return f"{self.name} — {self.headline}" if self.name else self.headline


def plot_curves(
    rows: Rows, path: Path, names: MetricNames = CLASSIFICATION_METRICS, title: PlotTitle | None = None
) -> None:
    """:func:`curves_figure` as a PNG at ``path``."""
    curves_figure(rows, names, title).savefig(path, dpi=100)


def curves_figure(rows: Rows, names: MetricNames = CLASSIFICATION_METRICS, title: PlotTitle | None = None) -> Figure:
    """The task's score (e.g. test accuracy), its loss next to the clients'
    training loss, and (with privacy) ε per round, side by side, under ``title``."""
    from matplotlib.figure import Figure

    rounds = [r["round"] for r in rows]
    private = [(r["round"], r["epsilon"]) for r in rows if r.get("epsilon") is not None]
    fig = Figure(figsize=(15 if private else 10, 4))
    if title is not None:
        fig.suptitle(title.text())
    axes = fig.subplots(1, 3 if private else 2)
    ax_acc, ax_loss = axes[0], axes[1]
    ax_acc.plot(rounds, [r.get(names.score) for r in rows], marker=".")
    ax_acc.set(xlabel="round", ylabel=f"test {names.score}", title=names.score.capitalize())
    if names.score == "accuracy":
        ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(rounds, [r.get(names.loss) for r in rows], marker=".", color="tab:red", label="test")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train), marker=".", color="tab:orange", alpha=0.6, label="train (clients)")
    ax_loss.set(xlabel="round", ylabel=names.loss, title="Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if private:
        ax_eps = axes[2]
        ax_eps.plot(*zip(*private), marker=".", color="tab:purple")
        ax_eps.set(xlabel="round", ylabel="ε", title=f"Privacy spent (δ = {rows[-1]['delta']:g})")
        ax_eps.grid(alpha=0.3)
    lay_out_(fig)
    return fig


def lay_out_(fig: Figure) -> None:
    """Fit ``fig``'s plots and labels into it (``tight_layout``) once, and
    leave it with no layout engine: the placeholder that ``tight_layout``
    leaves behind makes ``savefig`` draw the whole figure once more, without
    rendering, before the drawing it saves, for the same picture."""
    fig.tight_layout()
    fig.set_layout_engine(None)


class CurvesProcess:
    """Draws ``curves.png`` in a child process, so that importing matplotlib
    overlaps the parent's own start-up and training instead of following them.

    Use it as a context manager: :meth:`draw` stands in for
    :func:`plot_curves` and returns at once; leaving the block waits until
    the child has written the file (when nothing was drawn, or the block
    raised, the child is stopped instead). Should the child fail or not start (e.g. ``fedtrain`` is not
    importable from its ``sys.path``), the plot is drawn in this process
    instead, so an error (matplotlib missing, the folder not writable) is
    raised here as it would be without the child.
    """

    def __init__(self, name: str = "") -> None:
        """``name`` replaces the run's name in the title the run folder's
        writer gives (e.g. the config file's stem, where the writer knows
        only the folder)."""
        self._name = name
        self._job: tuple[list[Mapping[str, Any]], Path, MetricNames, PlotTitle | None] | None = None
        try:
            self._child: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "fedtrain.curves"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            log.debug("could not start the plotting process (%s); plotting in process", exc)
            self._child = None

    def draw(
        self, rows: Rows, path: Path, names: MetricNames = CLASSIFICATION_METRICS, title: PlotTitle | None = None
    ) -> None:
        """Hand the child the rows to plot to ``path``."""
        title = self.title_for(title)
        self._job = ([dict(r) for r in rows], Path(path), names, title)
        if self._child is None or self._child.stdin is None:
            return
        try:
            request = {"path": str(path), "rows": self._job[0], "names": [list(names.names), names.score, names.loss],
                       "title": None if title is None else [title.name, title.headline]}
            self._child.stdin.write(json.dumps(request).encode())
            self._child.stdin.close()
        except OSError:  # the child has died; close() plots in process
            pass

    def title_for(self, title: PlotTitle | None) -> PlotTitle | None:
        """``title`` with this process's ``name``, when it was given one."""
        return replace(title, name=self._name) if title is not None and self._name else title

    def close(self) -> None:
        """Wait until the child has written the file, or plot here if it did
        not; with nothing to draw, stop the child."""
        if self._child is not None and self._job is None:
            self._child.kill()
            self._child.wait()
            return
        code = None
        if self._child is not None:
            if self._child.stdin is not None and not self._child.stdin.closed:
                try:
                    self._child.stdin.close()
                except OSError:
                    pass
            code = self._child.wait()
        if self._job is not None and code != 0:
            log.debug("the plotting process exited with %s; plotting in process", code)
            plot_curves(*self._job)

    def __enter__(self) -> CurvesProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:  # the run failed: no plot
            self._job = None
        self.close()


WARM_UP_ROWS: Rows = tuple(
    {"round": r, "accuracy": 0.5, "loss": 1.0, "train_loss": 1.5, "epsilon": 0.25 * r, "delta": 1e-5}
    for r in (1, 2, 3)
)
"""What the child draws, unsaved, while it waits for the run: every kind of
plot and text ``curves.png`` has, so that the real figure finds the fonts
loaded and matplotlib's caches filled."""


def _serve() -> int:
    """The child: import matplotlib and, unless the job has already arrived,
    draw :data:`WARM_UP_ROWS` into memory; then plot the job read from stdin
    (none: exit). The cyclic garbage collector stays off: the process draws
    one figure and exits, and collections during matplotlib's import would
    only delay it."""
    import gc
    import io
    import select

    gc.disable()
    import matplotlib.figure  # noqa: F401  (the slow part, done while the parent works)

    if not select.select([sys.stdin], [], [], 0)[0]:
        curves_figure(WARM_UP_ROWS, title=PlotTitle("warm-up", "FedAvg, 0.500")).savefig(io.BytesIO(), dpi=100)
    request = sys.stdin.buffer.read()
    if not request:
        return 0
    job = json.loads(request)
    names, score, loss = job["names"]
    title = job.get("title")
    plot_curves(job["rows"], Path(job["path"]), MetricNames(tuple(names), score, loss),
                None if title is None else PlotTitle(*title))
    return 0


if __name__ == "__main__":
    code = _serve()
    sys.stdout.flush()
    os._exit(code)  # the file is written and closed; tearing down matplotlib would only delay the parent
