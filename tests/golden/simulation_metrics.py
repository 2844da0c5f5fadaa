"""Every config in ``simulations/`` run to the end, its ``metrics.jsonl``
compared with the digests recorded in ``simulation_metrics.json``.

A structural change (the house issue) must not change what a run computes:
``python tests/golden/simulation_metrics.py`` checks, ``--record`` writes the
digests anew. Each row is digested without its ``seconds`` column (wall time).
Runs under DP draw their noise and cohorts from a CSPRNG by design, so they
are checked with ``privacy.secure_noise = false`` (seeded noise, the same
code path otherwise).

The bits a run computes depend on the machine as well as the code: torch's
CPU kernels differ by the instruction set they dispatch to, and MKL picks
its code path by the processor. So digests are recorded per machine kind
(:func:`machine_kind`), and a run matches if it computes the bits some
recorded kind computed: a change to the computation would have to hit
another machine's SHA-256 exactly to pass. ``--record`` (the computation
changed on purpose) keeps only this machine's kind; ``--add`` records this
kind beside the others (same code, a machine kind not seen before).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIGESTS = Path(__file__).with_suffix(".json")

EXCLUDED = {"shakespeare": "needs the plays (fedtrain data shakespeare) and runs for minutes",
            "shakespeare_gpu": "sized for a GPU"}
"""Configs without a digest, and why."""


def digest(metrics: Path) -> str:
    """SHA-256 of the metrics rows without their wall time."""
    h = hashlib.sha256()
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        row.pop("seconds", None)
        h.update(json.dumps(row, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def machine_kind() -> str:
    """The machine as the digests depend on it: the instruction set torch's
    kernels dispatch to and the processor's model name, e.g. ``AVX2 on AMD EPYC``."""
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    return f"{torch.backends.cpu.get_cpu_capability()} on {models[0] if models else platform.processor() or platform.machine()}"


def kind_computing(recorded: dict[str, dict[str, str]], name: str, got: str) -> str | None:
    """The recorded machine kind whose run of config ``name`` has digest ``got``, or None."""
    return next((kind for kind, digests in recorded.items() if digests.get(name) == got), None)


def run(path: Path, out: Path) -> str:
    from fedtrain.config import PrivacyMode, load
    from fedtrain.simulation import simulate

    config = load(path)
    if config.privacy.mode is not PrivacyMode.NONE:
        config = load(path, ["privacy.secure_noise=false"])
    simulate(config, out_dir=out, plot=lambda *a, **k: None)
    return digest(out / "metrics.jsonl")


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--record", action="store_true",
                      help="write this machine's digests and drop the other kinds' (the computation changed)")
    mode.add_argument("--add", action="store_true",
                      help="write this machine's digests beside the other kinds' (a new machine kind)")
    parser.add_argument("names", nargs="*", help="config stems to run (default: all)")
    args = parser.parse_args()
    recorded: dict[str, dict[str, str]] = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    kind = machine_kind()
    print(f"machine kind: {kind}", flush=True)
    configs = [c for c in sorted((ROOT / "simulations").glob("*.toml")) if c.stem not in EXCLUDED]
    if args.names:
        configs = [c for c in configs if c.stem in args.names]
    if args.record:
        recorded = {kind: recorded.get(kind, {})}
    mine = recorded.setdefault(kind, {})
    bad = 0
    for path in configs:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            got = run(path, Path(tmp) / "run")
        took = time.perf_counter() - started
        if args.record or args.add:
            mine[path.stem] = got
            print(f"{path.stem}: recorded ({took:.0f} s)", flush=True)
        elif (match := kind_computing(recorded, path.stem, got)) is not None:
            print(f"{path.stem}: identical to {match}'s ({took:.0f} s)", flush=True)
        else:
            bad += 1
            print(f"{path.stem}: DIFFERS from every recorded kind's ({took:.0f} s)", flush=True)
    if args.record or args.add:
        DIGESTS.write_text(json.dumps(recorded, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
