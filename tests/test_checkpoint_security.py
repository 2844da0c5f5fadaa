"""A crafted checkpoint never runs code on ``fedtrain simulate --resume``.

The bait is a pickle whose loading creates a file (``__reduce__`` returning
``open(path, "w")`` or ``os.system("touch path")``). It is put in a run folder
as the newest checkpoint in every disguise an attacker has: a bare pickle,
today's old format 1 header with a correct SHA-256, the format 2 header with
a correct SHA-256 and a forged HMAC, a correct HMAC (an attacker who stole
the run key) and with ``--trust-checkpoint``. The resume, through the real
CLI entry point, creates no file, and either falls back to the valid older
checkpoint or fails with a clear message.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from fedtrain import checkpoint, config
from fedtrain.checkpoint import CheckpointError
from fedtrain.cli import main
from fedtrain.results import read_metrics
from fedtrain.simulation import simulate

SHORT = ["run.rounds=2", "strategy.clients_per_round=4", "run.keep_checkpoints=3"]


class CreatesFile:
    """Unpickling this creates ``path`` (an empty file, opened for writing)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, ...]]:
        return open, (str(self.path), "w")


class RunsShell:
    """Unpickling this runs ``touch path`` in a shell."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, ...]]:
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("valid") / "run"
    simulate(config.load(None, SHORT), out_dir=run)
    return run


def _torch_payload(bait: object) -> bytes:
    buffer = io.BytesIO()
    torch.save({"round": 3, "params": torch.zeros(1), "engine": {"strategy": bait}, "records_jsonl": b"{}\n",
                "config": {}, "journal_entries": 0}, buffer)
    return buffer.getvalue()


def _disguises(run: Path, bait: object) -> dict[str, bytes]:
    raw = pickle.dumps(bait)
    zipped = _torch_payload(bait)
    key = (run / checkpoint.KEY_FILE).read_bytes()
    stolen = hmac.new(key, checkpoint.MAGIC + zipped, hashlib.sha256).digest()
    return {
        "bare-pickle": raw,
        "bare-torch-save": zipped,
        "format-1-header": checkpoint.LEGACY_MAGIC + hashlib.sha256(raw).digest() + raw,
        "format-1-torch-save": checkpoint.LEGACY_MAGIC + hashlib.sha256(zipped).digest() + zipped,
        "forged-hmac": checkpoint.MAGIC + hashlib.sha256(zipped).digest() + os.urandom(32) + zipped,
        "stolen-key": checkpoint.MAGIC + hashlib.sha256(zipped).digest() + stolen + zipped,
    }


DISGUISES = ["bare-pickle", "bare-torch-save", "format-1-header", "format-1-torch-save", "forged-hmac", "stolen-key"]


def test_the_bait_does_create_a_file_when_unpickled(tmp_path: Path) -> None:
    """Guards the tests below: the payloads are live."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesFile(marker))).close()
    torch.load(io.BytesIO(_torch_payload(RunsShell(tmp_path / "shell"))), weights_only=False)

    assert marker.exists() and (tmp_path / "shell").exists()


@pytest.mark.parametrize("disguise", DISGUISES)
@pytest.mark.parametrize("bait", [CreatesFile, RunsShell], ids=["open", "os.system"])
def test_crafted_newest_checkpoint_runs_nothing_and_resume_falls_back(
    valid_run: Path, tmp_path: Path, disguise: str, bait: type,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(valid_run, run)
    marker = tmp_path / "pwned"
    (run / "checkpoint-000003.pt").write_bytes(_disguises(run, bait(marker))[disguise])

    with caplog.at_level(logging.WARNING):
        rc = main(["simulate", "--quiet", "--resume", str(run)])

    assert not marker.exists()
    assert rc == 0, capsys.readouterr().err
    assert "skipping checkpoint checkpoint-000003.pt" in caplog.text
    assert [r["round"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize(
    ("disguise", "message"),
    [
        ("bare-pickle", "not a fedtrain checkpoint"),
        ("format-1-header", "format 1 .*pickled Python objects.*start the run again without --resume"),
        ("forged-hmac", "HMAC-SHA256 does not verify .*--trust-checkpoint"),
        ("stolen-key", "payload is not plain data"),
    ],
)
def test_crafted_only_checkpoint_runs_nothing_and_resume_fails_clearly(
    valid_run: Path, tmp_path: Path, disguise: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(valid_run, run)
    for old in run.glob("checkpoint-*.pt"):
        old.unlink()
    marker = tmp_path / "pwned"
    (run / "checkpoint-000003.pt").write_bytes(_disguises(run, CreatesFile(marker))[disguise])

    rc = main(["simulate", "--quiet", "--resume", str(run)])

    err = capsys.readouterr().err
    assert not marker.exists()
    assert rc == 2
    assert "fedtrain: error:" in err and "no valid checkpoint to resume from" in err
    assert re.search(message, err), err


@pytest.mark.parametrize("disguise", ["bare-torch-save", "forged-hmac", "stolen-key"])
def test_trust_checkpoint_still_never_unpickles(valid_run: Path, tmp_path: Path, disguise: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(valid_run, run)
    for old in run.glob("checkpoint-*.pt"):
        old.unlink()
    marker = tmp_path / "pwned"
    (run / "checkpoint-000003.pt").write_bytes(_disguises(run, RunsShell(marker))[disguise])

    rc = main(["simulate", "--quiet", "--resume", str(run), "--trust-checkpoint"])

    assert not marker.exists()
    assert rc == 2 and "no valid checkpoint to resume from" in capsys.readouterr().err


def test_read_refuses_a_payload_with_code_even_under_the_right_key(valid_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(valid_run, run)
    marker = tmp_path / "pwned"
    path = run / "checkpoint-000003.pt"
    path.write_bytes(_disguises(run, CreatesFile(marker))["stolen-key"])

    with pytest.raises(CheckpointError, match=r"not plain data .*Unsupported global"):
        checkpoint.read(path)
    assert not marker.exists()


def test_trust_checkpoint_without_resume_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--quiet", "--out", str(tmp_path / "run"), "--trust-checkpoint"])

    assert rc == 2 and "--trust-checkpoint applies to --resume RUN_DIR only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_folder_without_its_key_is_refused_unless_trusted(valid_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(valid_run, run)
    (run / checkpoint.KEY_FILE).unlink()

    refused = main(["simulate", "--quiet", "--resume", str(run)])
    err = capsys.readouterr().err
    trusted = main(["simulate", "--quiet", "--resume", str(run), "--set", "run.rounds=3", "--trust-checkpoint"])

    assert refused == 2 and "checkpoint.key: missing" in err and "--trust-checkpoint" in err
    assert trusted == 0, capsys.readouterr().err
    assert [r["round"] for r in read_metrics(run)] == [1, 2, 3]
    assert checkpoint.read(run / "checkpoint-000003.pt").round == 3
    assert main(["simulate", "--quiet", "--resume", str(run), "--set", "run.rounds=3"]) == 0


def test_server_resume_hands_trust_checkpoint_to_the_coordinator(tmp_path: Path) -> None:
    from fedtrain.cli import build_parser
    from fedtrain.deploy.server import DeployRequest

    args = build_parser().parse_args(["server", "--insecure", "--resume", str(tmp_path), "--trust-checkpoint"])
    DeployRequest(str(tmp_path), {}, True, 2, 1.0, 1.0, trust_checkpoint=args.trust_checkpoint).write()

    assert DeployRequest.read(tmp_path).trust_checkpoint is True
