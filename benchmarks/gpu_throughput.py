"""fedtrain's client engines on a CUDA device: samples/s, batched against
sequential, and the share of the device's peak arithmetic the batched engine
reaches, with the device's own matrix-multiply throughput measured in the
same run as the reference.

Reference (same run): ``torch.mm`` of two 8192 × 8192 matrices in float32
(TF32 off, the engines' default), TF32 and bfloat16; TFLOP/s = 2·n³ / time.
The data-sheet dense peaks of the device are printed next to them when the
device is known (H100 SXM / H200: 67 fp32, 495 TF32, 989 bf16 TFLOP/s;
H100 PCIe: 51, 378, 756).

Workloads, each one round's client work (``train_round``) of
``SequentialExecutor`` (one client after another) and ``BatchedExecutor`` (the
cohort stacked), on the device, timed with ``torch.cuda.synchronize``:

* **digits MLP**, the many-small-clients scenario: digits over 500 iid clients
  (~3 records), hidden 128, 5 epochs, batch 8, lr 0.1; cohorts 5, 50 and 500;
* **CIFAR-shaped CNN**: ``fedtrain.models.cnn`` (hidden 128) on random
  3 × 32 × 32 records, 100 clients of 50, 1 epoch, batch 32; cohorts 10, 100;
* **wide MLP**: 3072 → 2048 → 2048 → 10 (10.5 M parameters) on random
  3 × 32 × 32 records, 64 clients of 512, 1 epoch, batch 128; cohort 64 — a
  model large enough that arithmetic, not overhead, decides.

FLOPs of a round are counted by ``torch.utils.flop_counter`` (matrix products
and convolutions, forward and backward) on the sequential round: the useful
work, without the batched engine's padding (its counter also overcounts
grouped convolutions); achieved TFLOP/s = those FLOPs / batched round time. The wide MLP is also run with TF32 matmuls allowed and under
``torch.autocast(bfloat16)`` (not an engine option: what the same code reaches
in lower precision). ``BatchedExecutor`` gets a 16 GiB memory budget so the
cohort is one chunk. Min over repeats (interleaved); threads: torch's default.

    python benchmarks/gpu_throughput.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _common import report, revision, table
from fedtrain import ParamLayout
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import DataConfig, Partition
from fedtrain.data import load_dataset, partition
from fedtrain.data.clients import PartitionedData, partitions_by_id
from fedtrain.models import cnn, mlp

GIB = 1 << 30
PEAKS: dict[str, tuple[float, float, float]] = {  # dense TFLOP/s: fp32, TF32, bf16 (NVIDIA data sheets)
    "H100 PCIe": (51.2, 378.0, 756.0),
    "H100": (66.9, 494.7, 989.4),
    "H200": (66.9, 494.7, 989.4),
}


@dataclass(frozen=True)
class Workload:
    """A federated data set on the device, a model factory and one round's task."""

    name: str
    data: PartitionedData
    model: Callable[[], nn.Module]
    task: TrainTask
    cohorts: tuple[int, ...]


