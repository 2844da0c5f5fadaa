"""Tokens per second of ``simulate`` on federated Shakespeare against a raw
PyTorch loop doing the same steps on the same batches, in the same run.

The workload is ``simulations/shakespeare.toml`` cut to a few rounds (the
plays must be in the cache: ``fedtrain data shakespeare``). The raw loop gets
every round's cohort as the engine draws it (the seeded sampling stream,
recomputed as ``benchmarks/simulation_overhead.py`` does), runs each
client's epochs over its own records in ``client.batch_size`` batches with a
fresh ``torch.optim.Adam`` per client (as a client starts each round), on one
``gpt`` of the same size and threads, and evaluates the pooled test split
once a round as ``simulate`` does. Both engines are measured: ``sequential``
and ``batched`` (``strict``: no fallback, so its own speed is what is seen;
``auto`` picks sequential for this model; under Adam the strict batched
engine refuses it, its probe's updates differing by Adam's amplified float
noise, and the table says so). Ratio = raw seconds / simulate
seconds = simulate tokens/s over raw tokens/s; the target is >= 0.8.

    python benchmarks/shakespeare_throughput.py [--rounds N] [--repeats N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fedtrain.sampling
from _common import report, table
from fedtrain import config
from fedtrain.config import Config
from fedtrain.data import load_dataset
from fedtrain.engine import RngStreams
from fedtrain.models import build_model
from fedtrain.run import client_partitions
from fedtrain.simulation import simulate
from fedtrain.strategy import load_strategy

CONFIG = Path(__file__).resolve().parent.parent / "simulations" / "shakespeare.toml"
TARGET = 0.8


def cohorts(cfg: Config, ids: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every round's cohort, from the same seeded streams as ``simulate``."""
    rngs = RngStreams.from_seed(cfg.run.seed)
    sampler = fedtrain.sampling.make_sampler(cfg.strategy.sampling, cfg.strategy.clients_per_round, len(ids))
    strategy = load_strategy(cfg.strategy.name, cfg.strategy.options)
    return [strategy.configure(r, sampler.sample(ids, rngs.cohort), rngs.strategy).clients
            for r in range(1, cfg.run.rounds + 1)]


def raw_loop(cfg: Config) -> tuple[float, int]:
    """Seconds of the same client steps and evaluations in plain PyTorch, and the tokens trained."""
    data = load_dataset(cfg.data, cfg.run.seed)
    parts = {c: torch.as_tensor(v) for c, v in client_partitions(cfg, data).items()}
    plan = cohorts(cfg, tuple(parts))
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.run.seed)
    torch.set_num_threads(cfg.run.threads or 1)
    x, y, b = data.x_train, data.y_train, cfg.client.batch_size
    gen = torch.Generator().manual_seed(cfg.run.seed)
    tokens = 0
    started = time.perf_counter()
    for cohort in plan:
        for c in cohort:
            opt = torch.optim.Adam(model.parameters(), lr=cfg.client.lr)
            part = parts[c]
            for _ in range(cfg.client.epochs):
                order = part[torch.randperm(len(part), generator=gen)]
                for s in range(0, len(part), b):
                    idx = order[s : s + b]
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x[idx]).flatten(0, 1), y[idx].flatten()).backward()
                    opt.step()
                    tokens += y[idx].numel()
        with torch.no_grad():
            model.eval()
            for s in range(0, len(data.y_test), 1024):
                F.cross_entropy(model(data.x_test[s : s + 1024]).flatten(0, 1), data.y_test[s : s + 1024].flatten())
            model.train()
    return time.perf_counter() - started, tokens


def timed_simulate(cfg: Config) -> float:
    """Seconds of ``simulate``'s rounds (training, aggregation, evaluation)."""
    result = simulate(cfg)
    return sum(r.seconds for r in result.records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for engine in ("sequential", "batched"):
        cfg = config.load(CONFIG, [f"run.rounds={args.rounds}", f"client.engine={engine}"])
        raw, sim, tokens = [], [], 0
        try:
            for _ in range(args.repeats):
                seconds, tokens = raw_loop(cfg)
                raw.append(seconds)
                sim.append(timed_simulate(cfg))
        except ValueError as exc:  # strict batched refuses a model it cannot batch exactly
            rows.append([engine, args.rounds, tokens, "—", "—", "—", f">= {TARGET}", f"refused: {exc}"])
            continue
        ratio = min(raw) / min(sim)
        rows.append([engine, args.rounds, tokens, f"{tokens / min(raw):,.0f}", f"{tokens / min(sim):,.0f}",
                     f"**{ratio:.2f}**", f">= {TARGET}", "yes" if ratio >= TARGET else "NO"])
    report(
        "shakespeare_throughput",
        "simulate on federated Shakespeare vs a raw PyTorch loop (tokens/s)",
        table(["engine", "rounds", "tokens trained", "raw tokens/s", "simulate tokens/s", "simulate / raw",
               "target", "met"], rows),
        [f"simulations/shakespeare.toml, first {args.rounds} rounds; min of {args.repeats} interleaved repeats",
         "both sides evaluate the pooled test split once a round; simulate's time is its rounds' (no start-up)"],
    )


if __name__ == "__main__":
    main()
