"""Helpers shared by the benchmark scripts: timing statistics and the markdown
table each script prints and writes to ``benchmarks/results/NAME.md`` (a
``--quick`` smoke run writes ``NAME_quick.md``, leaving the full results be)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# The reference run, pinned key by key so the benchmarks do not drift when the
# embedded defaults change: digits, 20 Dirichlet(0.5) clients, 10 per round,
# 50 rounds, 5 local epochs, batch 32, SGD lr 0.3, MLP hidden 128, seed 0.
DEFAULT_RUN: list[str] = [
    "data.dataset=digits", "data.num_clients=20", "data.partition=dirichlet", "data.alpha=0.5",
    "strategy.name=fedavg", "strategy.clients_per_round=10", "run.rounds=50", "run.seed=0",
    "client.epochs=5", "client.batch_size=32", "client.lr=0.3", "client.momentum=0.0",
    "model.name=mlp", "model.hidden=128",
]


def revision() -> str:
    """The fedtrain commit measured (read-only git), ``+dirty`` with local changes to fedtrain/."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fedtrain"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"fedtrain {head}{' + uncommitted changes' if dirty else ''}"


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, after one warm-up call
    (page faults of fresh outputs, thread-pool start)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    """One line naming what the numbers were measured on."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (other processes share the cores), "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, body: str, notes: Sequence[str] = ()) -> str:
    """Print ``body`` (a markdown table, or several) with a title, the machine
    line and notes, and write the same text to ``results/NAME.md``."""
    text = f"## {title}\n\n{machine()}\n\n{body}\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text, encoding="utf-8")
    return text
