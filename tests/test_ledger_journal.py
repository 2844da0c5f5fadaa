"""The ledger journal: every release ever published is in ε, even when the
checkpoint that held its ledger is lost; a release never published is not."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtrain import checkpoint, config
from fedtrain.checkpoint import CheckpointError
from fedtrain.cli import main
from fedtrain.config import AccountantKind, GradSampleMode
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.distributed import DistributedDP
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.events import GaussianEvent
from fedtrain.privacy.noise import SeededGaussian
from fedtrain.privacy.policy import PrivacyPolicy
from fedtrain.privacy.sample_level import SampleLevelDP
from fedtrain.privacy.user_level import UserLevelDP
from fedtrain.results import read_metrics
from fedtrain.simulation import simulate
from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientUpdate

USER_DP = ["run.rounds=3", "strategy.clients_per_round=4", "run.keep_checkpoints=3", "privacy.mode=user",
           "privacy.noise_multiplier=0.8", "strategy.sampling=poisson", "privacy.secure_noise=false"]
DELTA = 1e-5


def _journal(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / checkpoint.JOURNAL_FILE).read_text().splitlines()]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-50] ^= 1
    path.write_bytes(bytes(data))


def _epsilon_of(events: list[dict[str, Any]]) -> float:
    """ε of ``events`` (journal JSON) composed one after another, by the project's accountant."""
    accountant = Accountant(AccountantKind.RDP)
    for event in events:
        accountant.compose(GaussianEvent.from_json(event))
    return accountant.epsilon(DELTA)


def _strip(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dp") / "run"
    simulate(config.load(None, USER_DP), out_dir=run)
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_round_rerun_after_its_checkpoint_is_lost_costs_twice(dp_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's reproduction, small: the newest checkpoint is corrupt, resume
    re-runs its round with fresh noise; both releases were seen."""
    run = _copy(dp_run, tmp_path / "run")
    plain = read_metrics(dp_run)[-1]["epsilon"]
    released = [e for line in _journal(run) for e in line["events"]["coordinator"]]
    _flip_byte(run / "checkpoint-000003.pt")

    assert main(["simulate", "--quiet", "--resume", str(run)]) == 0, capsys.readouterr().err

    resumed = read_metrics(run)[-1]["epsilon"]
    twice = _epsilon_of(released + released[-1:])
    assert [r["round"] for r in read_metrics(run)] == [1, 2, 3]
    assert resumed >= twice - 1e-12 and resumed == pytest.approx(twice, rel=1e-12)
    assert resumed > plain
    assert [line["round"] for line in _journal(run)] == [1, 2, 3, 3]


def test_release_never_published_is_not_counted_and_the_run_ends_as_uninterrupted(
    dp_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after round 3's journal entry, before its checkpoint: nothing of
    round 3 was published, so the resumed run equals the uninterrupted one; a
    ``void`` line keeps later resumes from counting it."""
    run = _copy(dp_run, tmp_path / "run")
    (run / "checkpoint-000003.pt").unlink()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                               (run / "metrics.jsonl").read_text().splitlines()[:2]))

    with caplog.at_level(logging.WARNING):
        simulate(config.load(run / "config.toml"), out_dir=run, resume=True)

    assert "never published" in caplog.text
    assert _strip(run) == _strip(dp_run)
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (dp_run, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = _journal(run)
    assert [(line["round"], line.get("void")) for line in lines] == [(1, None), (2, None), (3, None), (3, 2), (3, None)]

    _flip_byte(run / "checkpoint-000003.pt")
    simulate(config.load(run / "config.toml"), out_dir=run, resume=True)

    released = [e for line in lines[:2] for e in line["events"]["coordinator"]]
    again = lines[4]["events"]["coordinator"]
    assert read_metrics(run)[-1]["epsilon"] == pytest.approx(_epsilon_of(released + again + again), rel=1e-12)


def test_journal_entry_is_on_disk_before_the_round_is_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int, int]] = []
    save = checkpoint.save

    def checking_save(run_dir: Path, saved: checkpoint.Checkpoint, keep: int, key: bytes) -> Path:
        lines = _journal(Path(run_dir))
        seen.append((saved.round, lines[-1]["round"], len(lines) - saved.journal_entries))
        return save(run_dir, saved, keep, key)

    monkeypatch.setattr(checkpoint, "save", checking_save)
    simulate(config.load(None, USER_DP), out_dir=tmp_path)

    assert seen == [(1, 1, 0), (2, 2, 0), (3, 3, 0)]


def test_run_without_privacy_journals_nothing(tmp_path: Path) -> None:
    simulate(config.load(None, ["run.rounds=2", "strategy.clients_per_round=4"]), out_dir=tmp_path)

    assert (tmp_path / checkpoint.JOURNAL_FILE).read_bytes() == b""
    assert checkpoint.read(tmp_path / "checkpoint-000002.pt").journal_entries == 0


