"""DP-SGD against non-private local training on the same model, in the same run.

Throughput (records/s) of one client's local training, ``LocalTrainer.train``
with a ``TrainTask`` without privacy (the reference) and with
``privacy=ClientPrivacy(dp_sgd=DpSgdTask(...))`` in each Opacus grad-sample
mode (``ew``, ``hooks``, ``functorch``), with secure noise (ChaCha20 normals,
the default) and with seeded noise. Workloads:

* **digits MLP**: ``fedtrain.models.mlp``, hidden 128, 720 digits records (a
  cross-silo client's size);
* **digits CNN**: ``model.name = "cnn"`` on the same records (8×8, 1 channel);
* **CIFAR-shaped CNN**: the CNN on 384 random 3×32×32 records, 10 classes.

Every variant trains a fresh model built with the same seed (Opacus' hooks
stay on a wrapped model, so the plain reference never shares an instance with
a DP variant); every call starts from the same global parameters, batch 32,
SGD lr 0.3, ``max_grad_norm`` 0.2, σ = 1. DP-SGD draws Poisson batches of
expected size 32, so records/s counts ``n · epochs`` for both. Threads as
``fedtrain.run.cpu_threads`` picks (1 for these models). Timings are
interleaved over the variants and repeated; min and median are reported (other
processes share the cores: they only add time). Also reported: the mode
``choose_mode(model, AUTO, x[:2])`` picks and whether it is the fastest one
measured, the updates of the three modes compared under the same seeded noise
and batches (they must agree), and the share of a DP round spent drawing the
secure noise (``SecureGaussian.gaussian`` of the model size, once per step,
timed on its own and as the end-to-end difference to seeded noise).

With the digits MLP's DP/plain above ``PROFILE_ABOVE`` (or ``--profile``) one
DP round of it is run under cProfile and the top costs are added to the report.

With ``--device cuda`` the variants train on the GPU (records and model
there, noise drawn for that device) and the report goes to
``results/dp_throughput_cuda.md``; the CPU-only step breakdown and profile
are left out.

    python benchmarks/dp_throughput.py [--quick] [--repeats N] [--profile] [--device cuda]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from _common import report, revision, table
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import DataConfig, GradSampleMode, ModelConfig
from fedtrain.data import load_dataset
from fedtrain.layout import ParamLayout
from fedtrain.models import build_model
from fedtrain.privacy.dpsgd import MODE_PREFERENCE, DpSgdTask, _wrap, choose_mode, steps_per_round
from fedtrain.privacy.mechanisms import per_sample_clipped_sum
from fedtrain.privacy.noise import SecureGaussian, SeededGaussian
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.run import cpu_threads

MODES = (GradSampleMode.EW, GradSampleMode.HOOKS, GradSampleMode.FUNCTORCH)
BATCH, LR, CLIP, SIGMA, SEED = 32, 0.3, 0.2, 1.0, 0
PROFILE_ABOVE = 4.0
AUTO_SLACK = 1.10  # auto "picks the fastest" when its min time is within 10% of the fastest


@dataclass(frozen=True)
class Workload:
    name: str
    model: ModelConfig
    x: torch.Tensor
    y: torch.Tensor
    input_shape: tuple[int, ...]
    epochs: int
    quick_epochs: int


def workloads() -> list[Workload]:
    digits = load_dataset(DataConfig(dataset="digits"), SEED)
    xd, yd = digits.x_train[:720].contiguous(), digits.y_train[:720].contiguous()
    gen = torch.Generator().manual_seed(SEED)
    xc = torch.randn(384, 3, 32, 32, generator=gen)
    yc = torch.randint(0, 10, (384,), generator=gen)
    return [
        Workload("digits MLP (hidden 128), 720 records", ModelConfig("mlp", 128), xd, yd, digits.input_shape, 10, 2),
        Workload("digits CNN (1×8×8), 720 records", ModelConfig("cnn", 128), xd, yd, digits.input_shape, 3, 1),
        Workload("CIFAR-shaped CNN (3×32×32, random), 384 records", ModelConfig("cnn", 128), xc, yc,
                 (3, 32, 32), 1, 1),
    ]


class Variant:
    """One trainer (its own model instance) and the task it runs."""

    def __init__(self, wl: Workload, mode: GradSampleMode | None, secure: bool, epochs: int,
                 trainer: LocalTrainer | None = None, device: torch.device = torch.device("cpu")) -> None:
        self.mode, self.secure = mode, secure
        if trainer is None:
            model = build_model(wl.model, wl.input_shape, 10, SEED)
            layout = ParamLayout.of(model.state_dict())
            trainer = LocalTrainer(model, layout, device)
        self.trainer = trainer
        self.params = trainer.layout.flatten(trainer.model.state_dict()).clone()
        self.out = torch.empty_like(self.params)
        privacy = ClientPrivacy()
        if mode is not None:
            privacy = ClientPrivacy(dp_sgd=DpSgdTask(SIGMA, CLIP, mode, secure_noise=secure))
        self.task = TrainTask(epochs=epochs, batch_size=BATCH, lr=LR, privacy=privacy)
        self.x, self.y = wl.x.to(trainer.device), wl.y.to(trainer.device)
        self.times: list[float] = []

    @property
    def label(self) -> str:
        if self.mode is None:
            return "plain SGD (reference)"
        return f"DP-SGD {self.mode.value}, {'secure' if self.secure else 'seeded'} noise"

    def run(self, seed: int = 1) -> torch.Tensor:
        self.trainer.train(self.params, self.x, self.y, self.task, torch.Generator().manual_seed(seed), self.out)
        return self.out

    def timed(self) -> None:
        started = time.perf_counter()
        self.run()
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)
        self.times.append(time.perf_counter() - started)


def best(fn: Callable[[], object], repeats: int, inner: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - started) / inner)
    return min(times)


def profile_round(v: Variant, top: int = 12) -> list[str]:
    """cProfile of one DP round of ``v``: the top fedtrain functions by
    cumulative time and the top functions overall by own time."""
    prof = cProfile.Profile()
    prof.runcall(v.run)
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = max(stats.total_tt, 1e-12)  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((file, line, func, nc, tt, ct))

    def short(file: str) -> str:
        for marker in ("/fedtrain/", "/site-packages/", "/lib/python"):
            if marker in file:
                return file.split(marker, 1)[1] if marker != "/fedtrain/" else "fedtrain/" + file.split(marker, 1)[1]
        return file

    lines = [f"cProfile of one DP round ({v.label}), {total:.3f} s under the profiler:", ""]
    ours = sorted((r for r in rows if "/fedtrain/" in r[0]), key=lambda r: -r[5])[:top]
    lines += ["| fedtrain function (cumulative) | calls | cum s | cum % | own s |", "|---|---|---|---|---|"]
    lines += [f"| {short(f)}:{fn} | {nc} | {ct:.3f} | {100 * ct / total:.0f}% | {tt:.3f} |"
              for f, _l, fn, nc, tt, ct in ours]
    lines += ["", "| function, anywhere (own time) | calls | own s | own % |", "|---|---|---|---|"]
    lines += [f"| {short(f)}:{fn} | {nc} | {tt:.3f} | {100 * tt / total:.0f}% |"
              for f, _l, fn, nc, tt, ct in sorted(rows, key=lambda r: -r[4])[:top]]
    return lines


def step_breakdown(wl: Workload, mode: GradSampleMode, repeats: int) -> dict[str, float]:
    """Seconds of the parts of one DP-SGD step on a full batch of ``BATCH``
    records, each timed on its own (interleaved, min over repeats): all of
    ``DpSgdStepper.noisy_gradient`` (secure noise), and inside it Opacus'
    forward + backward with per-sample gradients (the wrapped module the
    stepper uses), fedtrain's clip-and-sum (``per_sample_clipped_sum``) and one
    secure noise draw of the model size; and a plain forward + backward."""
    from fedtrain.privacy.dpsgd import DpSgdStepper
    from fedtrain.training.task import Classification

    x, y = wl.x[:BATCH], wl.y[:BATCH]
    model = build_model(wl.model, wl.input_shape, 10, SEED)
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = _wrap(model, mode)

    def per_sample() -> None:
        for p in params:
            p.grad_sample = None
            p.grad = None
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()

    per_sample()
    grad_samples = [p.grad_sample for p in params]
    noise = SecureGaussian()
    numel = sum(p.numel() for p in params)
    stepper = DpSgdStepper(build_model(wl.model, wl.input_shape, 10, SEED), Classification().summed_loss)
    task = DpSgdTask(SIGMA, CLIP, mode, secure_noise=True)
    plain_model = build_model(wl.model, wl.input_shape, 10, SEED)

    def plain() -> None:
        plain_model.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(x), y).backward()

    fns: dict[str, Callable[[], object]] = {
        "noisy_gradient": lambda: stepper.noisy_gradient(x, y, float(BATCH), task, noise),
        "per-sample fwd+bwd (Opacus)": per_sample,
        "clip + sum (fedtrain)": lambda: per_sample_clipped_sum(grad_samples, CLIP),
        "secure noise draw (fedtrain)": lambda: noise.gaussian(numel, 1.0, torch.device("cpu")),
        "plain fwd+bwd": plain,
    }
    inner = 10
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            started = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - started) / inner)
    wrapped.remove_hooks()
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, 2 repeats: a smoke run")
    ap.add_argument("--repeats", type=int, default=0, help="timings per variant (default 7, quick 2)")
    ap.add_argument("--profile", action="store_true", help="profile a DP round of the MLP whatever its ratio")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 7)
    # hooks mode on a model whose input needs no grad: harmless, printed once per model
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    rows: list[list[object]] = []
    summary: list[list[object]] = []
    noise_rows: list[list[object]] = []
    breakdown_rows: list[list[object]] = []
    notes_extra: list[str] = []
    profile_lines: list[str] = []
    for wl in workloads():
        epochs = wl.quick_epochs if args.quick else wl.epochs
        plain = Variant(wl, None, True, epochs, device=device)
        numel = plain.params.numel()
        torch.set_num_threads(cpu_threads(0, numel))
        variants = [plain]
        for mode in MODES:
            secure = Variant(wl, mode, True, epochs, device=device)
            variants += [secure, Variant(wl, mode, False, epochs, trainer=secure.trainer, device=device)]

        # the three modes must compute the same update from the same seeded noise and batches
        seeded = {v.mode: v.run(seed=7).clone() for v in variants if v.mode is not None and not v.secure}
        scale = max(float(seeded[GradSampleMode.EW].abs().max()), 1e-12)
        agree = {m: float((u - seeded[GradSampleMode.EW]).abs().max()) / scale for m, u in seeded.items()}

        for v in variants:  # warm-up: Opacus wrapping, first allocations
            v.run()
        for _ in range(repeats):
            for v in variants:
                v.timed()

        records = len(wl.y) * epochs
        ref_min, ref_med = min(plain.times), statistics.median(plain.times)
        auto = choose_mode(build_model(wl.model, wl.input_shape, 10, SEED), GradSampleMode.AUTO, wl.x[:2])
        for v in variants:
            t_min, t_med = min(v.times), statistics.median(v.times)
            rows.append([
                wl.name, v.label + (" ← auto" if v.mode is auto and v.secure else ""),
                f"{records / t_min:,.0f}", f"{records / t_med:,.0f}", t_min, t_med,
                "1" if v.mode is None else f"**{t_min / ref_min:.2f}** ({t_med / ref_med:.2f})",
                "—" if v.mode is None or v.secure else f"{agree[v.mode]:.1e}",
            ])
        by_mode = {m: min(v.times) for v in variants if v.secure and (m := v.mode) is not None}
        fastest = min(by_mode, key=by_mode.__getitem__)
        ok = by_mode[auto] <= AUTO_SLACK * by_mode[fastest]
        summary.append([
            wl.name, f"{numel:,}",
            " / ".join(f"{m.value} {by_mode[m] / ref_min:.2f}" for m in MODES),
            auto.value, fastest.value, "yes" if ok else f"**NO** (auto {by_mode[auto] / by_mode[fastest]:.2f}× the fastest)",
        ])

        # secure noise: its own cost per step vs a DP step, and the end-to-end difference
        steps = steps_per_round(len(wl.y), BATCH, epochs)
        sec, sed = SecureGaussian(), SeededGaussian(0)
        t_sec = best(lambda: sec.gaussian(numel, 1.0, device), repeats, 20)
        t_sed = best(lambda: sed.gaussian(numel, 1.0, device), repeats, 20)
        gen = torch.Generator().manual_seed(0)
        t_randn = best(lambda: torch.randn(numel, generator=gen), repeats, 20)
        auto_secure = next(v for v in variants if v.mode is auto and v.secure)
        auto_seeded = next(v for v in variants if v.mode is auto and not v.secure)
        dp_step = min(auto_secure.times) / steps
        noise_rows.append([
            wl.name, f"{numel:,}", f"{t_sec * 1e6:.0f}", f"{t_sed * 1e6:.0f}", f"{t_randn * 1e6:.0f}",
            f"{dp_step * 1e3:.2f}",
            f"{100 * t_sec / dp_step:.1f}%",
            f"{100 * (min(auto_secure.times) - min(auto_seeded.times)) / min(auto_secure.times):.1f}%",
        ])

        if device.type == "cpu":  # the breakdown and profile time CPU code paths
            parts = step_breakdown(wl, auto, repeats)
            plain_step = ref_min / steps
            inside = ["per-sample fwd+bwd (Opacus)", "clip + sum (fedtrain)", "secure noise draw (fedtrain)"]
            total = parts["noisy_gradient"]

            def ms(v: float) -> str:
                return f"{v * 1e3:.2f} ({100 * v / total:.0f}%)"

            breakdown_rows.append(
                [wl.name, auto.value, f"{dp_step * 1e3:.2f}", f"{total * 1e3:.2f}"]
                + [ms(parts[k]) for k in inside]
                + [ms(total - sum(parts[k] for k in inside)), f"{(dp_step - total) * 1e3:.2f}",
                   f"{plain_step * 1e3:.2f}", f"{parts['plain fwd+bwd'] * 1e3:.2f}"])

            if wl.model.name == "mlp" and (args.profile or by_mode[auto] / ref_min > PROFILE_ABOVE):
                profile_lines = profile_round(auto_secure)
        if not ok:
            notes_extra.append(
                f"{wl.name}: auto picks {auto.value} (MODE_PREFERENCE = "
                f"{', '.join(m.value for m in MODE_PREFERENCE)}) but {fastest.value} was fastest")

    body = "\n\n".join([
        "DP-SGD / plain per mode (min-time ratio, secure noise), what auto picks and whether it is the fastest:",
        table(["workload", "parameters", "DP / plain: ew / hooks / functorch", "auto picks", "fastest",
               "auto = fastest"], summary),
        "Every variant: records/s (min time, median time), seconds per round, DP / plain from min "
        "(median) times; last column: max |update − ew update| / max |ew update| under the same seeded "
        "noise and batches:",
        table(["workload", "variant", "records/s (min)", "records/s (median)", "s (min)", "s (median)",
               "DP / plain", "vs ew"], rows),
        "Secure noise (ChaCha20 + Box–Muller, one draw of the model size per DP step) against one DP "
        "step of auto's mode:",
        table(["workload", "parameters", "secure draw µs", "seeded draw µs (float64 randn)",
               "torch.randn float32 µs", "DP step ms (auto, secure)",
               "secure draw / DP step", "end-to-end (secure − seeded) / secure"], noise_rows),
        "One DP step of auto's mode (secure noise) taken apart: the end-to-end step in LocalTrainer.train "
        "(round time / steps); DpSgdStepper.noisy_gradient on a full batch of 32, timed on its own, and "
        "its parts, each timed on its own (% of noisy_gradient; other = noise add, grad assembly, Python, "
        "by difference); the rest of the step (Poisson draw, indexing, optimizer step) by difference; "
        "and the plain step. Parts timed apart can sum to more than the whole (cache, ±10% timing noise):",
        table(["workload", "mode", "DP step ms", "noisy_gradient ms", "per-sample fwd+bwd (Opacus)",
               "clip + sum (mechanisms.per_sample_clipped_sum)", "secure noise (noise.SecureGaussian)",
               "other in noisy_gradient", "rest of step ms", "plain step ms", "plain fwd+bwd ms"],
              breakdown_rows) if breakdown_rows else "(no step breakdown off the CPU)",
    ] + (["\n".join(profile_lines)] if profile_lines else []))
    report(
        "dp_throughput" + ("" if device.type == "cpu" else f"_{device.type}") + ("_quick" if args.quick else ""),
        "DP-SGD vs plain local training throughput" + (" (--quick)" if args.quick else ""),
        body,
        [
            revision(),
            f"min and median of {repeats} interleaved repeats per variant (other processes share the cores); "
            f"torch threads = fedtrain.run.cpu_threads (1 for these models)",
            f"batch {BATCH} (DP: Poisson, expected {BATCH}), SGD lr {LR}, max_grad_norm {CLIP}, σ {SIGMA}; "
            "records/s = records × epochs / seconds of LocalTrainer.train (load, train, flatten the update)",
            f"auto = the mode choose_mode(model, GradSampleMode.AUTO, x[:2]) returns; it counts as the fastest "
            f"when within {AUTO_SLACK:.2f}× of the fastest mode's min time",
        ] + notes_extra,
    )


if __name__ == "__main__":
    main()
