"""The typed, frozen configuration tree: defaults, TOML loading, ``--set``
overrides and validation.

One flat dataclass per TOML table (nanoGPT-style): every key has a type and a
default, and the fully resolved tree is written next to the results. Any error
names the key, the value and what is allowed; an unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from fedtrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the key."""


class Partition(str, enum.Enum):
    """How the training records are split among clients (see :mod:`fedtrain.data.partition`).

    ``natural``: one client per distinct key of the data set (a Shakespeare
    role, a user id); ``data.num_clients`` must equal the number of keys."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"
    RANGE = "range"
    HASH = "hash"
    NATURAL = "natural"


class KeyColumn(str, enum.Enum):
    """What range / hash partitioning splits by: the record's position, or the
    dataset's own key column (e.g. a user id)."""

    INDEX = "index"
    KEY = "key"


class Sampling(str, enum.Enum):
    """How the coordinator draws each round's cohort.

    ``uniform``: exactly ``clients_per_round`` clients without replacement.
    ``poisson``: each client independently with rate ``clients_per_round /
    num_clients``, the sampling that privacy amplification by sampling assumes.
    """

    UNIFORM = "uniform"
    POISSON = "poisson"


class PrivacyMode(str, enum.Enum):
    """Who differential privacy protects.

    ``sample``: each record of each client (DP-SGD on the client, Abadi et al. 2016).
    ``user``: each client's whole contribution (DP-FedAvg, McMahan et al. 2018).
    ``distributed``: each client's whole contribution, with the noise added by
    the clients in shares under secure aggregation, so the coordinator never
    sees a less noisy sum (see :mod:`fedtrain.privacy.distributed`).
    """

    NONE = "none"
    SAMPLE = "sample"
    USER = "user"
    DISTRIBUTED = "distributed"


class AccountantKind(str, enum.Enum):
    """Privacy accountants: Opacus' Rényi DP (Mironov 2017) or privacy random
    variable accountant (Gopi et al. 2021), tighter for many steps, or Google
    ``dp_accounting``'s privacy loss distributions (Koskela et al. 2020,
    Doroshenko et al. 2022), the tightest for the Poisson-subsampled Gaussian."""

    RDP = "rdp"
    PRV = "prv"
    PLD = "pld"


class GradSampleMode(str, enum.Enum):
    """How Opacus computes per-sample gradients; ``auto`` picks the fastest
    mode that supports the model."""

    AUTO = "auto"
    HOOKS = "hooks"
    EW = "ew"
    FUNCTORCH = "functorch"


class ClientEngine(str, enum.Enum):
    """How a simulation trains a round's cohort: ``batched`` trains the whole
    cohort at once with ``torch.func.vmap`` over stacked parameters,
    ``sequential`` one client after another; ``auto`` batches when the model
    allows it and falls back with a logged reason."""

    AUTO = "auto"
    SEQUENTIAL = "sequential"
    BATCHED = "batched"


class Optimizer(str, enum.Enum):
    """The clients' local optimiser."""

    SGD = "sgd"
    ADAM = "adam"


class Precision(str, enum.Enum):
    """The arithmetic of local training. ``BF16``: forward and backward under
    ``torch.autocast`` in bfloat16, float32 master weights and optimiser
    state; the update is computed and sent in float32."""

    FP32 = "fp32"
    BF16 = "bf16"


class Compression(str, enum.Enum):
    """How a vector is compressed on the wire (:mod:`fedtrain.compression`).

    ``fp16`` / ``bf16``: a cast; ``int8`` / ``int4``: blockwise quantisation
    with per-block float32 scales and unbiased stochastic rounding (QSGD,
    Alistarh et al. 2017); ``topk``: the largest ``compression.fraction`` of
    the coordinates by magnitude; ``randk``: that share of coordinates drawn
    from a per-round seed every client shares."""

    NONE = "none"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"
    TOPK = "topk"
    RANDK = "randk"


SPARSIFIERS = (Compression.TOPK, Compression.RANDK)
QUANTISERS = (Compression.INT8, Compression.INT4)


class RunMode(str, enum.Enum):
    """How the coordinator aggregates: ``sync`` waits for each round's whole
    cohort; ``async`` keeps ``async.concurrency`` clients training and
    aggregates every ``async.buffer_size`` updates as they finish (FedBuff,
    Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
    Aggregation"; :mod:`fedtrain.buffered`)."""

    SYNC = "sync"
    ASYNC = "async"


