"""Flower's helper programs forked warm (:mod:`fedtrain.deploy.warm_start`):
the launcher that Flower finds on ``PATH`` runs its program's entry point
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
from fedtrain.deploy.warm_start import WarmProgram, start_warm_programs

def fake_clientapp():
    print(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "ppid": os.getppid(),
                      "stdin": sys.stdin.readline().strip(), "path": os.environ["PATH"]}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--sleep" in sys.argv:
        time.sleep(60)
    sys.exit(3)

def fake_superexec():
    print(json.dumps({"superexec": sys.argv[1:], "ppid": os.getppid()}), flush=True)
    sys.exit(4)

home, real = Path(sys.argv[1]), sys.argv[2]
programs = (WarmProgram("flwr-clientapp", ("__main__", "fake_clientapp")),
            WarmProgram("flower-superexec", ("__main__", "fake_superexec"), ("json",)))
print(json.dumps({"warm": start_warm_programs(home, programs, lambda name: real), "pid": os.getpid(),
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


def _launch(path: str, *args: str, stdin: str = "from stdin\n", name: str = "flwr-clientapp"
            ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=path)
    return subprocess.run([name, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)


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
        assert ran["path"].split(os.pathsep)[0] == launcher_dir  # what it starts, it starts warm too
    finally:
        node.kill()
        node.wait()


def test_one_starter_serves_each_program_under_its_own_name(tmp_path: Path) -> None:
    node, started = _start_node(tmp_path)
    try:
        done = _launch(str(started["path"]), "--parent-pid", "1", name="flower-superexec")

        assert done.returncode == 4, done.stderr
        ran = json.loads(done.stdout.strip().splitlines()[-1])
        assert ran["superexec"] == ["--parent-pid", "1"]
        assert ran["ppid"] == _starter(int(started["pid"]))
    finally:
        node.kill()
        node.wait()


def test_the_starter_runs_no_program_it_was_not_given(tmp_path: Path) -> None:
    import ast
    import socket
    import struct

    node, started = _start_node(tmp_path)
    try:
        launcher = (tmp_path / "home" / "fedtrain-bin" / "flwr-clientapp").read_text()
        name = launcher.split("s.connect(", 1)[1].split(")", 1)[0]
        address = ast.literal_eval(name)  # the socket's name, a literal in the launcher
        request = "\0".join(["flwr-serverapp", "--x"]).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(address)
            socket.send_fds(s, [struct.pack("!I", len(request)) + request], [0, 1, 2])
            s.settimeout(10)
            assert s.recv(4) == b""  # refused: closed without an exit status
        assert _starter(int(started["pid"]))  # and the starter serves on
        assert _launch(str(started["path"]), "--token", "t").returncode == 3
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
