"""Tokens per second of LoRA fine-tuning a Hugging Face model with
``simulate`` on federated Shakespeare, against a raw PyTorch + peft loop
doing the same client steps on the same batches, in the same run; and the
peak memory of each.

The model is built from its ``transformers`` config with random weights
(seeded) and written with ``save_pretrained`` to a temporary folder, which
the run names as ``model.name = "hf:FOLDER"``; nothing is downloaded.
``--size``:

* ``tiny``: GPT-2 with 2 layers, 128 wide and a 128-token vocabulary, for
  the CPU (GPT-2's own 50,257-token head alone would make the run too slow
  there); Shakespeare's 75 character ids fit it.
* ``small``: GPT-2 small, 124M parameters (``GPT2Config()`` as it is).
* ``llama1b``: the TinyLlama-1.1B shape (``LlamaConfig`` with 22 layers,
  2048 wide, grouped-query attention with 4 key-value heads, a 32,000-token
  vocabulary); the issue's target is LoRA in bf16 under 40 GiB of GPU memory.

The workload is ``simulations/shakespeare.toml`` with the model, LoRA of
rank ``model.lora.r = 8`` on peft's default target modules for the
architecture (``c_attn`` for GPT-2, ``q_proj`` / ``v_proj`` for Llama), 10
clients per round, ``--rounds`` rounds, ``client.device = "auto"``,
``client.precision`` from ``--precision`` and the sequential engine.

The raw loop is what a user would write with ``transformers``, ``peft`` and
``torch.optim``: the same seeded base model and LoRA initialisation, every
round's cohort as the engine draws it, each client from the round's global
adapter, its epochs over its own records in ``client.batch_size`` batches
ordered by the client's own generator (so the batches are the simulation's),
a fresh ``torch.optim.Adam`` over the trainable parameters, ``torch.autocast``
in bfloat16 under ``bf16``, the adapters averaged by record count at the
round's end, and one evaluation of the test split a round. Ratio = simulate
tokens/s over raw tokens/s; the target is >= 0.9.

Each measurement runs in its own process, so that its peak memory is its
own: on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the process's
peak resident set (``resource.getrusage``), shown with the resident set
right after the imports.

    python benchmarks/lora_throughput.py [--size tiny|small|llama1b] [--rounds N] [--repeats N]
        [--precision fp32|bf16] [--epochs N] [--test-fraction F]
"""

from __future__ import annotations

import argparse
import enum
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from _common import report, table
from fedtrain import config
from fedtrain.config import Config, Precision
from fedtrain.errors import UserError
from shakespeare_throughput import CONFIG, cohorts

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TARGET = 0.9
MEMORY_TARGET_GIB = 40.0
"""The issue's bound on GPU memory for ``llama1b`` with LoRA in bf16."""
GIB = 2**30
LORA_RANK = 8
CLIENTS_PER_ROUND = 10
TINY_VOCABULARY = 128
EVAL_BATCH = 1024
"""Test records per forward pass, as ``LocalTrainer.evaluate`` batches them."""


class Size(str, enum.Enum):
    """The model the benchmark fine-tunes (``--size``)."""

    TINY = "tiny"
    SMALL = "small"
    LLAMA1B = "llama1b"


class Side(str, enum.Enum):
    """What one child process measures."""

    RAW = "raw"
    SIMULATE = "simulate"


DEFAULT_PRECISION = {Size.TINY: Precision.FP32, Size.SMALL: Precision.FP32, Size.LLAMA1B: Precision.BF16}


@dataclass(frozen=True)
class Measured:
    """What one measurement's process reports: seconds of the rounds, tokens
    trained, the final round's test loss, the device, and its peak memory."""

    seconds: float
    tokens: int
    test_loss: float
    device: str
    peak_bytes: int
    baseline_bytes: int


def model_config(size: Size) -> PretrainedConfig:
    """The ``transformers`` config of ``size`` (random weights are drawn from it)."""
    from transformers import GPT2Config, LlamaConfig

    if size is Size.TINY:
        last = TINY_VOCABULARY - 1  # GPT-2's own special id (50256) lies outside the cut vocabulary
        return GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=TINY_VOCABULARY,
                          bos_token_id=last, eos_token_id=last)
    if size is Size.SMALL:
        return GPT2Config()
    return LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000,
    )


