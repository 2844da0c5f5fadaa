"""curves.png: drawn from metrics rows, in a child process or, failing that, in process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedtrain.curves import CurvesProcess, plot_curves

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
