"""Batched virtual clients (``BatchedExecutor``) against one-after-another
(``SequentialExecutor``): wall time of one round's client work, same cohort, same task.

Digits (1,437 training records), ``fedtrain.models.mlp`` with hidden 32 (and
128), batch 32, SGD lr 0.3; iid partitions over 500 clients (~3 records each)
and 100 clients (~14 each), and a Dirichlet(0.5) partition over 100 clients
(ragged); and the scenario ``simulations/many_clients.toml`` itself (500
clients, hidden 128, 5 epochs, batch 8, lr 0.1) with its cohort of 5 (the
issue's target: >= 5x) and 50. Each configuration times ``train_round`` for both backends,
interleaved, repeated; the first (warm-up, probe) call is not timed. Threads:
1, as ``fedtrain.run.cpu_threads`` picks for these models. The updates
of both backends are compared (they must agree).

A second table runs ``simulations/many_clients.toml`` whole, through
``simulate`` with a run folder, once per engine: the median round (training,
aggregation, evaluation: the records' ``seconds``) and the whole call (start-up,
checkpoints and the plot included).

    python benchmarks/batched_clients.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import median, report, table
from fedtrain import ParamLayout, config
from fedtrain.aggregation import stack
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.data.clients import partitions_by_id
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import DataConfig, GradSampleMode, Partition
from fedtrain.data import load_dataset, partition
from fedtrain.data.clients import PartitionedData
from fedtrain.models import mlp
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.simulation import simulate

CPU = torch.device("cpu")
SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "many_clients.toml"


def _setup(num_clients: int, kind: Partition, hidden: int) -> tuple[PartitionedData, LocalTrainer, LocalTrainer]:
    data = load_dataset(DataConfig(), 0)
    parts = partition(kind, data.y_train.numpy(), num_clients, np.random.default_rng(0), alpha=0.5)
    clients = PartitionedData(data.x_train, data.y_train, partitions_by_id(parts), CPU)
    trainers = []
    for _ in range(2):
        torch.manual_seed(0)
        model = mlp(data.input_shape, data.num_classes, hidden)
        trainers.append(LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU))
    return clients, trainers[0], trainers[1]


def _time(backend: SequentialExecutor | BatchedExecutor, cohort: list[str], task: TrainTask, params: torch.Tensor,
          rnd: int) -> float:
    started = time.perf_counter()
    backend.train_round(rnd, cohort, task, params)
    return time.perf_counter() - started


def _scenario_rows(rounds: int) -> list[list[object]]:
    """``many_clients.toml`` through ``simulate``, sequential then batched."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch imports dynamo on first use: not either engine's cost
    rows = []
    for engine in ("sequential", "batched"):
        cfg = config.load(SCENARIO, [f"run.rounds={rounds}", f"client.engine={engine}"])
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            result = simulate(cfg, out_dir=out, progress=False)
            whole = time.perf_counter() - started
        rows.append([engine, rounds, median([r.seconds for r in result.records]) * 1e3, whole,
                     result.summary.final_accuracy])
    seq, bat = rows
    rows.append(["sequential / batched", "", seq[2] / bat[2], seq[3] / bat[3], ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plain = TrainTask(epochs=1, batch_size=32, lr=0.3)
    dp = TrainTask(epochs=1, batch_size=32, lr=0.3, privacy=ClientPrivacy(
        dp_sgd=DpSgdTask(noise_multiplier=1.0, max_grad_norm=0.2, mode=GradSampleMode.EW, secure_noise=False)))
    scenario = TrainTask(epochs=5, batch_size=8, lr=0.1)  # simulations/many_clients.toml's client settings
    configs = [
        # (clients, partition, hidden, cohort, epochs, task name, task)
        (500, Partition.IID, 128, 5, 5, "many_clients.toml", scenario),
        (500, Partition.IID, 128, 50, 5, "many_clients.toml", scenario),
        (500, Partition.IID, 32, 5, 1, "sgd", plain),
        (500, Partition.IID, 32, 50, 1, "sgd", plain),
        (500, Partition.IID, 32, 100, 1, "sgd", plain),
        (100, Partition.IID, 32, 100, 1, "sgd", plain),
        (100, Partition.IID, 32, 100, 5, "sgd", plain),
        (100, Partition.DIRICHLET, 32, 100, 5, "sgd", plain),
        (100, Partition.IID, 128, 100, 5, "sgd", plain),
        (500, Partition.IID, 32, 100, 1, "dp-sgd", dp),
        (100, Partition.IID, 32, 100, 1, "dp-sgd", dp),
    ]
    if args.quick:
        configs = [configs[i] for i in (0, 2, 4, 9)]
        args.repeats = min(args.repeats, 2)
    rows = []
    for clients, kind, hidden, cohort_size, epochs, name, base in configs:
        task = TrainTask(**{**base.__dict__, "epochs": epochs})
        data, seq_trainer, batched_trainer = _setup(clients, kind, hidden)
        params = seq_trainer.layout.flatten(seq_trainer.model.state_dict())
        cohort = list(data.ids)[:cohort_size]
        seq = SequentialExecutor(seq_trainer, data, seed=0)
        batched = BatchedExecutor(batched_trainer, data, seed=0)
        a = stack(seq.train_round(0, cohort, task, params).updates).clone()
        b = stack(batched.train_round(0, cohort, task, params).updates)
        error = float((a - b).abs().max() / a.abs().max())
        times: dict[str, list[float]] = {"seq": [], "batched": []}
        reps = args.repeats * (8 if cohort_size <= 10 else 1)  # millisecond rounds: more samples against noise
        for r in range(1, reps + 1):
            times["seq"].append(_time(seq, cohort, task, params, r))
            times["batched"].append(_time(batched, cohort, task, params, r))
        sizes = [data.size(c) for c in cohort]
        s, t = median(times["seq"]), median(times["batched"])
        rows.append([
            f"{clients} {kind.value}", hidden, cohort_size, f"{min(sizes)}–{max(sizes)}", epochs, name,
            s * 1e3, t * 1e3, s / t, min(times["seq"]) / min(times["batched"]), f"{error:.1e}",
        ])
        print(rows[-1], flush=True)
    header = ["clients", "hidden", "cohort", "records/client", "epochs", "task",
              "sequential ms", "batched ms", "speed-up (median)", "speed-up (min)", "max |Δ| / max |u|"]
    scenario = _scenario_rows(60 if args.quick else 300)
    body = (table(header, rows) + "\n\n### `fedtrain simulate simulations/many_clients.toml`, whole run\n\n"
            + table(["engine", "rounds", "median round ms", "whole call s", "final accuracy"], scenario))
    report("batched_clients" + ("_quick" if args.quick else ""),
           "Batched virtual clients vs sequential (one round's client work)" + (" (--quick)" if args.quick else ""),
           body,
           ["1 torch thread; medians (and ratio of minima) over the repeats; the first call of each backend "
            "(warm-up, BatchedExecutor's one-time probe) is not timed.",
            "max |Δ| / max |u|: largest difference of the two backends' update rows over the largest entry.",
            "Whole run: a round is training, aggregation and evaluation (the records' `seconds`); the whole call "
            "adds start-up (data, model, the batched engine's probe), a checkpoint per round and the run folder; "
            "torch's lazy import of dynamo (~2 s, on the first optimiser) is paid before either is timed."])


if __name__ == "__main__":
    main()
