"""curves.png: drawn from metrics rows, in a child process or, failing that, in process."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from deployed import background_result, in_background
from fedtrain.curves import CurvesProcess, curves_figure, plot_curves

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"round": r, "accuracy": 0.5 + r / 10, "loss": 1.0 / r, "train_loss": 1.1 / r, "epsilon": None, "delta": None}
    for r in (1, 2, 3)
]


def test_plot_without_and_with_privacy(tmp_path: Path) -> None:
    private = [{**r, "epsilon": 0.5 * r["round"], "delta": 1e-5, "train_loss": None} for r in ROWS]

    plot_curves(ROWS, tmp_path / "plain.png")
    plot_curves(private, tmp_path / "private.png")

    assert (tmp_path / "plain.png").read_bytes()[:8] == PNG
    assert (tmp_path / "private.png").read_bytes()[:8] == PNG


def test_lay_out_saves_the_picture_tight_layout_gives(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = curves_figure(ROWS)
    fig.savefig(tmp_path / "laid-out.png", dpi=100)
    reference = curves_figure(ROWS)
    reference.set_layout_engine("tight")  # matplotlib lays it out at every draw
    reference.savefig(tmp_path / "tight.png", dpi=100)

    assert isinstance(fig, Figure) and fig.get_layout_engine() is None
    assert (tmp_path / "laid-out.png").read_bytes() == (tmp_path / "tight.png").read_bytes()


WARM_CHILD = "test_curves::test_a_warmed_up_child_draws_the_same_file"


@in_background(WARM_CHILD, 3)
def warm_child(root: Path) -> Path:
    """A child given its rows only once it has imported matplotlib and drawn its warm-up figure."""
    with CurvesProcess() as curves:
        time.sleep(3)
        curves.draw(ROWS, root / "child.png")
    return root / "child.png"


def test_a_warmed_up_child_draws_the_same_file(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    child = background_result(WARM_CHILD, tmp_path_factory.mktemp)
    plot_curves(ROWS, tmp_path / "here.png")

    assert child.read_bytes() == (tmp_path / "here.png").read_bytes()


def test_child_draws_before_the_block_ends(tmp_path: Path) -> None:
    with CurvesProcess() as curves:
        curves.draw(ROWS, tmp_path / "curves.png")

    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_without_a_child_the_plot_is_drawn_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))

    with CurvesProcess() as curves:
        curves.draw(ROWS, tmp_path / "curves.png")

    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_an_error_in_the_block_draws_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="run failed"):
        with CurvesProcess():
            raise RuntimeError("run failed")

    assert not list(tmp_path.iterdir())


def test_a_plot_that_fails_raises_here(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with CurvesProcess() as curves:
            curves.draw(ROWS, tmp_path / "missing-folder" / "curves.png")
