"""``run.tensorboard = true``: the rounds as TensorBoard scalars in ``RUN_DIR/tensorboard``.

Written through ``torch.utils.tensorboard``, which needs the ``tensorboard``
package (``pip install 'fedtrain[tensorboard]'``); it is imported only when a
run asks for it, so runs without it neither need nor load it. Point
TensorBoard at a folder of run folders (``tensorboard --logdir runs``) to
see a sweep's runs side by side.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping

from fedtrain.errors import UserError

TENSORBOARD_DIR = "tensorboard"

TAGS: Mapping[str, str] = {
    "train_loss": "train/loss",
    "epsilon": "privacy/epsilon",
    "num_clients": "clients/aggregated",
    "num_failed": "clients/failed",
    "seconds": "time/round_seconds",
}
"""The tag of each field of a ``metrics.jsonl`` row that is not a task metric;
a task metric ``m`` is ``test/m``, any other number ``run/KEY`` (e.g. a
privacy setting's adaptive clip)."""

NOT_SCALARS = frozenset({"round", "delta", "failures"})


class TrackerMissingError(UserError, ModuleNotFoundError):
    """``run.tensorboard = true`` without the ``tensorboard`` package."""


def check_available() -> None:
    """Refuse ``run.tensorboard = true`` when the ``tensorboard`` package is
    not installed, saying how to install it."""
    if importlib.util.find_spec("tensorboard") is None:
        raise TrackerMissingError(
            "run.tensorboard = true: needs the tensorboard package, which is not installed; "
            "install it with pip install 'fedtrain[tensorboard]' (or pip install tensorboard), "
            "or set run.tensorboard = false"
        )


def scalars(row: Mapping[str, Any], metric_names: tuple[str, ...]) -> dict[str, float]:
    """The TensorBoard scalars of one ``metrics.jsonl`` row, by tag."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tag = f"test/{key}" if key in metric_names else TAGS.get(key, f"run/{key}")
        out[tag] = float(value)
    return out


class TensorBoardLog:
    """One run's TensorBoard event files: one step per round, flushed as the
    round ends, so a TensorBoard open on the folder follows the run live."""

    def __init__(self, run_dir: Path, config_text: str, first_round: int = 1) -> None:
        """Start the log in ``run_dir/tensorboard``; a resumed run passes its
        ``first_round``, and events of that round and later that an earlier
        process wrote are dropped (``purge_step``), so a re-run round is not
        shown twice."""
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(str(self.dir), purge_step=first_round if first_round > 1 else None)
        if first_round == 1:
            self._writer.add_text("config", "```toml\n" + config_text + "```", 0)

    def add_round_(self, row: Mapping[str, Any], metric_names: tuple[str, ...]) -> None:
        """Write one round's scalars (a ``metrics.jsonl`` row) at step ``row['round']``."""
        step = int(row["round"])
        for tag, value in scalars(row, metric_names).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
