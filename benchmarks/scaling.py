"""Scaling curves: wall time per round and peak memory against clients per
round and against the number of clients, for both client engines.

Workload: ``simulations/synthetic_100k.toml`` (Synthetic-IID of Li et al.
2020, 60 features, 10 classes, record counts lognormal(4, 2) + 50 capped at
1,000, generated per client from the seed; MLP hidden 128, 1 local epoch,
batch 32), with

* clients per round 10, 30, 100, 300, 1,000 out of 10,000 clients;
* 1,000, 10,000 and 100,000 clients with 100 per round;

each with ``client.engine`` = ``sequential`` and ``batched``. Every point runs
in its own process (``python scaling.py --point ...``), so its peak RSS
(``ru_maxrss``) is its own; the RSS right after the imports is subtracted to
show what the run itself holds. Time per round is the mean of the rounds
after the first (the first pays the batched engine's probe and lazy imports);
each point runs ``--repeats`` times, the engines alternating, keeping the
fastest (the cohorts are the same every time: other processes on the machine
only add time). Client sizes are heavy-tailed, so cohorts differ in records:
the records per round (recomputed from the engine's seeded sampler) and the
time per 1,000 records are reported with each point.
Cohorts are drawn by the engine's seeded sampler, so both engines train the
same clients.

Ratios against references measured in the same run: batched speed-up over
sequential at each point; per-client cost relative to the 10-client cohort
(1.0 = linear scaling), per record; memory relative to the 1,000-client run. Writes
``results/scaling.md`` and the plot ``results/scaling.png``.

    python benchmarks/scaling.py [--quick] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from _common import RESULTS, report, revision, table

HERE = Path(__file__).resolve().parent
SCENARIO = HERE.parent / "simulations" / "synthetic_100k.toml"
COHORTS = (10, 30, 100, 300, 1000)
COHORT_POPULATION = 10_000
POPULATIONS = (1_000, 10_000, 100_000)
POPULATION_COHORT = 100


class Engine(Enum):
    SEQUENTIAL = "sequential"
    BATCHED = "batched"


@dataclass(frozen=True)
class Point:
    """One configuration: population, cohort, engine, rounds."""

    clients: int
    cohort: int
    engine: Engine
    rounds: int


@dataclass(frozen=True)
class Measured:
    """What one point's process reports."""

    round_seconds: float
    records_per_round: float
    wall_seconds: float
    peak_rss_mb: float
    baseline_rss_mb: float


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_point(point: Point) -> Measured:
    """Run ``point`` in this process (the child side)."""
    import torch

    from fedtrain import config
    from fedtrain.engine import RngStreams
    from fedtrain.sampling import make_sampler
    from fedtrain.run import client_data
    from fedtrain.simulation import simulate

    baseline = _rss_mb()
    cfg = config.load(SCENARIO, [
        f"data.num_clients={point.clients}", f"strategy.clients_per_round={point.cohort}",
        f"run.rounds={point.rounds}", f"client.engine={point.engine.value}", "client.device=cpu",
    ])
    started = time.perf_counter()
    result = simulate(cfg)
    wall = time.perf_counter() - started
    seconds = [r.seconds for r in result.records][1:]
    data = client_data(cfg, torch.device("cpu")).data  # the cohorts again, from the engine's sampling stream
    sampler = make_sampler(cfg.strategy.sampling, cfg.strategy.clients_per_round, cfg.data.num_clients)
    rng = RngStreams.from_seed(cfg.run.seed).sampling
    records = [sum(data.size(c) for c in sampler.sample(data.ids, rng)) for _ in range(point.rounds)][1:]
    return Measured(
        round_seconds=statistics.mean(seconds),
        records_per_round=statistics.mean(records),
        wall_seconds=wall,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        baseline_rss_mb=baseline,
    )


