"""A process fedtrain does not start itself (the ServerApp that Flower's
SuperLink starts for a run) ends when the process that started it dies, even
by SIGKILL (:func:`fedtrain.deploy.processes.exit_when_orphaned`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from fedtrain.deploy.processes import alive

CHILD = textwrap.dedent("""
    import os, time
    from fedtrain.deploy.processes import exit_when_orphaned
    exit_when_orphaned(os.getppid(), poll_seconds=0.1)
    time.sleep(60)
""")

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    print(child.pid, flush=True)
    time.sleep(60)
""")


def test_a_process_ends_when_the_one_that_started_it_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        time.sleep(1.5)
        assert alive(child), "the child must live while its parent does"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the orphaned child is still running"
    finally:
        if parent.poll() is None:
            parent.kill()