def save_model(size: Size, folder: Path, seed: int) -> tuple[int, int]:
    """Write the seeded random model of ``size`` to ``folder`` (``save_pretrained``,
    safetensors); return its parameter count and the LoRA adapters' (rank
    :data:`LORA_RANK` on peft's default targets)."""
    import peft
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config(size), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, task_type=peft.TaskType.CAUSAL_LM))
    return parameters, sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def overrides(args: argparse.Namespace, folder: Path) -> list[str]:
    """The ``--set`` overrides of ``simulations/shakespeare.toml`` this run measures."""
    precision = args.precision or DEFAULT_PRECISION[Size(args.size)].value
    cut = [f"client.epochs={args.epochs}"] if args.epochs else []
    cut += [f"data.test_fraction={args.test_fraction}"] if args.test_fraction else []
    return [
        f"model.name=hf:{folder}", f"model.lora.r={LORA_RANK}", f"strategy.clients_per_round={CLIENTS_PER_ROUND}",
        f"run.rounds={args.rounds}", "client.device=auto", f"client.precision={precision}",
        "client.engine=sequential", *cut,
    ]


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_loop(cfg: Config) -> tuple[float, int, float]:
    """Seconds of the same client steps, averaging and evaluations in plain
    PyTorch + peft, the tokens trained, and the last round's test loss."""
    import peft
    from transformers import AutoModelForCausalLM

    from fedtrain.data import load_dataset
    from fedtrain.huggingface import model_folder
    from fedtrain.run import client_partitions, cpu_threads
    from fedtrain.training.sequential import client_generator
    from fedtrain.training.trainer import resolve_device

    device = resolve_device(cfg.client.device)
    data = load_dataset(cfg.data, cfg.run.seed)
    parts = {c: torch.as_tensor(v, dtype=torch.long, device=device)
             for c, v in client_partitions(cfg, data).items()}
    index = {c: i for i, c in enumerate(parts)}
    plan = cohorts(cfg, tuple(parts))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        base = AutoModelForCausalLM.from_pretrained(
            model_folder(cfg.model.name), local_files_only=True, dtype=torch.float32, use_safetensors=True
        )
        lora = peft.LoraConfig(r=cfg.model.lora.r, lora_alpha=cfg.model.lora.alpha,
                               lora_dropout=cfg.model.lora.dropout, task_type=peft.TaskType.CAUSAL_LM)
        model = peft.get_peft_model(base, lora).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.set_num_threads(cpu_threads(cfg.run.threads, sum(p.numel() for p in trainable)))
    vocabulary = data.num_classes
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    b = cfg.client.batch_size
    autocast = cfg.client.precision is Precision.BF16

    def loss_of(xb: torch.Tensor, yb: torch.Tensor, reduction: str) -> torch.Tensor:
        logits = model(input_ids=xb).logits[..., :vocabulary]
        return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction=reduction)

    global_adapter = [p.detach().clone() for p in trainable]
    tokens, test_loss = 0, float("nan")
    _synchronize(device)
    started = time.perf_counter()
    for rnd, cohort in enumerate(plan, start=1):
        summed = [torch.zeros_like(g) for g in global_adapter]
        records = 0
        for c in cohort:
            with torch.no_grad():
                for p, g in zip(trainable, global_adapter):
                    p.copy_(g)
            opt = torch.optim.Adam(trainable, lr=cfg.client.lr)
            gen = client_generator(cfg.run.seed, rnd, index[c])
            xc, yc = x[parts[c]], y[parts[c]]
            n = len(yc)
            model.train()
            for _ in range(cfg.client.epochs):
                order = torch.randperm(n, generator=gen).to(device)
                for s in range(0, n, b):
                    idx = order[s : s + b]
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss = loss_of(xc[idx], yc[idx], "mean")
                    loss.backward()
                    opt.step()
                    tokens += len(idx) * yc.shape[1]
            with torch.no_grad():
                for acc, p, g in zip(summed, trainable, global_adapter):
                    acc.add_(p - g, alpha=float(n))
            records += n
        with torch.no_grad():
            for g, acc in zip(global_adapter, summed):
                g.add_(acc, alpha=1.0 / records)
            for p, g in zip(trainable, global_adapter):
                p.copy_(g)
            model.eval()
            total = torch.zeros((), device=device)
            for s in range(0, len(y_test), EVAL_BATCH):
                total += loss_of(x_test[s : s + EVAL_BATCH], y_test[s : s + EVAL_BATCH], "sum")
            test_loss = float(total) / y_test.numel()
    _synchronize(device)
    return time.perf_counter() - started, tokens, test_loss


