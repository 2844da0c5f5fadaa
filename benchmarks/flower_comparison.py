"""fedtrain's in-process ``simulate`` against Flower's own simulation runtime
on the same federated workload, in the same run.

Workload (both sides): the reference run (``_common.DEFAULT_RUN``) with
``run.rounds`` = 20 (3 with --quick): scikit-learn digits with fedtrain's
stratified train/test split, fedtrain's Dirichlet(0.5) partition over 20
clients, fedtrain's MLP
(``build_model``, hidden 128, same seed so the same initial weights), 10 of 20
clients per round, 5 local epochs, batch 32, plain SGD lr 0.3, FedAvg weighted
by examples, the global model evaluated on the test split after every round.

Flower side: ``flwr.simulation.run_simulation`` (Ray backend) with a ServerApp
running Flower's message-API ``FedAvg`` (``fraction_train=0.5``,
``min_train_nodes=10``, ``min_available_nodes=20``, ``fraction_evaluate=0`` and a
centralised ``evaluate_fn`` like fedtrain's) and a ClientApp that trains the
torch model with a plain loop. Made as fast as it reasonably gets:
``client_resources = {num_cpus: 1, num_gpus: 0}`` (one Ray actor per core, so
clients train in parallel on all cores), ``torch.set_num_threads(1)`` per
client, dataset and partitions loaded once per actor and cached, model built
once per actor, no federated evaluation round, Ray dashboard off, Ray and Flower
logs at WARNING; ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_HOME`` a temp dir.
fedtrain side: ``simulate(cfg)`` in process (one thread, as it chooses).

Reported: wall seconds of the whole call on each side (Flower's includes Ray
start and stop), the rounds alone (Flower: from the centralised evaluation
before round 1 to the one after the last round), round 1 alone (Flower's
starts the actors, which import torch and load their data) and the median
round (steady state; Flower's actors train two clients at a time here), the
speed-ups (target >= 20x on the whole call) and both final accuracies.
Minimum over repeats, interleaved. On a loaded machine Flower's two actor
processes get a larger share of the cores than fedtrain's one process, so its
steady-state rounds look better there than on an idle one.

    python benchmarks/flower_comparison.py [--quick] [--repeats N] [--rounds R]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from fedtrain import config
from fedtrain.config import Config

TARGET = 20.0
SPEC: dict[str, Any] = {}  # set in the driver (ServerApp thread); the ClientApp gets it in messages
_ACTOR_CACHE: dict[str, Any] = {}  # per Ray actor process: data, partitions, model


def _overrides(rounds: int) -> tuple[str, ...]:
    from _common import DEFAULT_RUN

    return (*DEFAULT_RUN, f"run.rounds={rounds}")


def _client_state(overrides: tuple[str, ...]) -> tuple[Any, dict[str, Any], torch.nn.Module]:
    """Data, partitions and a model, built once per actor process."""
    if _ACTOR_CACHE.get("key") != overrides:
        from fedtrain.data import load_dataset
        from fedtrain.models import build_model
        from fedtrain.run import client_partitions

        cfg = config.load(None, list(overrides))
        data = load_dataset(cfg.data, cfg.run.seed)
        parts = {cid: torch.as_tensor(idx) for cid, idx in client_partitions(cfg, data).items()}
        model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.run.seed)
        _ACTOR_CACHE.update(key=overrides, data=data, parts=parts, model=model)
    return _ACTOR_CACHE["data"], _ACTOR_CACHE["parts"], _ACTOR_CACHE["model"]


def client_train(msg: Any, context: Any) -> Any:
    """Flower ClientApp train: a plain torch loop, as fedtrain's LocalTrainer does."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    torch.set_num_threads(1)
    conf = msg.content["config"]
    data, parts, model = _client_state(tuple(str(conf["overrides"]).split("|")))
    pid = int(context.node_config["partition-id"])
    idx = parts[str(pid)]
    x, y = data.x_train[idx], data.y_train[idx]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=float(conf["lr"]))
    seed = int(conf["seed"]) * 1_000_003 + int(conf["server-round"]) * 1009 + pid
    gen = torch.Generator().manual_seed(seed)
    batch = int(conf["batch_size"])
    total = 0.0
    for _ in range(int(conf["epochs"])):
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch):
            b = order[s : s + batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += float(loss) * len(b)
    metrics = MetricRecord({"train_loss": total / (len(y) * int(conf["epochs"])), "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def server_main(grid: Any, context: Any) -> None:
    """Flower ServerApp: FedAvg over 10 of 20 nodes, centralised evaluation."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from fedtrain.data import load_dataset
    from fedtrain.models import build_model

    cfg: Config = SPEC["cfg"]
    data = load_dataset(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.run.seed)
    stamps: list[float] = SPEC["stamps"]
    accuracy: list[float] = SPEC["accuracy"]

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        accuracy.append(acc)
        stamps.append(time.perf_counter())
        return MetricRecord({"accuracy": acc})

    n = cfg.data.num_clients
    k = cfg.strategy.clients_per_round
    replies: list[int] = SPEC["replies"]

    def train_metrics(contents: list[Any], key: str) -> MetricRecord:
        replies.append(len(contents))  # count the clients that trained, to catch failures
        return aggregate_metricrecords(contents, key)

    strategy = FedAvg(fraction_train=k / n, fraction_evaluate=0.0, min_train_nodes=k,
                      min_evaluate_nodes=0, min_available_nodes=n, train_metrics_aggr_fn=train_metrics)
    train_config = ConfigRecord({
        "overrides": "|".join(SPEC["overrides"]), "lr": cfg.client.lr, "epochs": cfg.client.epochs,
        "batch_size": cfg.client.batch_size, "seed": cfg.run.seed,
    })
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=cfg.run.rounds, train_config=train_config, evaluate_fn=evaluate)


# whole call s, rounds s, round 1 s, median round s, final accuracy
Timing = tuple[float, float, float, float, float]


def run_flower(rounds: int, overrides: tuple[str, ...] | None = None) -> Timing:
    """Wall seconds of ``run_simulation``, of its rounds, of its median round;
    final accuracy. ``overrides`` (``--set`` items over the embedded default)
    replace the reference run's (startup.py runs its own workload)."""
    # Import this file as a module so Ray pickles the app functions by reference
    # (benchmarks/ is on the PYTHONPATH that Flower hands to the Ray workers).
    import flower_comparison as me
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    overrides = overrides or _overrides(rounds)
    cfg = config.load(None, list(overrides))
    me.SPEC.update(cfg=cfg, overrides=overrides, stamps=[], accuracy=[], replies=[])
    client_app = ClientApp()
    client_app.train()(me.client_train)
    server_app = ServerApp()
    server_app.main()(me.server_main)
    init_args: dict[str, object] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                    "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray; joining a cluster, ray.init refuses these
        init_args.update(num_cpus=os.cpu_count() or 1, num_gpus=0,
                         _temp_dir=os.path.join(os.environ["FLWR_HOME"], "ray"))  # removed at exit
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients,
                   backend_config=backend_config)
    wall = time.perf_counter() - started
    stamps, acc = me.SPEC["stamps"], me.SPEC["accuracy"]
    if me.SPEC["replies"] != [cfg.strategy.clients_per_round] * rounds or len(acc) != rounds + 1:
        raise RuntimeError(f"Flower clients trained {me.SPEC['replies']} per round, expected "
                           f"{cfg.strategy.clients_per_round} in each of {rounds}; see its log above")
    per_round = [b - a for a, b in zip(stamps, stamps[1:])]
    return wall, stamps[-1] - stamps[0], per_round[0], statistics.median(per_round), acc[-1]


def run_fedtrain(rounds: int) -> Timing:
    from fedtrain.simulation import simulate

    started = time.perf_counter()
    result = simulate(config.load(None, _overrides(rounds)))
    wall = time.perf_counter() - started
    seconds = [r.seconds for r in result.records]
    return wall, sum(seconds), seconds[0], statistics.median(seconds), result.summary.final_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 repeat: a smoke run")
    ap.add_argument("--rounds", type=int, default=0, help="rounds on both sides (default 20, quick 3)")
    ap.add_argument("--repeats", type=int, default=0, help="runs per side (default 2, quick 1)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:
        # before flwr is imported; Ray's workers inherit the environment
        os.environ.update(FLWR_HOME=home, FLWR_TELEMETRY_ENABLED="0", FLWR_LOG_LEVEL="WARNING",
                          RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
        compare(rounds, repeats, args.quick)


def compare(rounds: int, repeats: int, quick: bool) -> None:
    from _common import report, table

    run_fedtrain(1)  # warm-up: imports, like Flower's import below
    import flwr.simulation  # noqa: F401

    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)

    fed: list[Timing] = []
    flw: list[Timing] = []
    for _ in range(repeats):
        fed.append(run_fedtrain(rounds))
        flw.append(run_flower(rounds))
    f = [min(r[i] for r in fed) for i in range(4)]
    w = [min(r[i] for r in flw) for i in range(4)]
    speedup = w[0] / f[0]
    rows = [
        ["fedtrain simulate", *f, f"{fed[-1][4]:.3f}", "", ""],
        ["Flower run_simulation (Ray)", *w, f"{flw[-1][4]:.3f}", "", ""],
        ["speed-up (Flower / fedtrain)", f"**{speedup:.1f}x**",
         *(f"{a / b:.1f}x" for a, b in zip(w[1:], f[1:])), "", f">= {TARGET:g}x",
         "yes" if speedup >= TARGET else "NO"],
    ]
    import flwr
    import ray

    report(
        "flower_comparison" + ("_quick" if quick else ""),
        f"fedtrain vs Flower simulation, digits, 20 clients, 10/round, {rounds} rounds"
        + (" (--quick)" if quick else ""),
        table(["", "wall s (whole call)", "rounds s", "round 1 s", "median round s", "final accuracy",
               "target", "met"], rows),
        [
            f"min of {repeats} interleaved runs per side; flwr {flwr.__version__}, ray {ray.__version__}",
            "Flower: Ray backend, 1 CPU per client (one actor per core, clients train in parallel), "
            "num_gpus 0, data cached per actor, FedAvg(fraction_train=0.5), centralised evaluate_fn",
            "fedtrain: simulate(config) in process, 1 torch thread; same data split, partition, "
            "initial weights, epochs, batch, lr",
            "cohorts and shuffles come from each framework's own RNG, so accuracies differ by sampling noise",
        ],
    )


if __name__ == "__main__":
    main()
