"""Checkpoints: atomic, verified, and a resumed run ends exactly like an uninterrupted one."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import pytest
import torch

from fedtrain import checkpoint, config
from fedtrain.checkpoint import CheckpointError
from fedtrain.config import ConfigError
from fedtrain.results import read_metrics
from fedtrain.simulation import simulate

SHORT = ["run.rounds=6", "strategy.clients_per_round=4", "run.keep_checkpoints=3"]


def _strip(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]


def _model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["strategy.name=fedadam", "strategy.options.server_lr=0.03"],
        ["privacy.mode=user", "privacy.noise_multiplier=0.5", "strategy.sampling=poisson",
         "privacy.secure_noise=false", "privacy.adaptive_clip=true", "privacy.clipped_count_stddev=2"],
    ],
    ids=["fedavg", "fedadam", "user-dp"],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, extra: list[str]) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    simulate(config.load(None, SHORT + extra), out_dir=full)
    simulate(config.load(None, SHORT + extra + ["run.rounds=3"]), out_dir=split)

    resumed = simulate(config.load(split / "config.toml", ["run.rounds=6"]), out_dir=split, resume=True)

    assert len(resumed.records) == 6
    assert _strip(split) == _strip(full)
    assert all(torch.equal(_model(full)[k], v) for k, v in _model(split).items())


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    simulate(config.load(None, SHORT), out_dir=tmp_path)

    names = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))

    assert names == ["checkpoint-000004.pt", "checkpoint-000005.pt", "checkpoint-000006.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    simulate(config.load(None, SHORT), out_dir=tmp_path)
    newest = tmp_path / "checkpoint-000006.pt"
    newest.write_bytes(newest.read_bytes()[:-100])

    with caplog.at_level(logging.WARNING):
        saved = checkpoint.latest(tmp_path)

    assert saved.round == 5
    assert "SHA-256 mismatch" in caplog.text


def test_flipped_bit_is_detected(tmp_path: Path) -> None:
    simulate(config.load(None, SHORT), out_dir=tmp_path)
    path = tmp_path / "checkpoint-000006.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="SHA-256"):
        checkpoint.read(path)


def test_resume_with_another_config_names_the_difference(tmp_path: Path) -> None:
    simulate(config.load(None, SHORT + ["run.rounds=2"]), out_dir=tmp_path)

    with pytest.raises(ConfigError, match=r"client.lr: 0.3 → 0.1"):
        simulate(config.load(None, SHORT + ["client.lr=0.1"]), out_dir=tmp_path, resume=True)


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        simulate(config.load(None, SHORT), out_dir=tmp_path, resume=True)


def test_checkpoint_with_records_as_a_list_of_dicts_still_reads(tmp_path: Path) -> None:
    """Checkpoints written before the records were stored as JSON lines."""
    simulate(config.load(None, SHORT + ["run.rounds=2"]), out_dir=tmp_path)
    current = checkpoint.read(tmp_path / "checkpoint-000002.pt")
    buffer = io.BytesIO()
    torch.save({"round": current.round, "params": current.params, "engine": dict(current.engine),
                "records": list(current.records), "config": dict(current.config)}, buffer)
    payload = buffer.getvalue()
    old = tmp_path / "old.pt"
    old.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).digest() + payload)

    legacy = checkpoint.read(old)

    assert legacy.records == current.records and len(legacy.records) == 2
    assert legacy.records_jsonl == current.records_jsonl
    assert torch.equal(legacy.params, current.params)
