"""What ``fedtrain.simulation.simulate`` costs on top of the training it does.

Measures the wall time of ``simulate(cfg)`` in process (after a warm-up run, so
imports are paid; dataset load, partitioning, model build, every round's
training, aggregation and test evaluation are all included) against two plain
PyTorch loops in the same run, on the same model (``fedtrain.models.build_model``),
SGD with the same lr, tensors in memory, ``torch.set_num_threads`` as
``fedtrain.run.cpu_threads`` picks:

* **raw** (the reference of the target): the same number of sample-steps
  (sum over rounds and participating clients of epochs x partition size,
  recomputed exactly from ``client_partitions`` and the engine's sampler
  streams, and checked against ``RoundRecord.num_clients``), in batches of
  ``client.batch_size`` over shuffles of the whole training set;
* **raw, same batches**: the exact batch sequence of the simulation (each
  client's epochs over its own partition, with its partial last batch), so the
  optimiser-step count is equal; the ratio to it is fedtrain's own overhead.

Workloads: the reference run pinned key by key (``_common.DEFAULT_RUN``), the
same with 500 clients of ~3 records and 5 per round, and whatever
``config.load(None, [])`` gives today (the embedded defaults may drift).
Every timing is repeated (interleaved) and the minimum taken (load from other
processes only adds time); ratio = simulate / raw. Target: <= 1.3 for the
default and the reference run. The 500-client run has none against the raw
loop, which takes 11x fewer optimiser steps (batches of 32 over the whole set
against each client's batch of ~3 records); its fair reference is the same
batches.

    python benchmarks/simulation_overhead.py [--quick] [--repeats N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import fedtrain.sampling
from _common import DEFAULT_RUN, report, table
from fedtrain import config
from fedtrain.config import Config
from fedtrain.data import Dataset, load_dataset
from fedtrain.engine import RngStreams
from fedtrain.models import build_model
from fedtrain.run import client_partitions, cpu_threads
from fedtrain.simulation import simulate
from fedtrain.strategy import load_strategy

MANY = DEFAULT_RUN + ["data.num_clients=500", "strategy.clients_per_round=5", "data.partition=iid"]
# label, overrides (the full run), extra overrides for --quick, target ratio (None: none)
WORKLOADS: list[tuple[str, list[str], list[str], float | None]] = [
    ("reference run", DEFAULT_RUN, ["run.rounds=5"], 1.3),
    ("500 clients", MANY + ["run.rounds=300"], ["run.rounds=30"], None),
    ("embedded defaults", [], ["run.rounds=5"], 1.3),
]


def describe(cfg: Config) -> str:
    return (f"{cfg.data.num_clients} clients, {cfg.strategy.clients_per_round}/round, "
            f"{cfg.data.partition.value}, {cfg.client.epochs} epochs, {cfg.run.rounds} rounds")


@dataclass(frozen=True)
class Plan:
    """The client-rounds a simulation of ``cfg`` trains, recomputed."""

    data: Dataset
    parts: dict[str, np.ndarray]
    cohorts: list[tuple[str, ...]]

    def sizes(self) -> list[int]:
        return [len(self.parts[c]) for cohort in self.cohorts for c in cohort]


def plan(cfg: Config) -> Plan:
    """Partitions and every round's cohort, drawn from the same seeded streams
    as ``simulate`` (the sampling stream is used by the sampler alone)."""
    data = load_dataset(cfg.data, cfg.run.seed)
    parts = client_partitions(cfg, data)
    rngs = RngStreams.from_seed(cfg.run.seed)
    if hasattr(fedtrain.sampling, "make_sampler"):  # newer fedtrain: uniform or Poisson
        sampler = fedtrain.sampling.make_sampler(
            cfg.strategy.sampling, cfg.strategy.clients_per_round, cfg.data.num_clients)
    else:
        sampler = fedtrain.sampling.UniformSampler(cfg.strategy.clients_per_round)
    strategy = load_strategy(cfg.strategy.name, cfg.strategy.options)
    ids = tuple(parts)
    cohorts = [
        strategy.configure(rnd, sampler.sample(ids, rngs.sampling), rngs.strategy).clients
        for rnd in range(1, cfg.run.rounds + 1)
    ]
    return Plan(data, parts, cohorts)


def _setup(cfg: Config, p: Plan) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(cfg.model, p.data.input_shape, p.data.num_classes, cfg.run.seed)
    numel = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    torch.set_num_threads(cpu_threads(cfg.run.threads, numel))
    return model, torch.optim.SGD(model.parameters(), lr=cfg.client.lr)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(xb), yb).backward()
    opt.step()


def raw_loop(cfg: Config, p: Plan, sample_steps: int) -> tuple[float, int]:
    """``sample_steps`` samples in batches over shuffles of the whole train set."""
    model, opt = _setup(cfg, p)
    x, y, b = p.data.x_train, p.data.y_train, cfg.client.batch_size
    gen = torch.Generator().manual_seed(cfg.run.seed)
    done = steps = 0
    started = time.perf_counter()
    while done < sample_steps:
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), b):
            idx = order[s : min(s + b, s + sample_steps - done)]
            _step(model, opt, x[idx], y[idx])
            done += len(idx)
            steps += 1
            if done >= sample_steps:
                break
    return time.perf_counter() - started, steps


def raw_same_batches(cfg: Config, p: Plan) -> float:
    """The simulation's exact batch sequence, on one model, nothing else."""
    model, opt = _setup(cfg, p)
    x, y, b = p.data.x_train, p.data.y_train, cfg.client.batch_size
    parts = {c: torch.as_tensor(v) for c, v in p.parts.items()}
    gen = torch.Generator().manual_seed(cfg.run.seed)
    started = time.perf_counter()
    for cohort in p.cohorts:
        for c in cohort:
            part = parts[c]
            for _ in range(cfg.client.epochs):
                order = part[torch.randperm(len(part), generator=gen)]
                for s in range(0, len(part), b):
                    idx = order[s : s + b]
                    _step(model, opt, x[idx], y[idx])
    return time.perf_counter() - started


