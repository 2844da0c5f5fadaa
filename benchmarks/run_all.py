"""Run every benchmark and collect their tables in ``results/SUMMARY.md``.

    python benchmarks/run_all.py            # full runs (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # smoke runs, a few minutes

Each script measures its own reference in the same run and prints ratios;
this runner only sequences them (never in parallel: they would share the
cores) and concatenates what they wrote.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "simulation_overhead",
    "aggregation_throughput",
    "batched_clients",
    "dp_throughput",
    "flower_comparison",
    "privacy_utility",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs of every benchmark")
    parser.add_argument("--only", nargs="*", choices=SCRIPTS, help="run only these")
    args = parser.parse_args()
    sections: list[str] = []
    failed: list[str] = []
    for name in args.only or SCRIPTS:
        started = time.perf_counter()
        cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if args.quick else [])
        print(f"== {name} ==", flush=True)
        code = subprocess.call(cmd)
        elapsed = time.perf_counter() - started
        result = HERE / "results" / (f"{name}_quick.md" if args.quick else f"{name}.md")
        if code != 0 or not result.exists():
            failed.append(name)
            sections.append(f"## {name}\n\nFAILED (exit {code}) after {elapsed:.0f} s\n")
        else:
            sections.append(result.read_text(encoding="utf-8") + f"\n({elapsed:.0f} s)\n")
    summary = HERE / "results" / ("SUMMARY_quick.md" if args.quick else "SUMMARY.md")
    summary.write_text("# Benchmarks\n\n" + "\n".join(sections), encoding="utf-8")
    print(f"wrote {summary}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