class Staleness(str, enum.Enum):
    """How an update ``s`` model versions old is weighted (Xie et al. 2019,
    "Asynchronous Federated Optimization", §5.2): ``polynomial``
    ``(1 + s)^-a``; ``constant`` 1; ``hinge`` 1 up to ``s = b``, then
    ``1 / (a (s − b) + 1)``."""

    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    HINGE = "hinge"


class ClientSpeed(str, enum.Enum):
    """A simulated population's speeds (:mod:`fedtrain.clock`): every client
    alike (``constant``), a log-normal slowdown of σ ``clients.spread``
    (``lognormal``), or a seeded share ``clients.stragglers_fraction`` of the
    clients ``clients.stragglers_slowdown`` times slower (``stragglers``)."""

    CONSTANT = "constant"
    LOGNORMAL = "lognormal"
    STRAGGLERS = "stragglers"


class ErrorFeedback(str, enum.Enum):
    """Whether a client adds what it did not send to its next update (Stich et
    al. 2018; Karimireddy et al. 2019). ``auto``: on for ``topk`` / ``randk``,
    off otherwise; TOML's ``true`` / ``false`` name the other two."""

    AUTO = "auto"
    ON = "true"
    OFF = "false"


def _rule(
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    exclusive_max: bool = False,
    doc: str = "",
) -> dict[str, Any]:
    return {
        "min": minimum,
        "max": maximum,
        "exclusive_min": exclusive_min,
        "exclusive_max": exclusive_max,
        "doc": doc,
    }


MAX_SEED = 2**63 - 1
"""The largest ``run.seed``: torch's generators and the seeds derived from it are 64-bit signed integers."""

LEGACY_SEEDED_DATASETS = ("digits", "diabetes")
"""Built-in data sets whose test split draws from numpy's ``RandomState(run.seed)`` (to keep the
splits runs have always used), which takes seeds below 2**32 only."""


@dataclass(frozen=True)
class RunConfig:
    rounds: int = field(default=100, metadata=_rule(1, doc="federated rounds (under run.mode = 'async': aggregations)"))
    seed: int = field(
        default=0, metadata=_rule(0, MAX_SEED, doc="seed of every random stream (a 64-bit signed integer)")
    )
    keep_checkpoints: int = field(
        default=2, metadata=_rule(1, doc="checkpoints kept in the run folder (one per round, newest kept)")
    )
    threads: int = field(
        default=0,
        metadata=_rule(0, doc="torch CPU threads; 0 = auto (1 for models under 1M parameters, else all cores)"),
    )
    checkpoint_every: int = field(
        default=1, metadata=_rule(1, doc="write a checkpoint every N rounds (and after the last one)")
    )
    tensorboard: bool = field(
        default=False,
        metadata=_rule(doc="write TensorBoard event files into RUN_DIR/tensorboard (needs fedtrain[tensorboard])"),
    )
    mode: RunMode = RunMode.SYNC


@dataclass(frozen=True)
class DataConfig:
    dataset: str = field(
        default="digits",
        metadata=_rule(doc="digits | mnist | cifar10 | synthetic | shakespeare | 'module:function'"),
    )
    root: str = field(
        default="", metadata=_rule(doc="local folder for mnist / cifar10 / shakespeare (default for it: the cache)")
    )
    num_clients: int = field(default=20, metadata=_rule(1))
    partition: Partition = Partition.DIRICHLET
    alpha: float = field(default=0.5, metadata=_rule(0.0, exclusive_min=True, doc="Dirichlet concentration"))
    shards_per_client: int = field(default=2, metadata=_rule(1))
    key: KeyColumn = KeyColumn.INDEX
    test_fraction: float = field(default=0.2, metadata=_rule(0.0, 1.0, True, True))
    allow_empty: bool = False
    synthetic_alpha: float = field(default=1.0, metadata=_rule(0.0, doc="Synthetic(α, β): model heterogeneity"))
    synthetic_beta: float = field(default=1.0, metadata=_rule(0.0, doc="Synthetic(α, β): feature heterogeneity"))
    synthetic_iid: bool = False
    seq_len: int = field(default=80, metadata=_rule(1, doc="shakespeare: characters per record (LEAF: 80)"))


