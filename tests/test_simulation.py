"""End-to-end runs of the embedded default: accuracy, determinism, the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtrain import config
from fedtrain.cli import main
from fedtrain.models import build_model
from fedtrain.results import read_metrics
from fedtrain.simulation import simulate

RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "model.pt", "curves.png")


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The embedded default, run twice through the CLI with the same seed."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    assert main(["simulate", "--quiet", "--out", str(a)]) == 0
    assert main(["simulate", "--quiet", "--out", str(b)]) == 0
    return a, b


def test_default_fedavg_on_dirichlet_digits_reaches_093(default_runs: tuple[Path, Path]) -> None:
    summary = json.loads((default_runs[0] / "summary.json").read_text())

    print(f"default (Dirichlet 0.5) final accuracy: {summary['final_accuracy']:.4f}")
    assert summary["final_accuracy"] >= 0.93
    assert summary["rounds"] == 100 and summary["seed"] == 0


def test_iid_reaches_095() -> None:
    result = simulate(config.load(None, ["data.partition=iid"]))

    print(f"IID final accuracy: {result.summary.final_accuracy:.4f}")
    assert result.summary.final_accuracy >= 0.95


def test_same_seed_gives_bit_identical_metrics(default_runs: tuple[Path, Path]) -> None:
    rows_a, rows_b = (read_metrics(d) for d in default_runs)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731

    assert len(rows_a) == 100
    assert strip(rows_a) == strip(rows_b)
    state_a = torch.load(default_runs[0] / "model.pt", weights_only=True)
    state_b = torch.load(default_runs[1] / "model.pt", weights_only=True)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_run_folder_is_complete_and_readable(default_runs: tuple[Path, Path]) -> None:
    run = default_runs[0]
    rows = read_metrics(run)
    summary = json.loads((run / "summary.json").read_text())
    cfg = config.load(run / "config.toml")
    model = build_model(cfg.model, (64,), 10, seed=1)

    assert all((run / f).stat().st_size > 0 for f in RUN_FILES)
    assert {"round", "accuracy", "loss", "num_clients", "seconds"} <= set(rows[0])
    assert {"final_accuracy", "rounds", "wall_seconds", "seed"} <= set(summary)
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert cfg == config.load()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_different_seed_gives_a_different_run(quick_config: config.Config) -> None:
    a = simulate(quick_config)
    b = simulate(config.replace(quick_config, ["run.seed=1"]))

    assert [r.loss for r in a.records] != [r.loss for r in b.records]


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy.name=fedsgd", "strategy.options.server_lr=1.0"],
        ["strategy.name=fedprox"],
        ["strategy.name=multi_krum", "strategy.options.num_byzantine=1"],
        ["model.name=cnn", "model.hidden=16"],
        ["data.partition=shards"],
        ["data.partition=hash", "data.num_clients=8", "strategy.clients_per_round=4"],
        ["client.optimizer=adam", "client.lr=0.01"],
    ],
)
def test_variants_learn(quick_config: config.Config, overrides: list[str]) -> None:
    cfg = config.replace(quick_config, overrides + ["run.rounds=4"])

    result = simulate(cfg)

    assert result.records[-1].loss < result.records[0].loss or result.records[-1].accuracy > 0.5
    assert all(r.num_clients == cfg.strategy.clients_per_round for r in result.records)


def test_simulation_configs_run(tmp_path: Path) -> None:
    files = sorted(Path(__file__).parent.parent.joinpath("simulations").glob("*.toml"))

    for path in files:
        if path.stem.startswith("shakespeare"):  # needs the plays: tests/test_shakespeare.py runs them on a fixture
            continue
        cfg = config.replace(config.load(path), ["run.rounds=2"])
        result = simulate(cfg)
        assert len(result.records) == 2, path.name
