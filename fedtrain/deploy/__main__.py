"""``python -m fedtrain.deploy superlink|supernode ARGS``: the entry points of
the Flower processes a deployment starts (:mod:`fedtrain.deploy.superlink`
on the coordinator, :mod:`fedtrain.deploy.supernode` on a client), with
fedtrain's own log lines on stderr in the format the parent re-logs
(:func:`fedtrain.deploy.processes.log_to_stderr`). A
:class:`~fedtrain.errors.UserError` ends the process with its message, exit
code 1, which the parent shows with the end of the log."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from fedtrain.deploy.processes import log_to_stderr
from fedtrain.deploy.superlink import superlink_main
from fedtrain.deploy.supernode import supernode_main
from fedtrain.errors import UserError


ENTRY_POINTS: dict[str, Callable[[Sequence[str]], None]] = {
    "superlink": superlink_main,
    "supernode": supernode_main,
}


def main(argv: Sequence[str]) -> None:
    """Run the entry point ``argv[0]`` with the rest of ``argv``."""
    log_to_stderr()
    command = argv[0] if argv else ""
    if command not in ENTRY_POINTS:
        sys.exit(f"python -m fedtrain.deploy {command!r}: allowed commands: {', '.join(ENTRY_POINTS)}")
    try:
        ENTRY_POINTS[command](argv[1:])
    except UserError as exc:
        sys.exit(f"fedtrain: error: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