@dataclass(frozen=True)
class LoraConfig:
    r: int = field(default=0, metadata=_rule(0, doc="LoRA rank; 0 = no LoRA (the whole model trains)"))
    alpha: float = field(default=16.0, metadata=_rule(0.0, exclusive_min=True, doc="LoRA scaling numerator (alpha / r)"))
    dropout: float = field(default=0.0, metadata=_rule(0.0, 1.0, exclusive_max=True, doc="dropout on the LoRA input"))
    target_modules: list[str] = field(
        default_factory=list, metadata=_rule(doc="module names LoRA adapts; [] = peft's default for the architecture")
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="mlp", metadata=_rule(doc="mlp | cnn | gpt | lstm | 'hf:PATH' | 'module:function'"))
    hidden: int = field(default=128, metadata=_rule(1, doc="hidden width of mlp and cnn"))
    layers: int = field(default=2, metadata=_rule(1, doc="gpt: transformer blocks; lstm: stacked LSTM layers"))
    heads: int = field(default=4, metadata=_rule(1, doc="gpt: attention heads; must divide model.embedding"))
    embedding: int = field(default=128, metadata=_rule(1, doc="gpt: width of the embeddings and residual stream"))
    dropout: float = field(
        default=0.0,
        metadata=_rule(0.0, 1.0, exclusive_max=True, doc="gpt: embeddings, attention, residuals; lstm: between layers"),
    )
    lstm_embedding: int = field(default=8, metadata=_rule(1, doc="lstm: token embedding width (LEAF: 8)"))
    lstm_hidden: int = field(default=256, metadata=_rule(1, doc="lstm: units per LSTM layer (LEAF: 256)"))
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class TaskConfig:
    name: str = field(
        default="classification",
        metadata=_rule(doc="classification | language_model | regression | 'module:Class' / 'file.py:Class'"),
    )
    options: dict[str, Any] = field(default_factory=dict, metadata=_rule(doc="keyword arguments of the task class"))


@dataclass(frozen=True)
class StrategyConfig:
    name: str = field(default="fedavg", metadata=_rule(doc="built-in name or 'module:Class' / 'file.py:Class'"))
    clients_per_round: int = field(default=10, metadata=_rule(1))
    sampling: Sampling = Sampling.UNIFORM
    min_clients: int = field(default=1, metadata=_rule(1, doc="fewer valid updates skip the round"))
    options: dict[str, Any] = field(default_factory=dict, metadata=_rule(doc="keyword arguments of the strategy class"))


@dataclass(frozen=True)
class ClientConfig:
    epochs: int = field(default=1, metadata=_rule(1))
    batch_size: int = field(default=32, metadata=_rule(1))
    lr: float = field(default=0.3, metadata=_rule(0.0, exclusive_min=True))
    momentum: float = field(default=0.0, metadata=_rule(0.0, 1.0, exclusive_max=True))
    weight_decay: float = field(default=0.0, metadata=_rule(0.0))
    optimizer: Optimizer = Optimizer.SGD
    device: str = field(default="auto", metadata=_rule(doc="auto | cpu | cuda | cuda:N"))
    engine: ClientEngine = ClientEngine.AUTO
    timeout: float = field(
        default=0.0, metadata=_rule(0.0, doc="seconds a client may take to load and train; 0 = no limit")
    )
    max_batch_clients: int = field(
        default=0, metadata=_rule(0, doc="batched engine: clients per chunk; 0 = sized from the device's free memory")
    )
    precision: Precision = Precision.FP32
    grad_accum_steps: int = field(
        default=1, metadata=_rule(1, doc="micro-batches per optimiser step (client.batch_size each)")
    )
    grad_checkpointing: bool = False


class AttackKind(str, enum.Enum):
    """How simulated Byzantine clients corrupt their updates.

    ``sign_flip``: send ``−scale·Δ``; ``scale``: send ``scale·Δ``; ``noise``:
    send Gaussian noise of std ``scale`` instead of ``Δ``.
    """

    NONE = "none"
    SIGN_FLIP = "sign_flip"
    SCALE = "scale"
    NOISE = "noise"


@dataclass(frozen=True)
class AttackConfig:
    kind: AttackKind = AttackKind.NONE
    fraction: float = field(default=0.0, metadata=_rule(0.0, 1.0, exclusive_max=True, doc="share of clients that attack"))
    scale: float = field(default=10.0, metadata=_rule(0.0, exclusive_min=True))


