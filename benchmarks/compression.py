"""Compressed updates: bytes per round and final accuracy per method, against
uncompressed float32 in the same run, on the reference digits run
(``_common.DEFAULT_RUN``) and on ``simulations/noniid_fedavg.toml``
(Dirichlet(0.1)), 3 seeds each; and the cost of compression plus
decompression per client against its local training time.

Targets (issue 17): ``int8`` ≥ 3.9× fewer uplink bytes at ≤ 0.5 points of
accuracy lost; ``topk`` 1% with error feedback ≥ 30× fewer at ≤ 2 points;
``topk`` without error feedback shown for the loss feedback prevents;
compression + decompression ≤ 10% of local training.

Each run is ``fedtrain.simulation.simulate`` (no plot).

    python benchmarks/compression.py [--quick] [--rounds-digits N] [--rounds-noniid N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_RUN, report, table  # noqa: E402

from fedtrain import config as cfg  # noqa: E402
from fedtrain.compression import CompressionPlan, decode  # noqa: E402
from fedtrain.run import RunResult, build_trainable, client_data  # noqa: E402
from fedtrain.simulation import simulate as simulate_run  # noqa: E402
from fedtrain.training.sequential import client_generator  # noqa: E402
from fedtrain.training.train_task import TrainTask  # noqa: E402
from fedtrain.types import RoundPlan  # noqa: E402
from fedtrain.privacy.policy import NoPrivacy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SETTINGS: dict[str, list[str]] = {
    "float32": [],
    "fp16": ["compression.up=fp16"],
    "int8": ["compression.up=int8"],
    "int4": ["compression.up=int4"],
    "topk 1% + EF": ["compression.up=topk", "compression.fraction=0.01"],
    "topk 1%, no EF": ["compression.up=topk", "compression.fraction=0.01", "compression.error_feedback=false"],
    "randk 1% + EF": ["compression.up=randk", "compression.fraction=0.01"],
    "int8 both ways": ["compression.up=int8", "compression.down=int8"],
}


def simulate(config: cfg.Config) -> RunResult:
    return simulate_run(config, plot=lambda *a, **k: None)


def accuracy_table(name: str, base: list[str], seeds: int, path: Path | None) -> tuple[str, dict[str, tuple]]:
    rows, results = [], {}
    for label, options in SETTINGS.items():
        acc, up, down, secs = [], [], [], []
        for seed in range(seeds):
            config = cfg.load(path, [*base, f"run.seed={seed}", *options])
            result = simulate(config)
            acc.append(result.summary.final_accuracy)
            up.append(sum(r.bytes_up for r in result.records) / len(result.records))
            down.append(sum(r.bytes_down for r in result.records) / len(result.records))
            secs.append(result.summary.rounds_seconds)
        results[label] = (statistics.mean(acc), statistics.mean(up), statistics.mean(down), statistics.mean(secs),
                          min(acc), max(acc))
        print(f"{name} {label}: {results[label]}", flush=True)
    ref = results["float32"]
    for label, (acc, up, down, secs, lo, hi) in results.items():
        rows.append([label, f"{up / 1e3:.1f}", f"{ref[1] / up:.1f}×", f"{down / 1e3:.1f}", f"{ref[2] / down:.1f}×",
                     f"{100 * acc:.2f}", f"{100 * (acc - ref[0]):+.2f}", f"{100 * lo:.1f}–{100 * hi:.1f}",
                     f"{secs:.1f}"])
    header = ["setting", "up kB/round", "up ratio", "down kB/round", "down ratio", "final acc %",
              "Δ points", "acc range (seeds)", "rounds s"]
    return f"### {name}\n\n" + table(header, rows), results


def cost_table(repeats: int) -> str:
    """Local training of one client vs compression + decompression of its update."""
    config = cfg.load(None, DEFAULT_RUN)
    clients = client_data(config, torch.device("cpu"))
    test_set = (clients.x_test, clients.y_test)
    trainable = build_trainable(config, clients.input_shape, clients.num_classes, test_set, torch.device("cpu"))
    trainer = trainable.trainer
    params = trainable.initial_params()
    task = TrainTask.of(config.client, RoundPlan(("0",)), NoPrivacy().client_privacy(1))
    x, y = clients.data.load("0")
    out = torch.empty_like(params)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    train_s = best(lambda: trainer.train(params, x, y, task, client_generator(0, 1, 0), out))
    rows = []
    for label in ("fp16", "int8", "int4", "topk 1% + EF", "randk 1% + EF"):
        plan = CompressionPlan.of(cfg.load(None, [*DEFAULT_RUN, *SETTINGS[label]]).compression, 0)
        uplink = plan.uplink

        def roundtrip() -> None:
            c = uplink.encode_("0", 1, out, 0.0)
            decode(c, c.numel)

        s = best(roundtrip)
        rows.append([label, f"{1e3 * train_s:.2f}", f"{1e3 * s:.3f}", f"{100 * s / train_s:.1f}%"])
    header = ["method", "local training ms", "compress + decompress ms", "share"]
    return (f"### Cost per client (digits MLP, {params.numel()} parameters, client 0: {len(y)} records, "
            f"{config.client.epochs} epochs)\n\n" + table(header, rows))


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 rounds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds-digits", type=int, default=50)
    parser.add_argument("--rounds-noniid", type=int, default=100)
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    rd, rn = (5, 5) if args.quick else (args.rounds_digits, args.rounds_noniid)
    digits, _ = accuracy_table(f"digits reference run ({rd} rounds)", [*DEFAULT_RUN, f"run.rounds={rd}"], seeds, None)
    noniid, _ = accuracy_table(f"noniid_fedavg.toml, Dirichlet(0.1) ({rn} rounds)", [f"run.rounds={rn}"], seeds,
                               ROOT / "simulations" / "noniid_fedavg.toml")
    cost = cost_table(5 if args.quick else 20)
    notes = [
        f"{seeds} seeds per cell (run.seed = 0 … {seeds - 1}); accuracy is the mean final test accuracy, Δ against "
        "float32 of the same seeds; bytes are what crossed per round summed over the round's clients "
        "(45-byte header per vector).",
        "EF = error feedback (Stich et al. 2018; Karimireddy et al. 2019); randk values are sent unscaled.",
        "'int8 both ways' also compresses the broadcast (a delta against the clients' copy; round 1 is sent whole).",
    ]
    if rd != 50 or rn != 100:
        notes.append(f"Rounds cut to {rd} (digits) and {rn} (noniid) to keep the benchmark short.")
    report("compression" + ("_quick" if args.quick else ""), "Compressed updates", "\n\n".join([digits, noniid, cost]),
           notes)


if __name__ == "__main__":
    main()
