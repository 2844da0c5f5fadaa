"""Coordinator peak memory against clients per round, for a 34M-parameter
model, against 5 clients per round measured in the same run.

Workload: digits, 20 IID clients, a 10-layer MLP of width 2048
(:func:`deep_mlp`, 33.7M parameters, 129 MiB a model; ``--quick``: width 1024,
4 layers, 2.2M), FedAvg, the sequential engine, 2 rounds, 1 local step
(``client.batch_size = 1000`` over a client's ~70 records), 1, 5, 10 and 20
clients per round. Each setting is a fresh process (``--child``); its peak
resident set is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The engine
folds each update into a bounded buffer as it arrives
(:class:`fedtrain.aggregation.UpdateFold`), so peak memory should not grow
with the cohort; the same cohorts with FedMedian (which must see every update,
so the coordinator holds them all) show what it grows by otherwise.

Target (issue 15): peak at 20 per round <= 1.25 x peak at 5 per round.

    python benchmarks/coordinator_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import report, table

COHORTS = (1, 5, 10, 20)
REFERENCE = 5
TARGET = 1.25
HERE = Path(__file__).resolve().parent


def _mlp(input_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), width), torch.nn.ReLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, num_classes))


def deep_mlp(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """10 linear layers of width 2048: 33.7M parameters on digits."""
    return _mlp(input_shape, num_classes, 2048, 10)


def deep_mlp_quick(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """4 linear layers of width 1024: 2.2M parameters on digits."""
    return _mlp(input_shape, num_classes, 1024, 4)


def overrides(model: str, per_round: int, strategy: str) -> list[str]:
    return [
        "data.dataset=digits", "data.num_clients=20", "data.partition=iid",
        f"model.name=coordinator_memory:{model}", f"strategy.name={strategy}",
        f"strategy.clients_per_round={per_round}", "run.rounds=2", "run.seed=0",
        "client.engine=sequential", "client.epochs=1", "client.batch_size=1000", "client.lr=0.1",
    ]


def child(model: str, per_round: int, strategy: str) -> None:
    """Run the workload in this process and print its peak RSS in MiB as JSON."""
    import logging
    import resource

    from fedtrain.config import load
    from fedtrain.simulation import simulate

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        result = simulate(load(None, overrides(model, per_round, strategy)), out_dir=Path(tmp) / "run",
                          plot=lambda *a, **k: None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak_kib / 1024, "parameters": result.summary.num_parameters}))


def peak_mib(model: str, per_round: int, strategy: str) -> tuple[float, int]:
    """Peak RSS (MiB) and parameter count of one fresh process running the workload."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", model, str(per_round), strategy],
        check=True, capture_output=True, text=True, cwd=HERE.parent,
    ).stdout
    row = json.loads(out.strip().splitlines()[-1])
    return float(row["peak_mib"]), int(row["parameters"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2.2M-parameter model, FedAvg only")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PER_ROUND", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    model = "deep_mlp_quick" if args.quick else "deep_mlp"
    strategies = ("fedavg",) if args.quick else ("fedavg", "fedmedian")
    rows: list[list[object]] = []
    verdict = ""
    parameters = 0
    for strategy in strategies:
        peaks = {}
        for k in COHORTS:
            peaks[k], parameters = peak_mib(model, k, strategy)
        for k in COHORTS:
            rows.append([strategy, k, round(peaks[k]), peaks[k] / peaks[REFERENCE]])
        if strategy == "fedavg":
            ratio = peaks[20] / peaks[REFERENCE]
            verdict = f"20 per round / 5 per round = {ratio:.3f} (target <= {TARGET}): {'met' if ratio <= TARGET else 'MISSED'}"
    body = table(["strategy", "clients per round", "peak RSS (MiB)", f"ratio to {REFERENCE} per round"], rows)
    name = "coordinator_memory_quick" if args.quick else "coordinator_memory"
    report(name, f"Coordinator peak memory, {parameters / 1e6:.1f}M parameters ({parameters * 4 / 2**20:.0f} MiB a model)",
           body, [verdict, "FedMedian needs every update at once (needs_individual_updates): the unfolded reference."])


if __name__ == "__main__":
    main()
