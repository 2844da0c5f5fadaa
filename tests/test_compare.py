"""fedtrain compare and simulate --sweep: several run folders side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtrain.cli import main
from fedtrain.comparison import Comparison

PNG = b"\x89PNG\r\n\x1a\n"
BASE = ["--quiet", "--set", "run.rounds=2", "--set", "data.partition=iid", "--set", "data.num_clients=6",
        "--set", "strategy.clients_per_round=3"]


def _table_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, sets in (("avg0", ["strategy.name=fedavg", "run.seed=0"]),
                       ("avg1", ["strategy.name=fedavg", "run.seed=1"]),
                       ("adam0", ["strategy.name=fedadam", "run.seed=0"])):
        out = root / name
        assert main(["simulate", *BASE, "--out", str(out), *(a for s in sets for a in ("--set", s))]) == 0
        runs.append(out)
    return runs


def test_compare_prints_the_summaries_numbers_and_writes_three_labelled_curves(
    three_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp.png"

    assert main(["compare", *map(str, three_runs), "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    rows = _table_rows(printed)
    assert [r["run"] for r in rows] == ["avg0", "avg1", "adam0"]
    for row, run in zip(rows, three_runs):
        summary = json.loads((run / "summary.json").read_text())
        assert row["rounds"] == str(summary["rounds"]) == "2"
        assert float(row["final accuracy"]) == pytest.approx(summary["final_metrics"]["accuracy"], abs=5e-5)
        assert float(row["final loss"]) == pytest.approx(summary["final_metrics"]["loss"], abs=5e-5)
        assert float(row["best accuracy"]) == pytest.approx(summary["best_score"], abs=5e-5)
        assert float(row["wall s"]) == pytest.approx(summary["wall_seconds"], abs=0.05)
        assert row["ε"] == "-"
    assert [(r["run.seed"], r["strategy.name"]) for r in rows] == [("0", "fedavg"), ("1", "fedavg"), ("0", "fedadam")]
    assert out.read_bytes()[:8] == PNG

    figure = Comparison.of(three_runs).figure()
    first = figure.axes[0]
    assert [t.get_text() for t in first.get_legend().get_texts()] == [
        "run.seed=0, strategy.name=fedavg", "run.seed=1, strategy.name=fedavg", "run.seed=0, strategy.name=fedadam",
    ]
    assert len(first.lines) == 3
    accuracy = [json.loads(line)["accuracy"] for line in (three_runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert list(first.lines[2].get_ydata()) == accuracy


def test_compare_one_metric_and_an_unknown_one(three_runs: list[Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    figure = Comparison.of(three_runs).figure("train_loss")
    assert [ax.get_ylabel() for ax in figure.axes][0] == "train loss"

    code = main(["compare", *map(str, three_runs), "--metric", "acuracy", "--out", str(tmp_path / "x.png")])

    assert code == 2
    err = capsys.readouterr().err
    assert "--metric 'acuracy'" in err and "accuracy" in err.split("allowed:")[1]
    assert not (tmp_path / "x.png").exists()


def test_compare_refuses_a_folder_that_is_not_a_finished_run(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path)]) == 2
    assert "no config.toml; give the folders of finished runs" in capsys.readouterr().err


def test_sweep_of_two_by_two_makes_four_run_folders_and_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "sweep"

    code = main(["simulate", *BASE, "--set", "run.rounds=1", "--out", str(parent),
                 "--sweep", "strategy.name=fedavg,fedadam", "--sweep", "run.seed=0,1"])

    assert code == 0
    printed = capsys.readouterr().out
    folders = sorted(p for p in parent.iterdir() if p.is_dir())
    assert [p.name for p in folders] == [
        "1-strategy.name=fedavg,run.seed=0", "2-strategy.name=fedavg,run.seed=1",
        "3-strategy.name=fedadam,run.seed=0", "4-strategy.name=fedadam,run.seed=1",
    ]
    for i, folder in enumerate(folders, 1):
        config = (folder / "config.toml").read_text()
        assert f"seed = {(i - 1) % 2}" in config
        assert f"[{i}/4]" in printed
        assert (folder / "curves.png").read_bytes()[:8] == PNG
    rows = _table_rows(printed)
    assert [r["run"] for r in rows] == [p.name for p in folders]
    for row, folder in zip(rows, folders):
        summary = json.loads((folder / "summary.json").read_text())
        assert float(row["final accuracy"]) == pytest.approx(summary["final_accuracy"], abs=5e-5)
    assert (parent / "compare.png").read_bytes()[:8] == PNG


def test_a_bad_sweep_value_is_refused_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "sweep"

    code = main(["simulate", *BASE, "--out", str(parent), "--sweep", "client.lr=0.1,-1"])

    assert code == 2
    assert "client.lr=-1" in capsys.readouterr().err
    assert not parent.exists()


@pytest.mark.parametrize(("sweeps", "message"), [
    (["run.seed"], "expected SECTION.KEY=VALUE1,VALUE2"),
    (["run.seed=1,,2"], "no empty value"),
    (["run.seed=1,1"], "twice"),
    (["run.seed=1", "run.seed=2"], "swept twice"),
])
def test_malformed_sweeps_are_refused(sweeps: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--quiet", "--out", str(tmp_path / "s"), *(a for s in sweeps for a in ("--sweep", s))]

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_sweep_values_keep_commas_inside_lists() -> None:
    from fedtrain.sweep import Sweep

    points = Sweep.parse(["model.lora.target_modules=['q','v'],['k']", "run.seed=0,1"]).points()

    assert [p.overrides for p in points][:2] == [
        ("model.lora.target_modules=['q','v']", "run.seed=0"), ("model.lora.target_modules=['q','v']", "run.seed=1"),
    ]
    assert len(points) == 4
