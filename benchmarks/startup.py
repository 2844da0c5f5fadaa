"""Whole-process time of a short ``fedtrain simulate``, from the shell's point
of view, against ``python -c "import torch"`` measured in the same run, and
against torch's import alone (the same, leaving with ``os._exit``: no teardown
at exit, as fedtrain's console script leaves), the floor.

Workload: digits, 20 IID clients, 10 per round, 20 rounds, 3 local epochs,
batch 32, SGD lr 0.2 (everything else the embedded default), about 0.3 s of
rounds:

    fedtrain simulate --set data.partition=iid --set run.rounds=20 --set client.epochs=3 \\
        --set client.batch_size=32 --set client.lr=0.2 --out DIR

Every command is a fresh process, started as ``sys.executable -m fedtrain.cli``
(the console script minus its launcher: a pyenv shim alone adds a tenth of a
second or more), best of N (3; 1 with --quick), the commands interleaved. The
simulate process is split with the times this script sees (start, the summary
line on stdout, exit) and those its ``summary.json`` records (``started_at``,
``setup_seconds``, ``rounds_seconds``):

- interpreter + imports: process start to the run's start (config parsing included);
- setup: data, partition, model, checks;
- rounds: the 20 rounds, round 1's batched-engine probe, checkpoints and metrics;
- results: ``summary.json`` and ``model.pt``, waiting for ``curves.png`` (drawn
  by a child process that imported matplotlib meanwhile) and the process's exit.

Also timed: ``python -c pass``, ``fedtrain --help``, ``fedtrain simulate
--help`` and ``fedtrain privacy`` (one ε, and one calibration), each with its
target. The same workload in other frameworks, when installed in this
interpreter's environment (else reported as skipped, with why): Flower's
simulation (Ray backend, ``flower_comparison.py``'s apps) and pfl-research
0.6.0 (``SimulatedBackend``, ``FederatedAveraging``, PyTorch), both whole
processes that load fedtrain's data split and model.

    python benchmarks/startup.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OVERRIDES = ("data.partition=iid", "run.rounds=20", "client.epochs=3", "client.batch_size=32", "client.lr=0.2")
TARGET_SIMULATE = 1.5
TARGET_HELP = 0.3
TARGET_PRIVACY = 1.5
PFL_VERSION = "0.6.0"
TORCH_ALONE = "import os, torch; os._exit(0)"
TORCH_FLOOR = f'python -c "{TORCH_ALONE}"'


def _fedtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtrain.cli", *args]


def _simulate_command(out: Path) -> list[str]:
    sets = [item for o in OVERRIDES for item in ("--set", o)]
    return _fedtrain("simulate", *sets, "--out", str(out))


def _wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds from start to exit of ``cmd`` (output discarded; a failure raises)."""
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def _simulate_once(out: Path) -> dict[str, float]:
    """One simulate process: total and the four phases, plus when its summary line came."""
    started_at = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen(_simulate_command(out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line_at = None
    for line in proc.stdout or ():
        if line.startswith("final accuracy"):
            line_at = time.perf_counter() - started
    if proc.wait() != 0 or line_at is None:
        raise RuntimeError(f"fedtrain simulate failed (exit {proc.returncode})")
    total = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    imports = summary["started_at"] - started_at
    setup, rounds = summary["setup_seconds"], summary["rounds_seconds"]
    return {"total": total, "imports": imports, "setup": setup, "rounds": rounds,
            "results": total - imports - setup - rounds, "line": line_at, "accuracy": summary["final_accuracy"]}


def _flower_available() -> str | None:
    """Why Flower's Ray simulation cannot run here, or None."""
    if importlib.util.find_spec("flwr") is None:
        return "flwr is not installed"
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'flwr[simulation]'; this environment has flwr without it)"
    return None


def _pfl_available() -> str | None:
    """Why pfl-research cannot run here, or None."""
    if importlib.util.find_spec("pfl") is None:
        return (f"pfl is not installed in this environment (e.g. python -m venv --system-site-packages "
                f"/tmp/pflenv && /tmp/pflenv/bin/pip install pfl=={PFL_VERSION}, then run this script "
                "with /tmp/pflenv/bin/python)")
    from importlib.metadata import version

    if version("pfl") != PFL_VERSION:
        return f"pfl {version('pfl')} is installed, not {PFL_VERSION}"
    return None


def flower_app() -> None:
    """Flower's Ray simulation of the workload in this process (flower_comparison.py's apps)."""
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:
        os.environ.update(FLWR_HOME=home, FLWR_TELEMETRY_ENABLED="0", FLWR_LOG_LEVEL="WARNING",
                          RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
        import flower_comparison

        flower_comparison.run_flower(20, OVERRIDES)


def pfl_app() -> None:
    """pfl-research's simulation of the workload in this process: fedtrain's data
    split, IID partition and MLP (same seed), ``FederatedAveraging`` of 10 of
    the 20 users per round (pfl's ``minimize_reuse`` sampler), 3 local epochs
    of batch 32 with SGD lr 0.2, central evaluation on the test split after
    every round (``CentralEvaluationCallback``); prints the final accuracy."""
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    from fedtrain import config
    from fedtrain.data import load_dataset
    from fedtrain.models import build_model
    from fedtrain.run import client_partitions

    torch.set_num_threads(1)
    cfg = config.load(None, list(OVERRIDES))
    data = load_dataset(cfg.data, cfg.run.seed)
    parts = client_partitions(cfg, data)

    class Classifier(torch.nn.Module):
        """fedtrain's MLP with the ``loss`` and ``metrics`` pfl calls."""

        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(cfg.model, data.input_shape, data.num_classes, cfg.run.seed)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:
            self.eval()
            logits = self(x)
            return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), len(y)),
                    "accuracy": Weighted(float((logits.argmax(1) == y).sum()), len(y))}

    module = Classifier()
    users = {cid: [data.x_train[idx], data.y_train[idx]] for cid, idx in parts.items()}
    train = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(users)))
    central = Dataset(raw_data=[data.x_test, data.y_test])
    model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=cfg.run.rounds,
                                           evaluation_frequency=cfg.run.rounds + 1,  # no per-user evaluation
                                           train_cohort_size=cfg.strategy.clients_per_round, val_cohort_size=0),
        backend=SimulatedBackend(training_data=train, val_data=None, postprocessors=[]),
        model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=cfg.client.lr, local_num_epochs=cfg.client.epochs,
                                              local_batch_size=cfg.client.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=1024),
        callbacks=[CentralEvaluationCallback(central, NNEvalHyperParams(local_batch_size=1024), frequency=1)],
    )
    print(json.dumps(module.metrics(data.x_test, data.y_test)["accuracy"].overall_value))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat: a smoke run")
    ap.add_argument("--repeats", type=int, default=0, help="runs per command (default 3, quick 1)")
    ap.add_argument("--app", choices=["pfl", "flower"], help=argparse.SUPPRESS)  # one framework's run, as a child
    args = ap.parse_args()
    if args.app == "pfl":
        pfl_app()
        return
    if args.app == "flower":
        flower_app()
        return
    measure(args.repeats or (1 if args.quick else 3), args.quick)


