"""The ``fedtrain`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from fedtrain import config as config_mod
from fedtrain.checkpoint import CheckpointError


def _default_out(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "default"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedtrain.simulation import simulate

    if args.resume:
        if args.config or args.out:
            raise ValueError("--resume RUN_DIR takes its config from RUN_DIR/config.toml; give no CONFIG or --out")
        out = Path(args.resume)
        cfg = config_mod.load(out / "config.toml", args.set)
    else:
        cfg = config_mod.load(args.config, args.set)
        out = Path(args.out) if args.out else _default_out(args.config)
    result = simulate(cfg, out, progress=not args.quiet, resume=bool(args.resume))
    s = result.summary
    if s.stopped_early:
        print(f"stopped early: {s.stopped_early}; the model is the last one within the budget")
    privacy = f", ε = {s.epsilon:.3f} at δ = {s.delta:g}" if s.epsilon is not None else ""
    print(
        f"final accuracy {s.final_accuracy:.4f} (best {s.best_accuracy:.4f}) after {s.rounds} rounds "
        f"in {s.wall_seconds:.1f} s{privacy}; results in {out}/"
    )
    return 0


def _cmd_privacy(args: argparse.Namespace) -> int:
    from fedtrain.config import AccountantKind
    from fedtrain.privacy.accountant import calibrate_noise, epsilon_for

    kind = AccountantKind(args.accountant)
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ValueError("give exactly one of --noise-multiplier and --target-epsilon")
    if args.target_epsilon is not None:
        sigma = calibrate_noise(args.target_epsilon, args.delta, args.sample_rate, args.steps, kind)
        eps = epsilon_for(sigma, args.sample_rate, args.steps, args.delta, kind)
        print(
            f"noise multiplier {sigma:.4f} reaches ε = {eps:.4f} (target {args.target_epsilon:g}) "
            f"at δ = {args.delta:g} after {args.steps} steps at sample rate {args.sample_rate:g} ({kind.value})"
        )
    else:
        eps = epsilon_for(args.noise_multiplier, args.sample_rate, args.steps, args.delta, kind)
        print(
            f"ε = {eps:.4f} at δ = {args.delta:g} after {args.steps} steps of noise multiplier "
            f"{args.noise_multiplier:g} at sample rate {args.sample_rate:g} ({kind.value})"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtrain", description="Privacy-first federated training for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="run a federated simulation in this process",
        description="Run a federated simulation in this process. With no CONFIG it runs "
        "the embedded default: digits, 20 Dirichlet(0.5) clients, FedAvg.",
    )
    sim.add_argument("config", nargs="?", help="TOML config file (default: the embedded default)")
    sim.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key; repeatable (e.g. --set data.partition=iid)",
    )
    sim.add_argument("--out", help="run folder (default: runs/<config>-<time>)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue RUN_DIR from its last valid checkpoint (--set run.rounds=N may extend it)",
    )
    sim.set_defaults(func=_cmd_simulate)
    priv = sub.add_parser(
        "privacy",
        help="plan a DP budget: ε for a noise level, or the noise for a target ε",
        description="Compute ε of the Poisson-subsampled Gaussian mechanism after STEPS steps "
        "(DP-SGD steps, or rounds of user-level DP-FedAvg), or the noise multiplier that reaches "
        "--target-epsilon.",
    )
    priv.add_argument("--noise-multiplier", type=float, help="noise std / clip norm")
    priv.add_argument("--target-epsilon", type=float, help="find the noise multiplier for this ε")
    priv.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    priv.add_argument("--steps", type=int, required=True, help="number of steps (or rounds)")
    priv.add_argument("--delta", type=float, required=True, help="δ of (ε, δ)-DP")
    priv.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    priv.set_defaults(func=_cmd_privacy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"fedtrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
