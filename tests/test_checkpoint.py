"""Checkpoints: atomic, authenticated, data only, and a resumed run ends exactly like an uninterrupted one."""

from __future__ import annotations

import hashlib
import io
import logging
import stat
from pathlib import Path

import numpy as np
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


def test_checkpoint_in_format_1_is_refused_and_names_what_to_do(tmp_path: Path) -> None:
    """Format 1 was a pickle read with weights_only=False: reading it could run code."""
    simulate(config.load(None, SHORT + ["run.rounds=2"]), out_dir=tmp_path)
    current = checkpoint.read(tmp_path / "checkpoint-000002.pt")
    buffer = io.BytesIO()
    torch.save({"round": current.round, "params": current.params, "engine": dict(current.engine),
                "records": list(current.records), "config": dict(current.config)}, buffer)
    payload = buffer.getvalue()
    old = tmp_path / "checkpoint-000002.pt"
    old.write_bytes(checkpoint.LEGACY_MAGIC + hashlib.sha256(payload).digest() + payload)

    with pytest.raises(CheckpointError, match=r"format 1 .*pickled.*start the run again without --resume"):
        checkpoint.read(old)


def test_state_round_trips_bit_identically(tmp_path: Path) -> None:
    """Tensors, numpy bit-generator states (128-bit ints), nested tuples, bytes."""
    rng = np.random.default_rng(np.random.SeedSequence(5).spawn(2)[1])
    rng.random(3)
    engine = {
        "rng": rng.bit_generator.state,
        "strategy": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, dtype=torch.float64)}},
                     "param_groups": [{"lr": 0.03, "betas": (0.9, 0.99), "params": [0], "foreach": None}]},
        "privacy": {"accountant": {"kind": "rdp", "history": [{"noise_multiplier": 0.7, "sample_rate": 0.25,
                                                                "steps": 3}]},
                    "noise": {"generator": torch.ByteTensor([1, 2, 255])}, "big": -(2**130), "worst": 1.5},
    }
    key = checkpoint.create_key_(tmp_path)
    saved = checkpoint.Checkpoint(7, torch.arange(6, dtype=torch.float32), engine, b'{"round": 1}\n',
                                  {"a": {"b": [1]}}, journal_entries=4)

    loaded = checkpoint.read(checkpoint.save(tmp_path, saved, keep=2, key=key))

    assert loaded.round == 7 and loaded.journal_entries == 4 and loaded.records_jsonl == saved.records_jsonl
    assert torch.equal(loaded.params, saved.params) and loaded.config == saved.config
    assert loaded.engine["rng"] == engine["rng"]
    assert loaded.engine["privacy"]["big"] == -(2**130)
    group = loaded.engine["strategy"]["param_groups"][0]
    assert group == engine["strategy"]["param_groups"][0] and isinstance(group["betas"], tuple)
    moments = loaded.engine["strategy"]["state"][0]
    assert torch.equal(moments["exp_avg"], engine["strategy"]["state"][0]["exp_avg"])
    assert moments["exp_avg"].dtype == torch.float64
    assert torch.equal(loaded.engine["privacy"]["noise"]["generator"], engine["privacy"]["noise"]["generator"])


def test_numpy_scalars_are_saved_as_the_numbers_they_equal(tmp_path: Path) -> None:
    key = checkpoint.create_key_(tmp_path)
    engine = {"worst": np.float64(0.1) + np.float64(0.2), "count": np.int64(2**40)}
    path = checkpoint.save(tmp_path, checkpoint.Checkpoint(1, torch.zeros(1), engine, b"{}\n", {}), 1, key)

    loaded = checkpoint.read(path).engine

    assert type(loaded["worst"]) is float and loaded["worst"] == 0.1 + 0.2
    assert type(loaded["count"]) is int and loaded["count"] == 2**40


@pytest.mark.parametrize(
    "value", [np.zeros(2), {1.5: "x"}, object(), b""], ids=["ndarray", "float-key", "object", "empty-bytes"]
)
def test_state_that_would_need_code_to_load_is_refused_when_saved(tmp_path: Path, value: object) -> None:
    key = checkpoint.create_key_(tmp_path)
    state = {"strategy": {"moments": value}}

    with pytest.raises(CheckpointError, match=r"checkpoint value engine\.strategy\.moments.*allowed"):
        checkpoint.save(tmp_path, checkpoint.Checkpoint(1, torch.zeros(1), state, b"{}\n", {}), 1, key)
    assert not list(tmp_path.glob("checkpoint-*"))


def test_run_key_is_32_secret_bytes_of_mode_0600(tmp_path: Path) -> None:
    simulate(config.load(None, SHORT + ["run.rounds=1"]), out_dir=tmp_path)
    key_file = tmp_path / checkpoint.KEY_FILE

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_key_others_may_read_is_refused(tmp_path: Path) -> None:
    simulate(config.load(None, SHORT + ["run.rounds=1"]), out_dir=tmp_path)
    (tmp_path / checkpoint.KEY_FILE).chmod(0o644)

    with pytest.raises(CheckpointError, match=r"mode 0644 .*allowed: 0600 \(chmod 600"):
        checkpoint.latest(tmp_path)


def test_checkpoint_of_another_run_is_refused_unless_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    simulate(config.load(None, SHORT + ["run.rounds=1"]), out_dir=mine)
    simulate(config.load(None, SHORT + ["run.rounds=1"]), out_dir=other)
    foreign = mine / "checkpoint-000001.pt"
    foreign.write_bytes((other / "checkpoint-000001.pt").read_bytes())

    with pytest.raises(CheckpointError, match=r"HMAC-SHA256 does not verify .*--trust-checkpoint"):
        checkpoint.read(foreign)
    with caplog.at_level(logging.WARNING):
        trusted = checkpoint.read(foreign, trust=True)

    assert trusted.round == 1 and "accepted (--trust-checkpoint) as data only" in caplog.text