def measure(repeats: int, quick: bool) -> None:
    sys.path.insert(0, str(HERE))
    from _common import report, revision, table

    why_not = {"Flower run_simulation (Ray)": _flower_available(), f"pfl-research {PFL_VERSION}": _pfl_available()}
    others = {"Flower run_simulation (Ray)": [sys.executable, str(Path(__file__)), "--app", "flower"],
              f"pfl-research {PFL_VERSION}": [sys.executable, str(Path(__file__)), "--app", "pfl"]}
    privacy = ["privacy", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        TORCH_FLOOR: [sys.executable, "-c", TORCH_ALONE],
        "fedtrain --help": _fedtrain("--help"),
        "fedtrain simulate --help": _fedtrain("simulate", "--help"),
        "fedtrain privacy --noise-multiplier 1.0 (one ε)": _fedtrain(*privacy, "--noise-multiplier", "1.0"),
        "fedtrain privacy --target-epsilon 2.0 (calibration)": _fedtrain(*privacy, "--target-epsilon", "2.0"),
    }
    best: dict[str, float] = {name: float("inf") for name in commands}
    others_best: dict[str, float] = {name: float("inf") for name, why in why_not.items() if why is None}
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        for i in range(repeats):
            for name, cmd in commands.items():
                best[name] = min(best[name], _wall(cmd))
            runs.append(_simulate_once(Path(tmp) / f"run-{i}"))
            for name in others_best:
                others_best[name] = min(others_best[name], _wall(others[name]))
    sim = min(runs, key=lambda r: r["total"])
    torch_s = best['python -c "import torch"']
    floor_s = best[TORCH_FLOOR]
    parts = ["imports", "setup", "rounds", "results"]
    split = table(
        ["fedtrain simulate (workload)", "whole process s", *(f"{p} s" for p in parts), "summary line at s",
         "/ import torch", "/ torch's import alone", "target", "met"],
        [["best of %d" % repeats, sim["total"], *(sim[p] for p in parts), sim["line"],
          f"{sim['total'] / torch_s:.2f}x", f"{sim['total'] / floor_s:.2f}x", f"<= {TARGET_SIMULATE:g} s",
          "yes" if sim["total"] <= TARGET_SIMULATE else "NO"]],
    )
    targets = {"fedtrain --help": TARGET_HELP, "fedtrain simulate --help": TARGET_HELP,
               "fedtrain privacy --noise-multiplier 1.0 (one ε)": TARGET_PRIVACY,
               "fedtrain privacy --target-epsilon 2.0 (calibration)": TARGET_PRIVACY}
    rows = [[name, seconds, f"{seconds / torch_s:.2f}x", f"<= {targets[name]:g} s" if name in targets else "",
             ("yes" if seconds <= targets[name] else "NO") if name in targets else ""]
            for name, seconds in best.items()]
    commands_table = table(["command", "whole process s (best)", "/ import torch", "target", "met"], rows)
    versus = []
    for name, why in why_not.items():
        if why is None:
            versus.append([name, others_best[name], f"{others_best[name] / sim['total']:.1f}x", ""])
        else:
            versus.append([name, "skipped", "—", why])
    versus_table = table(["same workload, other framework", "whole process s (best)",
                          "/ fedtrain simulate", "note"], versus)
    report(
        "startup" + ("_quick" if quick else ""),
        "Whole-process start-up: digits, 20 IID clients, 10/round, 20 rounds, 3 epochs" + (" (--quick)" if quick else ""),
        "\n\n".join([split, commands_table, versus_table]),
        [
            revision(),
            f"best of {repeats} per command, interleaved; every command a fresh process "
            "(sys.executable -m fedtrain.cli, no launcher shim); final accuracy "
            f"{sim['accuracy']:.4f}",
            "imports: process start to the run's start (interpreter, imports, config); results: summary.json, "
            "model.pt, waiting for curves.png (a child process draws it, having imported matplotlib while this "
            "one imported torch and trained) and the process's exit",
            "python -c \"import torch\": interpreter start, torch's import and the interpreter's teardown of it at "
            "exit; the os._exit variant is torch's import alone, the floor for fedtrain simulate, whose console "
            "script exits without that teardown (fedtrain.cli.entry_point)",
            f"interpreter: {sys.executable}",
            "pfl: per-user evaluation before and after local training off after its first iteration "
            "(evaluation_frequency > rounds; pfl always runs it at iteration 0); it weights users equally, "
            "fedtrain by records (IID: similar sizes); central evaluation every round on both",
        ],
    )


if __name__ == "__main__":
    main()
