"""Run every benchmark and collect their tables in ``results/SUMMARY.md``.

    python benchmarks/run_all.py            # full runs (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # smoke runs, a few minutes

Each script measures its own reference in the same run and prints ratios;
this runner only sequences them (never in parallel: they would share the
cores) and concatenates what they wrote. ``gpu_throughput`` (and
``dp_throughput --device cuda``) run only where torch sees a CUDA device;
elsewhere they are listed as skipped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "startup",
    "simulation_overhead",
    "aggregation_throughput",
    "serialization",
    "batched_clients",
    "scaling",
    "coordinator_memory",
    "compression",
    "async_vs_sync",
    "dp_throughput",
    "secure_aggregation",
    "flower_comparison",
    "deploy_latency",
    "privacy_utility",
    "gpu_throughput",
)
GPU_ONLY = ("gpu_throughput",)
"""Scripts that need a CUDA device."""


@dataclass(frozen=True)
class Run:
    """One benchmark invocation: its script, extra arguments and the results file it writes."""

    label: str
    script: str
    results: str
    args: tuple[str, ...] = ()


def _has_cuda() -> bool:
    """Whether torch sees a CUDA device (asked in a child, so this runner stays light)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.call([sys.executable, "-c", probe]) == 0


def _runs(names: list[str], cuda: bool) -> list[Run]:
    runs = [Run(name, name, "gpu" if name == "gpu_throughput" else name) for name in names]
    if cuda and "dp_throughput" in names:
        runs.append(Run("dp_throughput (cuda)", "dp_throughput", "dp_throughput_cuda", ("--device", "cuda")))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs of every benchmark")
    parser.add_argument("--only", nargs="*", choices=SCRIPTS, help="run only these")
    args = parser.parse_args()
    sections: list[str] = []
    status: list[list[str]] = []
    failed: list[str] = []
    cuda = _has_cuda()
    for run in _runs(list(args.only or SCRIPTS), cuda):
        if run.script in GPU_ONLY and not cuda:
            sections.append(f"## {run.label}\n\nskipped: no CUDA device here\n")
            status.append([run.label, "skipped (no CUDA device)", "—", "—"])
            continue
        started = time.perf_counter()
        cmd = [sys.executable, str(HERE / f"{run.script}.py"), *run.args] + (["--quick"] if args.quick else [])
        print(f"== {run.label} ==", flush=True)
        code = subprocess.call(cmd)
        elapsed = time.perf_counter() - started
        result = HERE / "results" / (f"{run.results}_quick.md" if args.quick else f"{run.results}.md")
        if code != 0 or not result.exists():
            failed.append(run.label)
            sections.append(f"## {run.label}\n\nFAILED (exit {code}) after {elapsed:.0f} s\n")
            status.append([run.label, f"FAILED (exit {code})", f"{elapsed:.0f}", "—"])
        else:
            sections.append(result.read_text(encoding="utf-8") + f"\n({elapsed:.0f} s)\n")
            status.append([run.label, "ok", f"{elapsed:.0f}", f"results/{result.name}"])
    overview = "\n".join(["| benchmark | status | seconds | table |", "|---|---|---|---|"]
                         + ["| " + " | ".join(row) + " |" for row in status])
    summary = HERE / "results" / ("SUMMARY_quick.md" if args.quick else "SUMMARY.md")
    summary.write_text("# Benchmarks\n\n" + overview + "\n\n" + "\n".join(sections), encoding="utf-8")
    print("\n" + overview + f"\n\nwrote {summary}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