def timed_simulate(cfg: Config, p: Plan) -> tuple[float, float]:
    """Wall seconds of ``simulate(cfg)`` and the part spent outside rounds."""
    started = time.perf_counter()
    result = simulate(cfg)
    wall = time.perf_counter() - started
    got = [r.num_clients for r in result.records]
    if got != [len(c) for c in p.cohorts]:
        raise RuntimeError(f"recomputed cohorts do not match the records: {got[:5]}...")
    return wall, wall - sum(r.seconds for r in result.records)


def profile(cfg: Config, top: int = 25) -> None:
    prof = cProfile.Profile()
    prof.runcall(simulate, cfg)
    stats = pstats.Stats(prof).sort_stats("tottime")
    stats.print_stats(top)
    stats.sort_stats("cumulative").print_stats(r"fedtrain|strategies", top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, 2 repeats: a smoke run")
    ap.add_argument("--repeats", type=int, default=0, help="timings per measurement (default 5, quick 2)")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of each simulate")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    simulate(config.load(None, ["run.rounds=1"]))  # warm-up: imports (sklearn, strategies), allocator

    rows = []
    for name, overrides, quick, target in WORKLOADS:
        cfg = config.load(None, overrides + (quick if args.quick else []))
        p = plan(cfg)
        sizes = p.sizes()
        sample_steps = cfg.client.epochs * sum(sizes)
        sim_steps = cfg.client.epochs * sum(-(-n // cfg.client.batch_size) for n in sizes)
        raw, same, sim, setup = [], [], [], []
        raw_steps = 0
        for _ in range(repeats):  # interleaved, so load from other processes hits all alike
            t, raw_steps = raw_loop(cfg, p, sample_steps)
            raw.append(t)
            same.append(raw_same_batches(cfg, p))
            wall, outside = timed_simulate(cfg, p)
            sim.append(wall)
            setup.append(outside)
        ratio = min(sim) / min(raw)
        rows.append([
            f"{name}: {describe(cfg)}", len(sizes), f"{np.mean(sizes):.1f}", sample_steps,
            f"{sim_steps} / {raw_steps}",
            min(raw), min(same), f"{min(sim):.3g} ({min(setup):.2g})",
            f"**{ratio:.3f}**", "—" if target is None else f"<= {target}",
            "—" if target is None else "yes" if ratio <= target else "NO",
            f"{min(sim) / min(same):.2f}",
        ])
        if args.profile:
            print(f"--- cProfile of simulate, {name}")
            profile(cfg)

    header = [
        "workload", "client-rounds", "records/client", "sample-steps", "optimizer steps sim / raw",
        "raw s", "raw same-batches s", "simulate s (outside rounds)", "simulate / raw",
        "target", "met", "simulate / raw same-batches",
    ]
    report(
        "simulation_overhead" + ("_quick" if args.quick else ""),
        "simulate() vs a raw PyTorch loop" + (" (--quick)" if args.quick else ""),
        table(header, rows),
        [
            f"min of {repeats} interleaved repeats (other processes share the cores; they only add "
            f"time); threads = fedtrain.run.cpu_threads (1 for these models)",
            "raw = same sample-steps in full batches over the whole train set; raw same-batches = "
            "the simulation's exact per-client batch sequence (same optimizer-step count)",
            "simulate includes data load, partitioning, model build, per-round aggregation, "
            "update validation and test-set evaluation (outside rounds = setup before round 1)",
        ],
    )


if __name__ == "__main__":
    main()
