"""Every config in ``simulations/`` run to the end, its ``metrics.jsonl``
compared with the digests recorded in ``simulation_metrics.json``.

A structural change (the house issue) must not change what a run computes:
``python tests/golden/simulation_metrics.py`` checks, ``--record`` writes the
digests anew. Each row is digested without its ``seconds`` column (wall time).
Runs under DP draw their noise and cohorts from a CSPRNG by design, so they
are checked with ``privacy.secure_noise = false`` (seeded noise, the same
code path otherwise). Digests hold for one machine kind: CPU, torch as pinned.
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
    parser.add_argument("--record", action="store_true", help="write the digests instead of checking them")
    parser.add_argument("names", nargs="*", help="config stems to run (default: all)")
    args = parser.parse_args()
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    configs = [c for c in sorted((ROOT / "simulations").glob("*.toml")) if c.stem not in EXCLUDED]
    if args.names:
        configs = [c for c in configs if c.stem in args.names]
    bad = 0
    for path in configs:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            got = run(path, Path(tmp) / "run")
        took = time.perf_counter() - started
        if args.record:
            recorded[path.stem] = got
            print(f"{path.stem}: recorded ({took:.0f} s)", flush=True)
        elif recorded.get(path.stem) == got:
            print(f"{path.stem}: identical ({took:.0f} s)", flush=True)
        else:
            bad += 1
            print(f"{path.stem}: DIFFERS ({took:.0f} s)", flush=True)
    if args.record:
        DIGESTS.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
