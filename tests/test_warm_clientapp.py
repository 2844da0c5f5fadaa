"""A SuperNode's ClientApps forked warm (:mod:`fedtrain.deploy.warm_clientapp`):
the launcher that Flower's SuperExec finds on ``PATH`` runs the entry point
in a child of the warm starter with the launcher's arguments, streams and
exit status, and falls back to Flower's own program when the starter is gone.

Each case runs in a fresh interpreter (the starter forks, which a pytest
process with threads must not do); the entry point there is a stand-in that
reports what it was given, so the test needs no SuperLink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NODE = """
import json, os, sys, time
from pathlib import Path
from fedtrain.deploy import warm_clientapp

def fake_clientapp():
    print(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "ppid": os.getppid(),
                      "stdin": sys.stdin.readline().strip()}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--sleep" in sys.argv:
        time.sleep(60)
    sys.exit(3)

warm_clientapp.CLIENTAPP_ENTRY = ("__main__", "fake_clientapp")
warm_clientapp.WARM_IMPORTS = ()
home, real = Path(sys.argv[1]), sys.argv[2]
print(json.dumps({"warm": warm_clientapp.start_warm_clientapps(home, real), "pid": os.getpid(),
                  "path": os.environ["PATH"]}), flush=True)
time.sleep(120)
"""

COLD = """#!/bin/sh
echo "cold $*"
exit 5
"""


def _start_node(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    real = tmp_path / "real-clientapp"
    real.write_text(COLD)
    real.chmod(0o700)
    node = subprocess.Popen([sys.executable, "-c", NODE, str(tmp_path / "home"), str(real)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert node.stdout is not None
    return node, json.loads(node.stdout.readline())


def _launch(path: str, *args: str, stdin: str = "from stdin\n") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=path)
    return subprocess.run(["flwr-clientapp", *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=60)


def _starter(node_pid: int) -> int:
    children = Path(f"/proc/{node_pid}/task/{node_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_the_launcher_runs_the_entry_point_forked_from_the_warm_starter(tmp_path: Path) -> None:
    node, started = _start_node(tmp_path)
    try:
        assert started["warm"] is True
        launcher_dir = str(tmp_path / "home" / "fedtrain-bin")
        assert str(started["path"]).split(os.pathsep)[0] == launcher_dir
        assert (tmp_path / "home" / "fedtrain-bin").stat().st_mode & 0o077 == 0

        done = _launch(str(started["path"]), "--token", "abc", "--runtime-api-address", "127.0.0.1:1", "")

        assert done.returncode == 3, done.stderr
        ran = json.loads(done.stdout.strip().splitlines()[-1])
        assert ran["argv"] == ["--token", "abc", "--runtime-api-address", "127.0.0.1:1", ""]
        assert ran["stdin"] == "from stdin"
        assert "to stderr" in done.stderr
        assert ran["ppid"] == _starter(int(started["pid"]))  # forked warm, not started by the launcher
    finally:
        node.kill()
        node.wait()


def test_a_killed_launcher_takes_its_clientapp_along(tmp_path: Path) -> None:
    node, started = _start_node(tmp_path)
    try:
        env = dict(os.environ, PATH=str(started["path"]))
        launcher = subprocess.Popen(["flwr-clientapp", "--sleep"], env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        assert launcher.stdin is not None and launcher.stdout is not None
        launcher.stdin.write("x\n")
        launcher.stdin.flush()
        child = json.loads(launcher.stdout.readline())["pid"]
        assert Path(f"/proc/{child}").exists()
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and "Z" not in _state(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists() or "Z" in _state(child)
    finally:
        node.kill()
        node.wait()


def test_without_the_starter_the_launcher_runs_flowers_own_program(tmp_path: Path) -> None:
    node, started = _start_node(tmp_path)
    starter = _starter(int(started["pid"]))
    os.kill(starter, signal.SIGKILL)
    node.kill()
    node.wait()

    done = _launch(str(started["path"]), "--token", "abc")

    assert done.returncode == 5
    assert done.stdout.strip() == "cold --token abc"


def test_the_starter_ends_with_its_supernode(tmp_path: Path) -> None:
    node, started = _start_node(tmp_path)
    starter = _starter(int(started["pid"]))
    node.kill()
    node.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{starter}").exists() and "Z" not in _state(starter) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{starter}").exists() or "Z" in _state(starter)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