@dataclass(frozen=True)
class PrivacyConfig:
    mode: PrivacyMode = PrivacyMode.NONE
    accountant: AccountantKind = AccountantKind.RDP
    delta: float = field(default=1e-5, metadata=_rule(0.0, 1.0, True, True))
    noise_multiplier: float = field(
        default=0.0, metadata=_rule(0.0, doc="Gaussian noise std / clip; 0 with target_epsilon = calibrate")
    )
    target_epsilon: float = field(
        default=0.0,
        metadata=_rule(
            0.0,
            doc="calibrate noise_multiplier to reach this ε after run.rounds (sample level: for each client "
            "from its own record count); 0 = off",
        ),
    )
    max_epsilon: float = field(default=0.0, metadata=_rule(0.0, doc="stop before a round would exceed it; 0 = no budget"))
    max_grad_norm: float = field(
        default=0.2,
        metadata=_rule(0.0, exclusive_min=True, doc="sample level: per-record gradient clip (also scales the step)"),
    )
    min_records: int = field(
        default=16,
        metadata=_rule(
            1, 10**9,
            doc="sample level: a client with fewer records is left out with a logged reason "
            "(each client's noise is calibrated from its own count)",
        ),
    )
    clip: float = field(default=1.0, metadata=_rule(0.0, exclusive_min=True, doc="user level: L2 clip of each update"))
    adaptive_clip: bool = False
    target_quantile: float = field(default=0.5, metadata=_rule(0.0, 1.0, True, True))
    clip_lr: float = field(default=0.2, metadata=_rule(0.0, exclusive_min=True))
    clipped_count_stddev: float = field(
        default=0.0, metadata=_rule(0.0, doc="noise of the clipped count; 0 = max(expected cohort / 20, noise_multiplier)")
    )
    grad_sample_mode: GradSampleMode = GradSampleMode.AUTO
    fix_model: bool = False
    secure_noise: bool = True


@dataclass(frozen=True)
class SecureConfig:
    """Secure aggregation (SecAgg+, :mod:`fedtrain.secure`): the coordinator sees only the sum."""

    aggregation: bool = False
    bits: int = field(default=32, metadata=_rule(8, 64, doc="masked sums live in the ring Z_{2^bits}"))
    clip_range: float = field(
        default=8.0,
        metadata=_rule(0.0, exclusive_min=True, doc="each coordinate of a contribution is clamped to ±clip_range"),
    )
    max_weight: int = field(
        default=1000, metadata=_rule(1, doc="a client's weight is min(num_examples, max_weight)")
    )
    neighbours: int = field(
        default=0, metadata=_rule(0, doc="SecAgg+ graph degree; 0 = about 3·log2(clients per round)")
    )
    threshold: float = field(
        default=0.5, metadata=_rule(0.5, 1.0, doc="Shamir threshold: floor(threshold·neighbours) + 1")
    )
    simulated_dropout: float = field(
        default=0.0,
        metadata=_rule(0.0, 1.0, exclusive_max=True, doc="simulation: share of clients that drop after sharing keys"),
    )


@dataclass(frozen=True)
class CompressionConfig:
    """Compressed updates (``up``: client → coordinator) and global models
    (``down``: as a delta against the clients' last copy), :mod:`fedtrain.compression`."""

    up: Compression = Compression.NONE
    down: Compression = Compression.NONE
    fraction: float = field(
        default=0.01, metadata=_rule(0.0, 1.0, exclusive_min=True, doc="topk / randk: share of coordinates kept")
    )
    error_feedback: ErrorFeedback = ErrorFeedback.AUTO
    block: int = field(default=256, metadata=_rule(1, 1 << 20, doc="int8 / int4: coordinates per float32 scale"))
    residual_memory_mb: int = field(
        default=1024,
        metadata=_rule(0, doc="error-feedback residuals kept in memory; the rest spill to the run folder"),
    )

    @property
    def feedback(self) -> bool:
        """Whether the uplink keeps error-feedback residuals (``auto`` resolved)."""
        if self.error_feedback is ErrorFeedback.AUTO:
            return self.up in SPARSIFIERS
        return self.error_feedback is ErrorFeedback.ON and self.up is not Compression.NONE


