"""``run.checkpoint_every``: a checkpoint every N rounds and after the last
round (also when the privacy budget stops the run early); a round between
checkpoints is published, so a resume counts its release again, never voids it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtrain import checkpoint, config
from fedtrain.config import AccountantKind
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.events import GaussianEvent
from fedtrain.results import read_metrics
from fedtrain.simulation import simulate

USER_DP = ["strategy.clients_per_round=4", "run.keep_checkpoints=10", "privacy.mode=user",
           "privacy.noise_multiplier=0.8", "strategy.sampling=poisson", "privacy.secure_noise=false"]
DELTA = 1e-5


def _checkpoints(run: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pt"))


def _journal(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / checkpoint.JOURNAL_FILE).read_text().splitlines()]


def _epsilon_of(events: list[dict[str, Any]]) -> float:
    accountant = Accountant(AccountantKind.RDP)
    for event in events:
        accountant.compose(GaussianEvent.from_json(event))
    return accountant.epsilon(DELTA)


def _strip(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]


def test_checkpoints_every_n_rounds_and_after_the_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    simulate(config.load(None, ["run.rounds=7", "run.checkpoint_every=3", "run.keep_checkpoints=10"]),
             out_dir=run, plot=lambda *a, **k: None)
    assert _checkpoints(run) == [3, 6, 7]
    last = checkpoint.latest(run)
    assert last.round == 7 and [r["round"] for r in last.records] == list(range(1, 8))
    assert [r["round"] for r in checkpoint.read(run / "checkpoint-000006.pt", checkpoint.run_key(run)).records] == list(range(1, 7))


def test_every_round_by_default(tmp_path: Path) -> None:
    run = tmp_path / "run"
    simulate(config.load(None, ["run.rounds=3", "run.keep_checkpoints=10"]), out_dir=run, plot=lambda *a, **k: None)
    assert _checkpoints(run) == [1, 2, 3]


def test_a_run_stopped_by_the_budget_checkpoints_its_last_round(tmp_path: Path) -> None:
    free = tmp_path / "free"
    simulate(config.load(None, [*USER_DP, "run.rounds=6"]), out_dir=free, plot=lambda *a, **k: None)
    eps = [r["epsilon"] for r in read_metrics(free)]
    budget = (eps[3] + eps[4]) / 2
    run = tmp_path / "run"
    sets = [*USER_DP, "run.rounds=6", "run.checkpoint_every=3", f"privacy.max_epsilon={budget}"]
    result = simulate(config.load(None, sets), out_dir=run, plot=lambda *a, **k: None)
    assert result.summary.stopped_early and len(result.records) == 4
    assert _checkpoints(run) == [3, 4]
    saved = checkpoint.latest(run)
    assert saved.round == 4 and saved.journal_entries == 4
    assert torch.equal(saved.params, result.params)

    before = _strip(run)
    again = simulate(config.load(run / "config.toml"), out_dir=run, resume=True, plot=lambda *a, **k: None)
    assert again.summary.stopped_early and _strip(run) == before
    assert len(_journal(run)) == 4


@pytest.fixture(scope="module")
def every_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("every2") / "run"
    simulate(config.load(None, [*USER_DP, "run.rounds=5", "run.checkpoint_every=2"]), out_dir=run,
             plot=lambda *a, **k: None)
    assert _checkpoints(run) == [2, 4, 5]
    return run


def test_a_round_between_checkpoints_is_counted_again_never_voided(every_two: Path, tmp_path: Path) -> None:
    """Killed after round 5 was published (metrics.jsonl) and before the
    run's closing checkpoint: round 5 has no checkpoint by design, so its
    release was seen; the resume re-runs it and counts both releases."""
    run = tmp_path / "run"
    shutil.copytree(every_two, run)
    (run / "checkpoint-000005.pt").unlink()
    released = [e for line in _journal(run) for e in line["events"]["coordinator"]]

    simulate(config.load(run / "config.toml"), out_dir=run, resume=True, plot=lambda *a, **k: None)

    lines = _journal(run)
    assert [(line["round"], line.get("void")) for line in lines] == [(r, None) for r in (1, 2, 3, 4, 5, 5)]
    assert [r["round"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    twice = _epsilon_of(released + lines[5]["events"]["coordinator"])
    assert read_metrics(run)[-1]["epsilon"] == pytest.approx(twice, rel=1e-12)
    assert read_metrics(run)[-1]["epsilon"] > read_metrics(every_two)[-1]["epsilon"]


def test_a_round_due_a_checkpoint_without_one_was_never_published_and_is_voided(
    every_two: Path, tmp_path: Path
) -> None:
    """Killed after round 4's journal entry, before its (due) checkpoint:
    nothing of round 4 was published, so its entry is voided and the resumed
    run equals the uninterrupted one."""
    run = tmp_path / "run"
    shutil.copytree(every_two, run)
    lines = (run / checkpoint.JOURNAL_FILE).read_text().splitlines()
    (run / checkpoint.JOURNAL_FILE).write_text("".join(line + "\n" for line in lines[:4]))
    for rnd in (4, 5):
        (run / f"checkpoint-{rnd:06d}.pt").unlink()
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics[:3]))

    simulate(config.load(run / "config.toml"), out_dir=run, resume=True, plot=lambda *a, **k: None)

    journal = [(line["round"], line.get("void")) for line in _journal(run)]
    assert journal == [(1, None), (2, None), (3, None), (4, None), (4, 3), (3, None), (4, None), (5, None)]
    assert _strip(run)[-1]["epsilon"] > _strip(every_two)[-1]["epsilon"]
    assert [r["round"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_checkpoint_every_must_be_a_positive_integer(tmp_path: Path) -> None:
    journal = checkpoint.LedgerJournal.create_(tmp_path)
    with pytest.raises(ValueError, match="run.checkpoint_every = 0"):
        checkpoint.Checkpointer(tmp_path, dict, {}, 2, journal=journal, every=0)
    with pytest.raises(checkpoint.CheckpointError, match="run.checkpoint_every"):
        checkpoint.checkpoint_every({"run": {"checkpoint_every": "2"}})
    assert checkpoint.checkpoint_every({}) == 1