def timed_simulate(cfg: Config) -> tuple[float, float]:
    """Seconds of ``simulate``'s rounds (training, aggregation, evaluation)
    and the last round's test loss; refused when any client failed, since
    its tokens would then be counted but not trained."""
    from fedtrain.simulation import simulate

    result = simulate(cfg)
    failed = {f"round {r.round}": dict(r.failures) for r in result.records if r.num_failed}
    if failed:
        raise RuntimeError(f"simulate: clients failed: {failed}")
    return sum(r.seconds for r in result.records), float(result.records[-1].metrics["loss"])


def planned_tokens(cfg: Config) -> int:
    """The tokens a run of ``cfg`` trains: its cohorts' records times
    ``client.epochs`` times ``data.seq_len``."""
    from fedtrain.data import load_dataset
    from fedtrain.run import client_partitions

    data = load_dataset(cfg.data, cfg.run.seed)
    sizes = {c: len(v) for c, v in client_partitions(cfg, data).items()}
    records = sum(sizes[c] for cohort in cohorts(cfg, tuple(sizes)) for c in cohort)
    return records * cfg.client.epochs * int(data.y_train.shape[1])


def measure_here(side: Side, cfg: Config) -> Measured:
    """Measure ``side`` in this process (the child's work); ``tokens`` is
    what the raw loop counted as it trained, 0 for ``simulate``."""
    from fedtrain.training.trainer import resolve_device

    import peft  # noqa: F401  (both sides import it; the baseline includes it)
    import transformers  # noqa: F401

    baseline = _rss_bytes()
    device = resolve_device(cfg.client.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if side is Side.RAW:
        seconds, tokens, loss = raw_loop(cfg)
    else:
        (seconds, loss), tokens = timed_simulate(cfg), 0
    if device.type == "cuda":
        peak, baseline = torch.cuda.max_memory_allocated(device), 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Measured(seconds, tokens, loss, str(device), peak, baseline)


def measure(side: Side, sets: list[str]) -> Measured:
    """Run ``side`` in a fresh process and read its report."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"side": side.value, "sets": sets})],
        stdout=subprocess.PIPE, text=True, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {side.value} measurement failed (exit {out.returncode}); its error is above")
    return Measured(**json.loads(out.stdout.strip().splitlines()[-1]))


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=[s.value for s in Size], default=Size.TINY.value)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of both sides; the fastest counts")
    ap.add_argument("--precision", choices=[p.value for p in Precision], default=None,
                    help="client.precision (default: fp32 for tiny and small, bf16 for llama1b)")
    ap.add_argument("--epochs", type=int, default=0, help="client.epochs, cut from the scenario's 4 (0: keep)")
    ap.add_argument("--test-fraction", type=float, default=0.0,
                    help="data.test_fraction, cut from the scenario's 0.02 (0: keep)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # child mode: one measurement, JSON in and out
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(asdict(measure_here(Side(spec["side"]), config.load(CONFIG, spec["sets"])))))
        return 0
    size = Size(args.size)
    try:
        from fedtrain.data.shakespeare import text_folder

        text_folder(config.load(CONFIG, []).data)
    except UserError as exc:
        print(f"lora_throughput: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fedtrain-lora-") as tmp:
        folder = Path(tmp) / size.value
        sets = overrides(args, folder)
        cfg = config.load(CONFIG, sets)
        parameters, adapters = save_model(size, folder, cfg.run.seed)
        tokens = planned_tokens(cfg)
        raw: list[Measured] = []
        sim: list[Measured] = []
        for _ in range(args.repeats):
            raw.append(measure(Side.RAW, sets))
            sim.append(measure(Side.SIMULATE, sets))
    best_raw = min(raw, key=lambda m: m.seconds)
    best_sim = min(sim, key=lambda m: m.seconds)
    if best_raw.tokens != tokens:
        raise RuntimeError(f"the raw loop trained {best_raw.tokens} tokens, simulate's cohorts {tokens}")
    ratio = best_raw.seconds / best_sim.seconds
    cuda = best_sim.device.startswith("cuda")
    memory_kind = "CUDA max_memory_allocated" if cuda else "peak RSS (ru_maxrss)"
    memory_target = f"<= {MEMORY_TARGET_GIB:.0f} GiB" if size is Size.LLAMA1B and cuda else "—"

    def memory_met(m: Measured) -> str:
        if memory_target == "—":
            return "—"
        return "yes" if m.peak_bytes <= MEMORY_TARGET_GIB * GIB else "NO"

    throughput = table(
        ["model", "parameters", "LoRA parameters", "precision", "device", "rounds", "tokens trained", "raw tokens/s",
         "simulate tokens/s", "simulate / raw", "target", "met"],
        [[size.value, f"{parameters / 1e6:.1f}M", f"{adapters / 1e3:.1f}k", cfg.client.precision.value, best_sim.device, args.rounds,
          tokens, f"{tokens / best_raw.seconds:,.0f}", f"{tokens / best_sim.seconds:,.0f}",
          f"**{ratio:.2f}**", f">= {TARGET}", "yes" if ratio >= TARGET else "NO"]],
    )
    memory = table(
        ["side", f"peak GiB ({memory_kind})", "GiB after the imports", "last round's test loss", "target", "met"],
        [[side, _gib(m.peak_bytes), _gib(m.baseline_bytes) if not cuda else "—", f"{m.test_loss:.4f}",
          memory_target, memory_met(m)] for side, m in (("raw PyTorch + peft", best_raw), ("simulate", best_sim))],
    )
    base = config.load(CONFIG, [])
    cuts = [f"{key} {was} -> {now}" for key, was, now in (
        ("client.epochs", base.client.epochs, cfg.client.epochs),
        ("data.test_fraction", base.data.test_fraction, cfg.data.test_fraction)) if was != now]
    notes = [
        f"simulations/shakespeare.toml with model.name = hf:TMP ({size.value}, random weights, seed {cfg.run.seed}), "
        f"LoRA r = {LORA_RANK} on peft's default targets, {CLIENTS_PER_ROUND} clients per round, "
        f"{args.rounds} rounds, client.engine = sequential; min of {args.repeats} interleaved repeats, "
        "each side in its own process",
        f"client.epochs = {cfg.client.epochs}, data.test_fraction = {cfg.data.test_fraction}, "
        f"client.batch_size = {cfg.client.batch_size}, data.seq_len = {cfg.data.seq_len}"
        + (f" (cut: {', '.join(cuts)})" if cuts else ""),
        "seconds of each repeat, raw / simulate: "
        + ", ".join(f"{r.seconds:.2f} / {m.seconds:.2f}" for r, m in zip(raw, sim)),
        "both sides evaluate the test split once a round; simulate's time is its rounds' (no start-up, "
        "no model loading); the raw loop's is its rounds' likewise",
        "peak memory: " + ("torch.cuda.max_memory_allocated of each side's process"
                           if cuda else "each side's process's peak resident set, imports (torch, transformers, "
                           "peft, fedtrain) included; the column after it is the resident set right after them"),
    ]
    if size is Size.TINY:
        notes.append(f"tiny: GPT-2 with 2 layers, 128 wide, 4 heads and a {TINY_VOCABULARY}-token vocabulary "
                     "(cut from GPT-2's 50,257 so that the CPU run is short)")
    report(f"lora_throughput_{size.value}",
           f"LoRA fine-tuning ({size.value}) with simulate vs a raw PyTorch + peft loop (tokens/s, peak memory)",
           throughput + "\n\n" + memory, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
