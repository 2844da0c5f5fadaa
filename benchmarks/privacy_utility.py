"""Privacy–utility on digits: final test accuracy against the target ε, for
sample-level DP (DP-SGD on each client) and user-level DP (DP-FedAvg), each in
the regime it is built for and in the one it is not.

Settings (every key pinned, see ``BASE``: digits, 100 rounds of 1 local epoch,
batch 32, SGD lr 0.3, MLP hidden 128, FedAvg, δ = 1e-5, RDP accountant, seed 0):

* **sample, 2 large clients**: ``data.num_clients=2``, both every round
  (Dirichlet(0.5): 558 and 879 records), ``privacy.max_grad_norm=0.2``;
* **sample, 20 small clients**: the embedded default data (20 Dirichlet(0.5)
  clients, 41–137 records), 10 per round (uniform);
* **user, 200 clients**: ``privacy.mode=user``, 200 iid clients (~7 records),
  Poisson sampling at 50/200, ``privacy.clip=0.3``;
* **user, 200 clients, adaptive clip**: ``simulations/dp_user.toml`` with adaptive clipping
  (the same, clip 0.1 moving to the 20th percentile of update norms);
* **user, 20 clients**: 20 iid clients, Poisson 10/20, ``privacy.clip=0.3``.

Each DP cell is calibrated with ``privacy.target_epsilon`` (noise multiplier
σ chosen up front for ``run.rounds``) and repeated: the noise is drawn from a
ChaCha20 keystream under a fresh key, so runs with the same seed differ; the
non-private baseline of each setting (same data, sampling and model) is
deterministic and run once. Repeats run pass by pass over all cells; after
the first, a run that would end past ``--budget-min`` (judged by the cell's
previous run time) is skipped, so a slow machine trims repeats, never
settings. Every run is saved as it ends; ``--resume`` adds repeats to them.

Writes ``results/privacy_utility.md`` (markdown), ``.json`` (every run) and
``.png`` (accuracy vs ε, one line per setting, the non-private baselines dotted).

    python benchmarks/privacy_utility.py [--quick] [--repeats N] [--budget-min M] [--resume]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from _common import RESULTS, report, revision, table
from fedtrain import config
from fedtrain.privacy.setting import user_level_noise
from fedtrain.simulation import simulate

ROOT = Path(__file__).resolve().parent.parent
EPSILONS = (1.0, 2.0, 4.0, 8.0)
QUICK_EPSILON = 8.0

# Pinned so the table does not drift with the embedded defaults.
BASE: list[str] = [
    "data.dataset=digits", "data.alpha=0.5", "run.rounds=100", "run.seed=0",
    "client.epochs=1", "client.batch_size=32", "client.lr=0.3", "client.momentum=0.0",
    "client.optimizer=sgd", "model.name=mlp", "model.hidden=128", "strategy.name=fedavg",
    "privacy.delta=1e-5", "privacy.accountant=rdp",
]


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    file: str | None  # a scenario file under the repository root, or None
    data: list[str]  # overrides shared by the baseline and the DP runs
    dp: list[str]  # overrides of the DP runs only


SETTINGS: list[Setting] = [
    Setting("sample_2", "sample level, 2 large clients (2/round)", None,
            ["data.num_clients=2", "data.partition=dirichlet", "strategy.clients_per_round=2"],
            ["privacy.mode=sample", "privacy.max_grad_norm=0.2"]),
    Setting("sample_20", "sample level, 20 small clients (10/round, Dirichlet 0.5)", None,
            ["data.num_clients=20", "data.partition=dirichlet", "strategy.clients_per_round=10"],
            ["privacy.mode=sample", "privacy.max_grad_norm=0.2"]),
    Setting("user_200", "user level, 200 clients (Poisson 50/200, iid, clip 0.3)", None,
            ["data.num_clients=200", "data.partition=iid", "strategy.clients_per_round=50",
             "strategy.sampling=poisson"],
            ["privacy.mode=user", "privacy.clip=0.3"]),
    Setting("user_200_adaptive", "user level, 200 clients, adaptive clip from 0.1 toward the 20% quantile",
            "simulations/dp_user.toml", [],
            ["privacy.adaptive_clip=true", "privacy.clip=0.1", "privacy.target_quantile=0.2"]),
    Setting("user_20", "user level, 20 clients (Poisson 10/20, iid, clip 0.3)", None,
            ["data.num_clients=20", "data.partition=iid", "strategy.clients_per_round=10",
             "strategy.sampling=poisson"],
            ["privacy.mode=user", "privacy.clip=0.3"]),
]


def load(s: Setting, extra: list[str]) -> config.Config:
    path = ROOT / s.file if s.file else None
    return config.load(path, BASE + s.data + extra)


def baseline_config(s: Setting, quick_rounds: list[str]) -> config.Config:
    if s.file:  # the scenario file turns DP on; the baseline turns it off again
        off = ["privacy.mode=none", "privacy.target_epsilon=0", "privacy.adaptive_clip=false"]
        return load(s, off + quick_rounds)
    return load(s, quick_rounds)


def run_one(cfg: config.Config) -> dict[str, object]:
    started = time.perf_counter()
    result = simulate(cfg)
    s = result.summary
    return {
        "accuracy": s.final_accuracy,
        "best_accuracy": s.best_accuracy,
        "epsilon": s.epsilon,
        "noise_multiplier": s.noise_multiplier,
        "rounds": s.rounds,
        "clip": result.records[-1].privacy.get("clip") if result.records else None,
        "seconds": time.perf_counter() - started,
    }


def run_dp(s: Setting, e: float, quick_rounds: list[str]) -> dict[str, object]:
    """One DP run of ``s`` at target ``e``. Adaptive clipping refuses a
    ``clipped_count_stddev`` (default: expected cohort / 20) at or below half
    the calibrated noise multiplier; such a cell is rerun with it set to the
    noise multiplier itself (update noise then raised by 1/sqrt(3/4) = 1.155×)
    and marked."""
    overrides = s.dp + [f"privacy.target_epsilon={e}"] + quick_rounds
    cfg = load(s, overrides)
    try:
        return run_one(cfg)
    except config.ConfigError as exc:
        if "clipped_count_stddev" not in str(exc):
            raise
        z = user_level_noise(cfg)
        r = run_one(load(s, overrides + [f"privacy.clipped_count_stddev={z!r}"]))
        r["note"] = f"default clipped_count_stddev refused ({exc}); rerun with it = σ = {z:.3g}"
        return r


def cell(runs: list[dict[str, object]], with_sigma: bool) -> str:
    if not runs:
        return "—"
    accs = [float(r["accuracy"]) for r in runs]
    if len(accs) == 1:
        text = f"{accs[0]:.3f}"
    else:
        text = (f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f} "
                f"({min(accs):.2f}–{max(accs):.2f})")
    if with_sigma:
        text += f", σ = {float(runs[0]['noise_multiplier']):.3g}"
    if any("note" in r for r in runs):
        text += " †"
    return text


def plot(settings: list[Setting], eps: list[float], results: dict, baselines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, s in enumerate(settings):
        color = f"C{i}"
        xs, means, lo, hi = [], [], [], []
        for e in eps:
            accs = [float(r["accuracy"]) for r in results[s.key].get(e, [])]
            if accs:
                xs.append(e)
                means.append(statistics.mean(accs))
                lo.append(statistics.mean(accs) - min(accs))
                hi.append(max(accs) - statistics.mean(accs))
        ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, color=color, label=s.label)
        if s.key in baselines:
            ax.axhline(float(baselines[s.key]["accuracy"]), color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps)
    ax.set_xticklabels([f"{e:g}" for e in eps])
    ax.set_xlabel("target ε (δ = 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("digits: accuracy vs ε (mean, min–max bars; dotted = non-private)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"ε = {QUICK_EPSILON:g} only, 1 repeat, 10 rounds")
    ap.add_argument("--repeats", type=int, default=0, help="DP runs per cell (default 3, quick 1)")
    ap.add_argument("--budget-min", type=float, default=24.0,
                    help="start no repeat that would end after this many minutes (default 24)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs in results/privacy_utility.json and add repeats up to --repeats")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the uniform/seeded-noise warnings are expected here
    repeats = args.repeats or (1 if args.quick else 3)
    eps = [QUICK_EPSILON] if args.quick else list(EPSILONS)
    quick_rounds = ["run.rounds=10"] if args.quick else []
    started = time.perf_counter()
    raw = RESULTS / ("privacy_utility_quick.json" if args.quick else "privacy_utility.json")
    baselines: dict[str, dict[str, object]] = {}
    results: dict[str, dict[float, list[dict[str, object]]]] = {s.key: {e: [] for e in eps} for s in SETTINGS}
    if args.resume and raw.is_file():
        old = json.loads(raw.read_text(encoding="utf-8"))
        baselines.update(old["baselines"])
        for key, by_eps in old["runs"].items():
            for e, runs in by_eps.items():
                if key in results and float(e) in results[key]:
                    results[key][float(e)] = runs
        print(f"resumed from {raw}: {sum(len(r) for d in results.values() for r in d.values())} DP runs", flush=True)

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({
            "base": BASE,
            "settings": {s.key: {"label": s.label, "file": s.file, "overrides": s.data + s.dp} for s in SETTINGS},
            "baselines": baselines,
            "runs": {k: {str(e): v for e, v in d.items()} for k, d in results.items()},
            "quick": args.quick,
        }, indent=1), encoding="utf-8")

    by_config: dict[str, dict[str, object]] = {}
    for s in SETTINGS:
        if s.key in baselines:
            continue
        cfg = baseline_config(s, quick_rounds)
        table_ = config.to_dict(cfg)
        table_.pop("privacy")  # inert without DP (the adaptive scenario sets clip etc.)
        text = json.dumps(table_, sort_keys=True)
        if text not in by_config:  # the adaptive scenario's baseline is user_200's
            by_config[text] = run_one(cfg)
        baselines[s.key] = by_config[text]
        print(f"baseline {s.key}: {baselines[s.key]['accuracy']:.3f} "
              f"({baselines[s.key]['seconds']:.1f} s)", flush=True)
    save()

    # Repeat passes over every cell; after the first, a cell is skipped when its
    # previous run time would take the total past the budget, so a slow machine
    # trims repeats of the expensive cells first and never drops a setting.
    skipped = 0
    for k in range(repeats):
        for s in SETTINGS:
            for e in eps:
                done = results[s.key][e]
                if len(done) > k:
                    continue
                elapsed = time.perf_counter() - started
                if done and elapsed + float(done[-1]["seconds"]) > args.budget_min * 60:
                    skipped += 1
                    continue
                r = run_dp(s, e, quick_rounds)
                done.append(r)
                save()
                print(f"[{(time.perf_counter() - started) / 60:.1f} min] pass {k + 1} {s.key} ε={e:g}: "
                      f"acc {r['accuracy']:.3f}, σ {r['noise_multiplier']:.3g}, ε spent {r['epsilon']:.3g} "
                      f"({r['seconds']:.1f} s)", flush=True)
    total = time.perf_counter() - started
    counts = sorted({len(results[s.key][e]) for s in SETTINGS for e in eps})
    unique_baselines = {json.dumps(b, sort_keys=True): b for b in baselines.values()}
    run_minutes = (sum(float(r["seconds"]) for d in results.values() for rs in d.values() for r in rs)
                   + sum(float(b["seconds"]) for b in unique_baselines.values())) / 60

    png = RESULTS / ("privacy_utility_quick.png" if args.quick else "privacy_utility.png")
    plot(SETTINGS, eps, results, baselines, png)

    header = ["setting"] + [f"ε = {e:g}" for e in eps] + ["non-private"]
    rows = [[s.label] + [cell(results[s.key][e], True) for e in eps] + [f"{float(baselines[s.key]['accuracy']):.3f}"]
            for s in SETTINGS]
    spent_header = ["setting"] + [f"ε = {e:g}: ε spent (worst client)" for e in eps] + ["s per DP run", "s baseline"]
    spent_rows = []
    for s in SETTINGS:
        row: list[object] = [s.key]
        secs = []
        for e in eps:
            rs = results[s.key][e]
            secs += [float(r["seconds"]) for r in rs]
            extra = ""
            clips = [r["clip"] for r in rs if r["clip"] is not None]
            if s.key.endswith("adaptive") and clips:
                extra = f", final clip {min(clips):.3g}–{max(clips):.3g}"
            row.append(f"{max(float(r['epsilon']) for r in rs):.3g}{extra}" if rs else "—")
        row += [f"{statistics.median(secs):.1f}" if secs else "—", f"{float(baselines[s.key]['seconds']):.1f}"]
        spent_rows.append(row)
    body = (
        "Final test accuracy, mean ± std (min–max) over the repeats, and the calibrated noise multiplier σ:\n\n"
        + table(header, rows)
        + "\n\nThe ε each setting actually spent (largest over repeats) and run times:\n\n"
        + table(spent_header, spent_rows)
        + f"\n\n![accuracy vs ε]({png.name})"
    )
    report(
        "privacy_utility" + ("_quick" if args.quick else ""),
        "Privacy–utility on digits" + (" (--quick)" if args.quick else ""),
        body,
        [
            f"{counts[0]}{f'–{counts[-1]}' if len(counts) > 1 else ''} repeat(s) per DP cell (of {repeats} "
            f"asked{f'; {skipped} skipped for the {args.budget_min:g} min budget' if skipped else ''}); the "
            f"{sum(len(r) for d in results.values() for r in d.values())} DP runs and "
            f"{len(unique_baselines)} baselines took {run_minutes:.1f} min in all (their "
            "seconds above include load from other processes); baselines are deterministic, run once",
            f"{revision()} at the time of this report (a run resumed with --resume may span several); "
            + "pinned: " + " ".join(BASE) + ("; --quick: run.rounds=10" if args.quick else ""),
            "δ = 1e-5; σ calibrated for run.rounds up front. Sample level: for the smallest client taking "
            "part in every round (client sampling not credited, so with 10 of 20 per round the spent ε is "
            "below the target). User level: Poisson sampling, amplification by sampling accounted",
            "noise is cryptographic (ChaCha20, fresh key per run): repeats with the same seed differ only "
            "by the DP noise; data split, partition, init, client sampling and DP-SGD batch draws are seeded and identical",
        ] + ([
            "† adaptive clipping refused its default privacy.clipped_count_stddev (expected cohort / 20 = 2.5): "
            "the calibrated σ exceeds 2 × 2.5 (ConfigError before round 1); the cell was rerun with "
            "clipped_count_stddev = σ, so the update noise is 1.155 σ"
        ] if any("note" in r for d in results.values() for rs in d.values() for r in rs) else []),
    )


if __name__ == "__main__":
    main()