def measure(point: Point) -> Measured:
    """Run ``point`` in a fresh process and read its report."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(
            {**asdict(point), "engine": point.engine.value})],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"scaling point {point} failed:\n{out.stderr[-3000:]}")
    return Measured(**json.loads(out.stdout.strip().splitlines()[-1]))


def _per_record(m: Measured) -> float:
    """Milliseconds per 1,000 records trained."""
    return 1e6 * m.round_seconds / m.records_per_round


def _plot(cohort_rows: dict[Engine, list[tuple[int, Measured]]],
          population_rows: dict[Engine, list[tuple[int, Measured]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for engine, marker in ((Engine.SEQUENTIAL, "o"), (Engine.BATCHED, "s")):
        xs = [n for n, _ in cohort_rows[engine]]
        a.loglog(xs, [m.round_seconds for _, m in cohort_rows[engine]], marker=marker, label=engine.value)
        ps = [n for n, _ in population_rows[engine]]
        b.semilogx(ps, [m.round_seconds for _, m in population_rows[engine]], marker=marker, label=engine.value)
        c.semilogx(ps, [m.peak_rss_mb for _, m in population_rows[engine]], marker=marker, label=engine.value)
    a.set(xlabel="clients per round", ylabel="s per round",
          title=f"time per round vs cohort ({COHORT_POPULATION:,} clients)")
    b.set(xlabel="clients in total", ylabel="s per round", title=f"time per round vs population ({POPULATION_COHORT}/round)")
    c.set(xlabel="clients in total", ylabel="peak RSS MB", title="peak memory vs population")
    b.set_ylim(bottom=0)
    c.set_ylim(bottom=0)
    for ax in (a, b, c):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, smaller sweeps: a smoke run")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per point (default 4, quick 2)")
    ap.add_argument("--repeats", type=int, default=0, help="processes per point, keeping the fastest (default 2, quick 1)")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # child mode: one configuration, JSON in and out
    args = ap.parse_args()
    if args.point:
        spec = json.loads(args.point)
        point = Point(spec["clients"], spec["cohort"], Engine(spec["engine"]), spec["rounds"])
        print(json.dumps(asdict(run_point(point))))
        return
    rounds = args.rounds or (2 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick else 2)
    cohorts = COHORTS[:3] if args.quick else COHORTS
    populations = POPULATIONS[:2] if args.quick else POPULATIONS

    cohort_rows: dict[Engine, list[tuple[int, Measured]]] = {e: [] for e in Engine}
    population_rows: dict[Engine, list[tuple[int, Measured]]] = {e: [] for e in Engine}
    started = time.perf_counter()
    def fastest(clients: int, cohort: int) -> dict[Engine, Measured]:
        runs: dict[Engine, list[Measured]] = {e: [] for e in Engine}
        for _ in range(repeats):
            for engine in Engine:
                runs[engine].append(measure(Point(clients, cohort, engine, rounds)))
        best = {e: min(ms, key=lambda m: m.round_seconds) for e, ms in runs.items()}
        print(f"{clients} clients, {cohort} per round: {best}", flush=True)
        return best

    for cohort in cohorts:
        for engine, m in fastest(COHORT_POPULATION, cohort).items():
            cohort_rows[engine].append((cohort, m))
    for clients in populations:
        if clients == COHORT_POPULATION and POPULATION_COHORT in cohorts:
            best = {e: dict(cohort_rows[e])[POPULATION_COHORT] for e in Engine}
        else:
            best = fastest(clients, POPULATION_COHORT)
        for engine, m in best.items():
            population_rows[engine].append((clients, m))

    def rows_for(points: dict[Engine, list[tuple[int, Measured]]], scale: str) -> list[list[object]]:
        seq, bat = points[Engine.SEQUENTIAL], points[Engine.BATCHED]
        base_seq, base_bat = seq[0][1], bat[0][1]
        out = []
        for (n, s), (_, b) in zip(seq, bat):
            if scale == "cohort":
                rel = [_per_record(m) / _per_record(base) for m, base in ((s, base_seq), (b, base_bat))]
            else:
                rel = [m.peak_rss_mb / base.peak_rss_mb for m, base in ((s, base_seq), (b, base_bat))]
            out.append([f"{n:,}", f"{s.records_per_round:,.0f}", f"{s.round_seconds:.3f}", f"{b.round_seconds:.3f}",
                        f"**{s.round_seconds / b.round_seconds:.1f}×**",
                        f"{_per_record(s):.2f} / {_per_record(b):.2f}", f"{rel[0]:.2f} / {rel[1]:.2f}",
                        f"{s.peak_rss_mb:.0f} / {b.peak_rss_mb:.0f}",
                        f"{s.peak_rss_mb - s.baseline_rss_mb:.0f} / {b.peak_rss_mb - b.baseline_rss_mb:.0f}"])
        return out

    png = RESULTS / ("scaling_quick.png" if args.quick else "scaling.png")
    RESULTS.mkdir(parents=True, exist_ok=True)
    _plot(cohort_rows, population_rows, png)
    header = ["records / round", "s / round sequential", "s / round batched", "batched speed-up",
              "ms per 1k records (seq / batched)"]
    body = "\n\n".join([
        f"![scaling curves]({png.name})",
        f"Time per round against clients per round ({COHORT_POPULATION:,} clients in total):",
        table(["clients per round", *header, "per-record cost vs cohort 10 (seq / batched)",
               "peak RSS MB (seq / batched)", "run's own MB above imports (seq / batched)"],
              rows_for(cohort_rows, "cohort")),
        f"Time per round and memory against the number of clients ({POPULATION_COHORT} per round):",
        table(["clients in total", *header, f"peak RSS vs {populations[0]:,} clients (seq / batched)",
               "peak RSS MB (seq / batched)", "run's own MB above imports (seq / batched)"],
              rows_for(population_rows, "memory")),
    ])
    report(
        "scaling" + ("_quick" if args.quick else ""),
        "Scaling: time per round and peak memory vs clients per round and vs clients in total"
        + (" (--quick)" if args.quick else ""),
        body,
        [revision(),
         f"simulations/synthetic_100k.toml with data.num_clients, strategy.clients_per_round, run.rounds = {rounds}, "
         f"client.engine overridden; one process per point and engine, {repeats} per point (engines alternating); "
         "mean of the rounds after the first, fastest process; 1 torch thread (fedtrain's choice for this model)",
         "peak RSS of the fastest process",
         "peak RSS = ru_maxrss of the point's process (torch, numpy and fedtrain imports included); "
         "the last column subtracts the RSS right after the imports",
         f"total runtime of this sweep {time.perf_counter() - started:.0f} s"],
    )


if __name__ == "__main__":
    main()