@dataclass(frozen=True)
class AsyncConfig:
    """``[async]``: buffered asynchronous aggregation (FedBuff, Nguyen et al.
    2022), under ``run.mode = "async"`` only."""

    concurrency: int = field(default=10, metadata=_rule(1, doc="clients training at once"))
    buffer_size: int = field(default=5, metadata=_rule(1, doc="updates per aggregation (FedBuff's K)"))
    max_staleness: int = field(
        default=0, metadata=_rule(0, doc="drop an update more model versions old than this; 0 = no limit")
    )
    staleness: Staleness = Staleness.POLYNOMIAL
    staleness_exponent: float = field(
        default=0.5, metadata=_rule(0.0, exclusive_min=True, doc="a of polynomial (1+s)^-a and of hinge")
    )
    hinge_after: int = field(default=4, metadata=_rule(0, doc="hinge: b, the staleness weighted 1"))


@dataclass(frozen=True)
class PopulationConfig:
    """``[clients]``: the simulated population's speeds (:mod:`fedtrain.clock`).
    A client's virtual time for a job is its local steps × ``step_seconds``
    × its slowdown."""

    speed: ClientSpeed = ClientSpeed.CONSTANT
    spread: float = field(default=0.5, metadata=_rule(0.0, exclusive_min=True, doc="lognormal: σ of log slowdown"))
    stragglers_fraction: float = field(
        default=0.2, metadata=_rule(0.0, 1.0, doc="stragglers: share of the clients that are slow")
    )
    stragglers_slowdown: float = field(
        default=10.0, metadata=_rule(1.0, doc="stragglers: how many times slower they are")
    )
    step_seconds: float = field(
        default=1.0, metadata=_rule(0.0, exclusive_min=True, doc="virtual seconds per local step at speed 1")
    )

    @property
    def is_set(self) -> bool:
        """Whether any key differs from its default: a speed model is set."""
        return self != PopulationConfig()


TOML_NAME = "toml"
"""Field metadata key: the TOML table name of a :class:`Config` field whose
own name is a Python keyword (``async``)."""


def _toml_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get(TOML_NAME, f.name))


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    asynchrony: AsyncConfig = field(default_factory=AsyncConfig, metadata={TOML_NAME: "async"})
    clients: PopulationConfig = field(default_factory=PopulationConfig)

    @property
    def clock_set(self) -> bool:
        """Whether a simulation keeps a virtual clock: under ``run.mode =
        "async"``, or when a speed model is set (any ``[clients]`` key)."""
        return self.run.mode is RunMode.ASYNC or self.clients.is_set


