"""``python -m fedtrain.deploy supernode``: a client's SuperNode, Flower's
own ``flower-supernode`` held to fedtrain's app.

``fedtrain client`` starts it next to its warm worker
(:mod:`fedtrain.deploy.worker`); the ``ClientApp`` it runs for each message
is the light relay of :mod:`fedtrain.transport.flower_client_app`. Whoever
submitted a run, this SuperNode runs no other app
(:func:`fedtrain.deploy.app.fab_refusal`), so what a run may ask of a client
is decided by the client's own fedtrain. Its ClientApps are forked from a
warm process rather than started cold, and so is its SuperExec
(:mod:`fedtrain.deploy.warm_start`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from fedtrain.deploy.app import fab_refusal
from fedtrain.deploy.errors import check_positive
from fedtrain.deploy.flower import (
    NODE_HEARTBEAT_SECONDS,
    announce_heartbeat,
    check_flower_version,
    guard_apps,
    run_supernode,
)
from fedtrain.deploy.warm_start import CLIENTAPP, SUPEREXEC, start_warm_programs


def supernode_main(argv: Sequence[str]) -> None:
    """``python -m fedtrain.deploy supernode --poll S ARGS``: ``flower-supernode
    ARGS`` that runs fedtrain's own app only
    (:func:`~fedtrain.deploy.flower.guard_apps` with
    :func:`~fedtrain.deploy.app.fab_refusal`), announces a heartbeat every
    :data:`~fedtrain.deploy.flower.NODE_HEARTBEAT_SECONDS`, polls for
    messages every ``S`` seconds when idle
    (:func:`~fedtrain.deploy.flower.run_supernode`), and forks its SuperExec
    and each message's ClientApp from a warm process
    (:func:`~fedtrain.deploy.warm_start.start_warm_programs`, in its
    ``FLWR_HOME``), which spares each of them Flower's start-up."""
    parser = argparse.ArgumentParser(prog="python -m fedtrain.deploy supernode", add_help=False, allow_abbrev=False)
    parser.add_argument("--poll", type=float, required=True)
    known, rest = parser.parse_known_args(argv)
    check_positive("--poll", known.poll)
    check_flower_version()
    guard_apps(fab_refusal)
    announce_heartbeat(NODE_HEARTBEAT_SECONDS)
    home = os.environ.get("FLWR_HOME")
    if home:
        start_warm_programs(Path(home), (CLIENTAPP, SUPEREXEC))
    run_supernode(known.poll, rest)
