"""The command line as a user types it. The tests that start a fresh
interpreter to run a simulation or the planner run it in the background as
the session begins (:func:`deployed.in_background`), beside the session's
thread of in-process tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployed import background_result, in_background
from fedtrain.cli import main


CONSOLE_RUN = "test_cli::test_console_script_runs_a_short_simulation"


@in_background(CONSOLE_RUN, 5)
def console_run(root: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``python -m fedtrain.cli simulate`` for two rounds; the process and its run folder."""
    out = root / "run"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedtrain.cli", "simulate", "--quiet", "--out", str(out),
         "--set", "run.rounds=2", "--set", "data.partition=iid"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    return proc, out


def test_console_script_runs_a_short_simulation(tmp_path_factory: pytest.TempPathFactory) -> None:
    proc, out = background_result(CONSOLE_RUN, tmp_path_factory.mktemp)

    assert proc.returncode == 0, proc.stderr
    assert "final accuracy" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_config_file_argument(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[run]\nrounds = 2\n[data]\npartition = 'iid'\n")

    assert main(["simulate", str(cfg), "--quiet", "--out", str(tmp_path / "r")]) == 0
    assert 'partition = "iid"' in (tmp_path / "r" / "config.toml").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "client.lr=-1"], "client.lr = -1.0: must be > 0"),
        (["--set", "data.colour=red"], "data.colour: unknown key"),
        (["--set", "strategy.name=fedmagic"], "fedavg"),
        (["--set", "strategy.options.bogus=1"], "strategy.options.bogus"),
        (["--set", "data.dataset=mnist", "--set", "data.root=/nonexistent"], "data.root"),
        (["/no/such/config.toml"], "does not exist"),
    ],
)
def test_bad_input_fails_before_training_with_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"

    code = main(["simulate", "--quiet", "--out", str(out), *args])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_privacy_planner_prints_epsilon_and_calibrated_noise(capsys: pytest.CaptureFixture[str]) -> None:
    # TF Privacy's MNIST tutorial setting (q = 256/60000, 60 epochs): see tests/test_accountant.py.
    base = ["privacy", "--sample-rate", "0.0042666667", "--steps", "14062", "--delta", "1e-5"]

    assert main([*base, "--noise-multiplier", "1.1"]) == 0
    first = capsys.readouterr().out
    assert main([*base, "--target-epsilon", "2.5966"]) == 0
    second = capsys.readouterr().out

    assert "ε = 2.5966" in first
    assert "noise multiplier 1.1" in second or "noise multiplier 1.10" in second


def test_privacy_planner_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["privacy", "--sample-rate", "0.1", "--steps", "3", "--delta", "2", "--noise-multiplier", "1"])

    assert code == 2
    assert "delta" in capsys.readouterr().err


HEAVY = ("torch._dynamo", "sklearn", "scipy", "matplotlib", "opacus", "flwr", "cryptography", "fedtrain.deploy")