BUILTIN_TASKS = ("classification", "language_model", "regression")
BUILTIN_DATASETS = ("digits", "mnist", "cifar10", "synthetic", "diabetes", "shakespeare")
BUILTIN_MODELS = ("mlp", "cnn", "gpt", "lstm")


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(str(value).lower())
        except ValueError:
            raise ConfigError(f"{key} = {value!r}: allowed values are {_describe(tp)}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} = {value!r}: expected a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
    elif origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key} = {value!r}: expected a list of non-empty strings")
        return list(value)
    elif origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} = {value!r}: expected a table")
        return dict(value)
    if tp in (int, float):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
            op = ">" if meta.get("exclusive_min") else ">="
            hi_text = f" and {'<' if meta.get('exclusive_max') else '<='} {hi}" if hi is not None else ""
            raise ConfigError(f"{key} = {value!r}: must be {op} {lo}{hi_text}")
        if hi is not None and (value > hi or (meta.get("exclusive_max") and value == hi)):
            op = "<" if meta.get("exclusive_max") else "<="
            raise ConfigError(f"{key} = {value!r}: must be {op} {hi}")
    return value


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {_toml_name(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(
            f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key in {where}; "
            f"allowed keys are {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in table:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = table[name]
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{key} = {sub!r}: expected a table [{key}]")
            kwargs[f.name] = _build(tp, sub, key)
        else:
            kwargs[f.name] = _coerce(key, table[name], tp, f.metadata)
    return cls(**kwargs)


def _check_device(device: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    head, _, index = device.partition(":")
    if head == "cuda" and index.isdigit():
        return
    raise ConfigError(f"client.device = {device!r}: allowed are 'auto', 'cpu', 'cuda' or 'cuda:N'")


HF_PREFIX = "hf:"
"""``model.name = "hf:PATH"``: a Hugging Face model from the local folder PATH."""


def _check_spec(key: str, value: str, builtins: Sequence[str]) -> None:
    if value in builtins:
        return
    if key == "model.name" and value.startswith(HF_PREFIX):
        if not value[len(HF_PREFIX):]:
            raise ConfigError(f"model.name = {value!r}: name the model's local folder, e.g. 'hf:models/gpt2-tiny'")
        return
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(
            f"{key} = {value!r}: allowed are {', '.join(repr(b) for b in builtins)} "
            "or 'package.module:function' / 'path/to/file.py:function'"
        )


def validate(config: Config) -> Config:
    """Cross-key checks that no single field can make; returns ``config``."""
    _check_device(config.client.device)
    _check_spec("data.dataset", config.data.dataset, BUILTIN_DATASETS)
    if config.data.dataset in LEGACY_SEEDED_DATASETS and config.run.seed >= 2**32:
        raise ConfigError(
            f"run.seed = {config.run.seed} with data.dataset = {config.data.dataset!r}: must be < 2**32 "
            f"({2**32}); the data set's test split draws from numpy's RandomState, which takes 32-bit seeds"
        )
    _check_spec("model.name", config.model.name, BUILTIN_MODELS)
    m = config.model
    if m.name == "gpt" and m.embedding % m.heads:
        raise ConfigError(
            f"model.embedding = {m.embedding}, model.heads = {m.heads}: the embedding must split evenly into the heads"
        )
    if m.name == "lstm" and m.dropout and m.layers == 1:
        raise ConfigError(f"model.dropout = {m.dropout} with model.layers = 1: the LSTM drops out only between layers")
    _check_spec("task.name", config.task.name, BUILTIN_TASKS)
    if config.data.dataset in ("mnist", "cifar10") and not config.data.root:
        raise ConfigError(
            f"data.root = '': data.dataset = {config.data.dataset!r} loads from a local folder; "
            "set data.root to it (nothing is downloaded at run time)"
        )
    if config.strategy.clients_per_round > config.data.num_clients:
        raise ConfigError(
            f"strategy.clients_per_round = {config.strategy.clients_per_round}: must be <= "
            f"data.num_clients = {config.data.num_clients}"
        )
    if config.strategy.min_clients > config.strategy.clients_per_round:
        raise ConfigError(
            f"strategy.min_clients = {config.strategy.min_clients}: must be <= "
            f"strategy.clients_per_round = {config.strategy.clients_per_round}"
        )
    _check_privacy(config)
    _check_compression(config)
    _check_async(config)
    _check_population(config.clients)
    c = config.client
    if config.privacy.mode is PrivacyMode.SAMPLE and c.precision is not Precision.FP32:
        raise ConfigError(
            f"client.precision = {c.precision.value!r} with privacy.mode = 'sample': allowed only 'fp32'. "
            "Under autocast Opacus' expanded-weights mode (grad_sample_mode 'ew', auto's first choice) fails "
            "and its hooks mode gives bfloat16 per-sample gradients, whose norms, which clipping bounds to "
            "privacy.max_grad_norm (the sensitivity DP-SGD's noise is calibrated to, Abadi et al. 2016), "
            "are off by bfloat16 rounding"
        )
    if config.privacy.mode is PrivacyMode.SAMPLE and c.grad_accum_steps != 1:
        raise ConfigError(
            f"client.grad_accum_steps = {c.grad_accum_steps} with privacy.mode = 'sample': allowed only 1. "
            "DP-SGD's accounting takes its Poisson sampling rate and step count from client.batch_size; "
            "a logical batch of grad_accum_steps micro-batches would change both. Lower client.batch_size "
            "(each Poisson batch is one step) to save memory"
        )
    s = config.secure
    if s.simulated_dropout and not s.aggregation:
        raise ConfigError(
            f"secure.simulated_dropout = {s.simulated_dropout}: has no effect with secure.aggregation = false"
        )
    if s.aggregation and config.strategy.clients_per_round < 2:
        raise ConfigError(
            f"strategy.clients_per_round = {config.strategy.clients_per_round} with secure.aggregation = true: "
            "the sum of one update is that update; allowed: >= 2"
        )
    if (config.attack.kind is AttackKind.NONE) != (config.attack.fraction == 0.0):
        raise ConfigError(
            f"attack.kind = {config.attack.kind.value!r}, attack.fraction = {config.attack.fraction}: "
            "set both (a kind and a fraction > 0) or neither"
        )
    return config


def _changed(table: Any) -> list[tuple[str, Any]]:
    """The keys of a table dataclass that differ from its defaults, with their values."""
    default = type(table)()
    return [(f.name, getattr(table, f.name)) for f in dataclasses.fields(table)
            if getattr(table, f.name) != getattr(default, f.name)]


def _shown(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _check_async(config: Config) -> None:
    """``[async]`` only under ``run.mode = "async"``, and what FedBuff cannot combine with."""
    a = config.asynchrony
    if config.run.mode is RunMode.SYNC:
        for key, value in _changed(a):
            raise ConfigError(
                f"async.{key} = {_shown(value)!r}: has no effect with run.mode = 'sync'; set run.mode = 'async'"
            )
        return
    n = config.data.num_clients
    for key, value in (("concurrency", a.concurrency), ("buffer_size", a.buffer_size)):
        if value > n:
            raise ConfigError(
                f"async.{key} = {value} with run.mode = 'async': must be <= data.num_clients = {n} "
                "(a client contributes at most once per buffer and never trains two jobs at once)"
            )
    if config.strategy.min_clients > a.buffer_size:
        raise ConfigError(
            f"strategy.min_clients = {config.strategy.min_clients} with run.mode = 'async': must be <= "
            f"async.buffer_size = {a.buffer_size}"
        )
    if a.staleness is not Staleness.HINGE and a.hinge_after != AsyncConfig().hinge_after:
        raise ConfigError(
            f"async.hinge_after = {a.hinge_after}: has no effect unless async.staleness = 'hinge'"
        )
    if a.staleness is Staleness.CONSTANT and a.staleness_exponent != AsyncConfig().staleness_exponent:
        raise ConfigError(
            f"async.staleness_exponent = {a.staleness_exponent}: has no effect with async.staleness = 'constant'; "
            "allowed with 'polynomial' or 'hinge'"
        )
    refusals = (
        (config.strategy.sampling is Sampling.POISSON, "strategy.sampling = 'poisson'",
         "clients are dispatched as slots free up, not sampled per round; allowed: 'uniform' (the dispatch "
         "draws idle clients uniformly)"),
        (config.secure.aggregation, "secure.aggregation = true",
         "SecAgg+ masks cancel only over one round's fixed cohort, and a buffer fills from clients that "
         "started from different models at different times; allowed: false"),
        (config.privacy.adaptive_clip, "privacy.adaptive_clip = true",
         "a job dispatched before the clip moved would be clipped to the old value; allowed: false"),
        (config.compression.up is not Compression.NONE, f"compression.up = {config.compression.up.value!r}",
         "compressed uplinks are not carried by the buffered engine yet; allowed: 'none'"),
        (config.compression.down is not Compression.NONE, f"compression.down = {config.compression.down.value!r}",
         "the clients' broadcast copy follows one model per round, not one per dispatch; allowed: 'none'"),
    )
    for refused, setting, why in refusals:
        if refused:
            raise ConfigError(f"{setting} with run.mode = 'async': {why}")


def _check_population(clients: PopulationConfig) -> None:
    """A speed model's own keys only with that model."""
    default = PopulationConfig()
    owners = {
        "spread": ClientSpeed.LOGNORMAL,
        "stragglers_fraction": ClientSpeed.STRAGGLERS,
        "stragglers_slowdown": ClientSpeed.STRAGGLERS,
    }
    for key, owner in owners.items():
        value = getattr(clients, key)
        if value != getattr(default, key) and clients.speed is not owner:
            raise ConfigError(
                f"clients.{key} = {value}: has no effect with clients.speed = {clients.speed.value!r}; "
                f"allowed with clients.speed = {owner.value!r}"
            )


def _check_compression(config: Config) -> None:
    z = config.compression
    if z.error_feedback is ErrorFeedback.ON and z.up is Compression.NONE:
        raise ConfigError(
            "compression.error_feedback = true with compression.up = 'none': nothing is left unsent; "
            "set compression.up or leave error_feedback at 'auto'"
        )
    if z.fraction != 0.01 and z.up not in SPARSIFIERS and z.down not in SPARSIFIERS:
        raise ConfigError(
            f"compression.fraction = {z.fraction}: has no effect unless compression.up or compression.down "
            "is 'topk' or 'randk'"
        )
    if z.block != 256 and z.up not in QUANTISERS and z.down not in QUANTISERS:
        raise ConfigError(
            f"compression.block = {z.block}: has no effect unless compression.up or compression.down "
            "is 'int8' or 'int4'"
        )
    if not config.secure.aggregation or z.up in (Compression.NONE, Compression.RANDK):
        return
    if z.up is Compression.TOPK:
        raise ConfigError(
            "compression.up = 'topk' with secure.aggregation = true: each client keeps other coordinates, "
            "so the masked sums of the kept values do not add up; use compression.up = 'randk', whose "
            "coordinates come from a per-round seed every client shares"
        )
    raise ConfigError(
        f"compression.up = {z.up.value!r} with secure.aggregation = true: secure aggregation already "
        "quantises each coordinate into the ring of secure.bits bits (fedtrain/secure/quantize.py), and a "
        "codec before it would round twice; allowed: 'none' or 'randk' (lower secure.bits to send fewer bytes)"
    )


def _check_privacy(config: Config) -> None:
    p = config.privacy
    if p.mode is PrivacyMode.NONE:
        for key, value, off in (
            ("noise_multiplier", p.noise_multiplier, 0.0),
            ("target_epsilon", p.target_epsilon, 0.0),
            ("max_epsilon", p.max_epsilon, 0.0),
            ("adaptive_clip", p.adaptive_clip, False),
        ):
            if value != off:
                raise ConfigError(
                    f"privacy.{key} = {value!r}: has no effect with privacy.mode = 'none'; "
                    "set privacy.mode to 'sample', 'user' or 'distributed'"
                )
        return
    if (p.noise_multiplier > 0) == (p.target_epsilon > 0):
        raise ConfigError(
            f"privacy.noise_multiplier = {p.noise_multiplier}, privacy.target_epsilon = {p.target_epsilon}: "
            f"privacy.mode = {p.mode.value!r} needs exactly one of them > 0"
        )
    if p.mode is PrivacyMode.DISTRIBUTED and not config.secure.aggregation:
        raise ConfigError(
            "privacy.mode = 'distributed' with secure.aggregation = false: each client adds only a share "
            "of the noise, which protects nothing unless the coordinator sees just the sum; "
            "set secure.aggregation = true (or use privacy.mode = 'user')"
        )
    if p.mode is PrivacyMode.USER and config.secure.aggregation:
        raise ConfigError(
            "privacy.mode = 'user' with secure.aggregation = true: DP-FedAvg checks each update's norm and adds "
            "the noise on the coordinator, which secure aggregation hides; use privacy.mode = 'distributed'"
        )
    if p.accountant is AccountantKind.PLD:
        import importlib.util

        if importlib.util.find_spec("dp_accounting") is None:
            raise ConfigError(
                "privacy.accountant = 'pld': needs Google's dp_accounting package, which is not installed; "
                "pip install 'fedtrain[pld]' (or pip install dp-accounting), or use 'rdp' or 'prv'"
            )
    if p.adaptive_clip and p.mode is not PrivacyMode.USER:
        raise ConfigError(
            f"privacy.adaptive_clip = true: adaptive clipping is for privacy.mode = 'user', not {p.mode.value!r}"
        )
    if p.max_epsilon and p.target_epsilon and p.target_epsilon > p.max_epsilon:
        raise ConfigError(
            f"privacy.target_epsilon = {p.target_epsilon}: exceeds privacy.max_epsilon = {p.max_epsilon}"
        )


def from_dict(table: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` from nested tables (as TOML gives them)."""
    return validate(_build(Config, table, ""))


def to_dict(config: Config) -> dict[str, Any]:
    """Nested plain tables, enums as their values: what ``config.toml`` holds."""

    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {
        _toml_name(f): {k: plain(v) for k, v in dataclasses.asdict(getattr(config, f.name)).items()}
        for f in dataclasses.fields(config)
    }


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(table: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested tables (a deep copy).

    The value is read as a TOML value (``3``, ``0.1``, ``true``, ``"x"``,
    ``[1, 2]``) and taken as a bare string when it is not one (``iid``).
    """
    result = _deep_copy(table)
    for item in overrides:
        path, sep, raw = item.partition("=")
        path = path.strip()
        if not sep or not path or any(not p for p in path.split(".")):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        parts = path.split(".")
        node = result
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is a value, not a table")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return result


def _deep_copy(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in table.items()}


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config from a TOML file (or the embedded default when ``path`` is
    None) with ``--set`` overrides applied, validated."""
    table: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            table = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
    return from_dict(apply_overrides(table, overrides))


def dumps(config: Config) -> str:
    """The fully resolved config as TOML text."""
    return tomli_w.dumps(to_dict(config))


def replace(config: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``config`` with ``section.key=value`` overrides, validated."""
    return from_dict(apply_overrides(to_dict(config), overrides))