def _tamper_noise(run: Path) -> None:
    """Raise round 3's noise multiplier in the journal: it would count for less ε."""
    path = run / checkpoint.JOURNAL_FILE
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["events"]["coordinator"][0]["noise_multiplier"] = 50.0
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")


def test_tampered_journal_is_refused_and_trust_counts_it_and_seals_it(
    dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(dp_run, tmp_path / "run")
    _flip_byte(run / "checkpoint-000003.pt")
    _tamper_noise(run)
    before = (run / "metrics.jsonl").read_bytes()

    refused = main(["simulate", "--quiet", "--resume", str(run)])
    err = capsys.readouterr().err

    assert refused == 2
    assert "ledger.jsonl line 3: HMAC-SHA256 does not verify" in err and "--trust-checkpoint" in err
    assert (run / "metrics.jsonl").read_bytes() == before
    assert main(["simulate", "--quiet", "--resume", str(run), "--trust-checkpoint"]) == 0
    assert main(["simulate", "--quiet", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert [line["round"] for line in _journal(run)] == [1, 2, 3, 3]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop-last", r"2 entries, but the checkpoint of round 3 accounts for 3"),
        ("drop-middle", r"line 2: seq = 2; expected 1"),
        ("delete", r"ledger.jsonl: missing, so releases after round 3 cannot be accounted"),
    ],
)
def test_journal_cut_short_is_refused_rather_than_under_counted(dp_run: Path, tmp_path: Path, damage: str,
                                                                message: str) -> None:
    run = _copy(dp_run, tmp_path / "run")
    path = run / checkpoint.JOURNAL_FILE
    lines = path.read_text().splitlines(keepends=True)
    if damage == "delete":
        path.unlink()
    else:
        path.write_text("".join(lines[:2] if damage == "drop-last" else lines[:1] + lines[2:]))

    with pytest.raises(CheckpointError, match=message):
        simulate(config.load(run / "config.toml"), out_dir=run, resume=True)


def test_unreadable_journal_line_is_refused_even_when_trusted(dp_run: Path, tmp_path: Path) -> None:
    run = _copy(dp_run, tmp_path / "run")
    path = run / checkpoint.JOURNAL_FILE
    path.write_text(path.read_text().replace('"round":2', '"round":"2"'))

    with pytest.raises(CheckpointError, match=r"ledger.jsonl line 2: round = '2'; expected an integer"):
        simulate(config.load(run / "config.toml"), out_dir=run, resume=True, trust_checkpoint=True)


def test_torn_last_line_was_never_published_and_is_dropped(dp_run: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    run = _copy(dp_run, tmp_path / "run")
    path = run / checkpoint.JOURNAL_FILE
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"events":{"coordinator":[{"noise_mul')

    with caplog.at_level(logging.WARNING):
        simulate(config.load(run / "config.toml", ["run.rounds=4"]), out_dir=run, resume=True)

    assert "incomplete last line" in caplog.text
    assert path.read_bytes().startswith(whole) and len(_journal(run)) == 4


def _user() -> UserLevelDP:
    return UserLevelDP(Accountant(AccountantKind.RDP), noise_multiplier=0.9, clip=1.0, sample_rate=0.2,
                       amplified=True, expected_cohort=2.0, delta=DELTA, max_epsilon=0.0, noise=SeededGaussian(0))


def _sample() -> SampleLevelDP:
    task = DpSgdTask(noise_multiplier=1.0, max_grad_norm=1.0, mode=GradSampleMode.HOOKS)
    return SampleLevelDP(AccountantKind.RDP, task, {"a": 40, "b": 400}, batch_size=20, epochs=1, delta=DELTA,
                         max_epsilon=0.0)


def _distributed() -> DistributedDP:
    return DistributedDP(Accountant(AccountantKind.RDP), noise_multiplier=0.9, clip=1.0, sample_rate=0.2,
                         amplified=True, expected_cohort=2.0, delta=DELTA, max_epsilon=0.0)


@pytest.mark.parametrize("make", [_user, _sample, _distributed], ids=["user", "sample", "distributed"])
def test_release_events_composed_again_give_the_ledger_of_the_release(make: Any) -> None:
    policy: PrivacyPolicy = make()
    if isinstance(policy, DistributedDP):
        updates = [AggregateUpdate(torch.full((3,), 0.1), num_examples=2, contributors=2,
                                   origin=AggregateOrigin.SECURE_SUM, unit_weights=True)]
    else:
        updates = [ClientUpdate(c, torch.full((3,), 0.1), num_examples=5) for c in ("a", "b")]
    policy.release(1, ["a", "b"], updates)
    before = copy.deepcopy(policy.state_dict())
    release = policy.release(2, ["a", "b"], updates)
    as_json = json.loads(json.dumps({k: [e.to_json() for e in v] for k, v in release.events.items()}))
    replayed = make()
    replayed.load_state_dict(before)

    replayed.compose_release_({k: tuple(GaussianEvent.from_json(e) for e in v) for k, v in as_json.items()})

    assert release.events
    assert replayed.report().epsilon == policy.report().epsilon > 0