def _modules_after(argv: list[str], tmp_path: Path) -> dict[str, object]:
    """Run ``main(argv)`` as a whole process's command in a fresh interpreter:
    which of HEAVY and torch it loaded, and whether its garbage collector
    ended enabled and with objects frozen."""
    code = (
        "import gc, json, sys\n"
        "from fedtrain.cli import main\n"
        "try:\n"
        f"    code = main({argv!r}, whole_process=True)\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"loaded = [m for m in {HEAVY + ('torch',)!r} if m in sys.modules]\n"
        "collector = {'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count() > 0}\n"
        "print(json.dumps({'code': code, 'loaded': loaded, 'collector': collector}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


PLAIN_RUN = "test_cli::test_plain_simulation_loads_only_what_it_uses"


@in_background(PLAIN_RUN, 6)
def plain_run(root: Path) -> tuple[dict[str, object], Path]:
    """A two-round simulation in a fresh interpreter: what it loaded, and its run folder."""
    out = root / "run"
    seen = _modules_after(["simulate", "--quiet", "--out", str(out), "--set", "run.rounds=2",
                           "--set", "data.partition=iid"], root)
    return seen, out


def test_plain_simulation_loads_only_what_it_uses(tmp_path_factory: pytest.TempPathFactory) -> None:
    seen, out = background_result(PLAIN_RUN, tmp_path_factory.mktemp)

    assert seen["code"] == 0
    assert seen["loaded"] == ["torch"]  # the plot is drawn by a child process
    assert seen["collector"] == {"enabled": True, "frozen": True}  # paused for torch's import, then resumed
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--help"], ["simulate", "--help"]])
def test_help_does_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    seen = _modules_after(argv, tmp_path)

    assert seen == {"code": 0, "loaded": [], "collector": {"enabled": True, "frozen": False}}


def _entry_point(argv: list[str], before: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The console script's :func:`~fedtrain.cli.entry_point` in a fresh
    interpreter, with ``before`` run first; stdout a pipe, buffered as a user's is."""
    code = f"import sys\n{before}\nfrom fedtrain.cli import entry_point\nsys.argv = {['fedtrain', *argv]!r}\nentry_point()\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)


def test_the_console_script_flushes_runs_atexit_and_keeps_the_exit_code(tmp_path: Path) -> None:
    before = ("import atexit\natexit.register(print, 'atexit handler ran')\n"
              "LOG = open('plugin.log', 'w')\nLOG.write('written, never closed')")  # as a plug-in's module might
    ok = _entry_point([], before, tmp_path)
    bad = _entry_point(["privacy", "--sample-rate", "0.1", "--steps", "3", "--delta", "2", "--noise-multiplier", "1"],
                       "", tmp_path)

    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("usage: fedtrain")  # the help, printed when no command is given
    assert ok.stdout.endswith("\natexit handler ran\n")
    assert (tmp_path / "plugin.log").read_text() == "written, never closed"
    assert bad.returncode == 2
    assert "delta" in bad.stderr


def test_the_console_script_waits_for_a_thread_still_running(tmp_path: Path) -> None:
    thread = ("import threading, time\n"
              "threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished'))).start()")

    proc = _entry_point([], thread, tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fedtrain")
    assert proc.stdout.endswith("thread finished\n")


PLANNER_RUNS = "test_cli::test_privacy_planner_does_not_import_torch_or_opacus"


@in_background(PLANNER_RUNS, 4)
def planner_runs(root: Path) -> list[dict[str, object]]:
    """``fedtrain privacy`` for one ε and for one calibration, each in a fresh interpreter."""
    argv = ["privacy", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"]
    extras = (["--noise-multiplier", "1.0"], ["--target-epsilon", "2.0"])
    return [_modules_after([*argv, *extra], root) for extra in extras]


def test_privacy_planner_does_not_import_torch_or_opacus(tmp_path_factory: pytest.TempPathFactory) -> None:
    for seen in background_result(PLANNER_RUNS, tmp_path_factory.mktemp):
        assert seen["code"] == 0
        assert seen["loaded"] == ["scipy"]


def test_poll_and_address_defaults_are_the_deployments() -> None:
    from fedtrain import cli
    from fedtrain.deploy import server as deploy_server
    from fedtrain.transport import relay

    assert cli.DEFAULT_POLL == relay.DEFAULT_POLL == deploy_server.DEFAULT_POLL
    server = cli.build_parser().parse_args(["server", "--insecure"])
    assert server.address == deploy_server.DEFAULT_ADDRESS == "127.0.0.1:9092"


@pytest.mark.parametrize("address", ["0.0.0.0:9092", "[::]:9092", "10.0.0.5:9092", "coordinator.example.org:9092"])
def test_an_unauthenticated_server_off_loopback_is_refused_before_starting(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every listening socket is authenticated or bound to loopback: --insecure
    serves plain text to anyone, so it may not listen beyond this machine."""
    from fedtrain.cli import main

    code = main(["server", "--insecure", "--address", address, "--out", str(tmp_path / "run"), "--wait", "1"])

    assert code == 2
    err = capsys.readouterr().err
    assert f"--address {address} with --insecure" in err and "loopback only" in err
    assert not (tmp_path / "run" / "flower" / "superlink.log").exists()