def _random_clients(clients: int, records: int, seed: int, device: torch.device) -> PartitionedData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(clients * records, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (clients * records,), generator=g)
    parts = np.arange(clients * records).reshape(clients, records)
    return PartitionedData(x, y, partitions_by_id(list(parts)), device)


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    digits = load_dataset(DataConfig(), 0)
    parts = partition(Partition.IID, digits.y_train.numpy(), 500, np.random.default_rng(0))
    many = PartitionedData(digits.x_train, digits.y_train, partitions_by_id(parts), device)
    wide = 2048 if not quick else 512
    return [
        Workload("digits MLP, 500 clients", many, lambda: mlp((64,), 10, 128),
                 TrainTask(epochs=5, batch_size=8, lr=0.1), (5, 50) if quick else (5, 50, 500)),
        Workload("CIFAR-shaped CNN, 100 × 50 records", _random_clients(100, 50 if not quick else 10, 1, device),
                 lambda: cnn((3, 32, 32), 10, 128), TrainTask(epochs=1, batch_size=32, lr=0.05),
                 (10,) if quick else (10, 100)),
        Workload(f"wide MLP 3072-{wide}-{wide}-10, 64 × 512 records",
                 _random_clients(64, 512 if not quick else 64, 2, device),
                 lambda: nn.Sequential(nn.Flatten(), nn.Linear(3072, wide), nn.ReLU(), nn.Linear(wide, wide),
                                       nn.ReLU(), nn.Linear(wide, 10)),
                 TrainTask(epochs=1, batch_size=128, lr=0.05), (16,) if quick else (64,)),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def matmul_tflops(device: torch.device, dtype: torch.dtype, tf32: bool, n: int, repeats: int) -> float:
    """Measured TFLOP/s of an n × n × n ``torch.mm``: the attainable reference."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with _tf32(tf32):
        a @ b
        best = min(_timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _kernel_shares(fn: Callable[[], object], top: int = 8) -> list[list[object]]:
    """The ops that take most of the device time of ``fn`` (torch.profiler), with their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    return [[e.key[:60], e.count, f"{e.self_device_time_total / 1e3:.1f}",
             f"{100 * e.self_device_time_total / total:.0f}%"] for e in events[:top]]


def simulate_rows(device: torch.device, rounds: int) -> list[list[object]]:
    """``simulate`` of the many-small-clients scenario with each engine."""
    from pathlib import Path

    from fedtrain import config
    from fedtrain.simulation import simulate

    path = Path(__file__).resolve().parent.parent / "simulations" / "many_clients.toml"
    rows: list[list[object]] = []
    walls: dict[str, float] = {}
    for engine in ("sequential", "batched"):
        overrides = [f"client.engine={engine}", f"client.device={device.type}", f"run.rounds={rounds}"]
        simulate(config.load(path, overrides[:2] + ["run.rounds=2"]))
        started = time.perf_counter()
        result = simulate(config.load(path, overrides))
        walls[engine] = time.perf_counter() - started
        rows.append([engine, rounds, f"{walls[engine]:.2f}", f"{1e3 * walls[engine] / rounds:.1f}",
                     f"{result.summary.final_accuracy:.3f}",
                     "1" if engine == "sequential" else f"**{walls['sequential'] / walls[engine]:.1f}×**"])
    return rows


def _trainer(factory: Callable[[], nn.Module], device: torch.device) -> LocalTrainer:
    torch.manual_seed(0)
    model = factory()
    return LocalTrainer(model, ParamLayout.of(model.state_dict()), device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: a smoke run")
    ap.add_argument("--device", default="cuda", help="cuda (the point) or cpu (a smoke run of the code)")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds per engine (default 5, quick 2)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: no CUDA device here; run it where one is (or --device cpu to smoke-test)")
    repeats = args.repeats or (2 if args.quick else 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = next((v for k, v in PEAKS.items() if k in name), None)

    n = 2048 if args.quick or device.type != "cuda" else 8192
    ref = {
        "fp32": matmul_tflops(device, torch.float32, False, n, repeats),
        "tf32": matmul_tflops(device, torch.float32, True, n, repeats) if device.type == "cuda" else float("nan"),
        "bf16": matmul_tflops(device, torch.bfloat16, False, n, repeats),
    }
    ref_rows = [[k, f"{v:.1f}", f"{peaks[i]:.0f}" if peaks else "?",
                 f"{100 * v / peaks[i]:.0f}%" if peaks else "?"] for i, (k, v) in enumerate(ref.items())]

    rows: list[list[object]] = []
    peak_rows: list[list[object]] = []
    peak_cohort = 0
    kernels: list[list[object]] = []
    for wl in workloads(device, args.quick):
        seq = SequentialExecutor(_trainer(wl.model, device), wl.data, seed=0)
        batched = BatchedExecutor(_trainer(wl.model, device), wl.data, seed=0, memory_budget=16 * GIB, strict=True)
        params = seq.trainer.layout.flatten(seq.trainer.model.state_dict()).to(device)
        for cohort_size in wl.cohorts:
            cohort = list(wl.data.ids)[:cohort_size]
            samples = sum(wl.data.size(c) for c in cohort) * wl.task.epochs
            run_seq = lambda rnd=0: seq.train_round(rnd, cohort, wl.task, params)  # noqa: E731
            run_bat = lambda rnd=0: batched.train_round(rnd, cohort, wl.task, params)  # noqa: E731
            run_seq(), run_bat()  # warm-up, probe
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_seq, t_bat = [], []
            for r in range(1, repeats + 1):
                t_seq.append(_timed(lambda: run_seq(r), device))
                t_bat.append(_timed(lambda: run_bat(r), device))
            memory = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
            with FlopCounterMode(display=False) as counter:  # the useful work: no padding, no grouped convs
                run_seq()
            flops = counter.get_total_flops()
            s, b = min(t_seq), min(t_bat)
            achieved = flops / b / 1e12
            rows.append([wl.name, cohort_size, f"{samples:,}", f"{s * 1e3:.1f}", f"{b * 1e3:.1f}",
                         f"{samples / s:,.0f}", f"{samples / b:,.0f}", f"**{s / b:.1f}×**",
                         f"{achieved:.2f}", f"{100 * achieved / ref['fp32']:.1f}%", f"{memory:.2f}"])
            print(rows[-1], flush=True)
        if wl.name.startswith("wide MLP") and device.type == "cuda":
            peak_cohort = wl.cohorts[-1]
            cohort = list(wl.data.ids)[:peak_cohort]
            for label, ctx, reference in (
                ("fp32 (engine default)", contextlib.nullcontext, "fp32"),
                ("TF32 matmuls allowed", lambda: _tf32(True), "tf32"),
                ("autocast bfloat16", lambda: torch.autocast("cuda", dtype=torch.bfloat16), "bf16"),
            ):
                with ctx():
                    batched.train_round(0, cohort, wl.task, params)
                    t = min(_timed(lambda: batched.train_round(1, cohort, wl.task, params), device)
                            for _ in range(repeats))
                    if reference == "tf32":
                        kernels = _kernel_shares(lambda: batched.train_round(1, cohort, wl.task, params))
                achieved = flops / t / 1e12
                peak = peaks[("fp32", "tf32", "bf16").index(reference)] if peaks else float("nan")
                peak_rows.append([label, f"{t * 1e3:.1f}", f"{achieved:.1f}", f"{ref[reference]:.1f}",
                                  f"**{100 * achieved / ref[reference]:.0f}%**", f"{100 * achieved / peak:.0f}%"])
                print(peak_rows[-1], flush=True)

    sim_rows = simulate_rows(device, 10 if args.quick else 100)
    body = "\n\n".join([
        f"Device: {name}. Reference, measured in this run: {n}³ `torch.mm` TFLOP/s against the data sheet's "
        "dense peak:",
        table(["precision", "measured TFLOP/s", "data-sheet TFLOP/s", "measured / data sheet"], ref_rows),
        "One round's client work, sequential (`SequentialExecutor`) vs batched (`BatchedExecutor`), on the device:",
        table(["workload", "cohort", "samples / round", "sequential ms", "batched ms", "sequential samples/s",
               "batched samples/s", "batched speed-up", "batched TFLOP/s", "of measured fp32 mm",
               "peak GiB"], rows),
    ] + ([
        f"Wide MLP, cohort {peak_cohort}, batched round in three precisions, "
        "against the measured `torch.mm` of that precision and the data sheet:",
        table(["precision", "round ms", "TFLOP/s", "mm TFLOP/s (same precision)", "of measured mm",
               "of data-sheet peak"], peak_rows),
        "Where the device time of the TF32 round goes (torch.profiler, self device time per op):",
        table(["op", "calls", "device ms", "share"], kernels),
    ] if peak_rows else []) + [
        "Whole runs: `simulate` of simulations/many_clients.toml (500 clients, 5 per round) on the device, "
        "each engine, after a warm-up run:",
        table(["engine", "rounds", "wall s", "ms / round", "final accuracy", "speed-up"], sim_rows),
    ])
    report(
        "gpu" + ("_quick" if args.quick else ""),
        "fedtrain on a GPU: samples/s, batched vs sequential, share of peak" + (" (--quick)" if args.quick else ""),
        body,
        [revision(), f"min of {repeats} interleaved rounds per engine after a warm-up round; "
         "FLOPs by torch.utils.flop_counter on the sequential round (matmuls and convolutions, forward and "
         "backward; the useful work, no padding)",
         "BatchedExecutor(memory_budget = 16 GiB, strict = True); sequential = SequentialExecutor, one client after another",
         "peak GiB: torch.cuda.max_memory_allocated over the timed rounds of that cohort (both engines)"],
    )


if __name__ == "__main__":
    main()
