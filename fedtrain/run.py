"""Builds a run from its config: data, model and trainer, strategy, privacy
policy, sampler, engine and the run folder's observers.

The one place where a config becomes running objects, used alike by the
in-process simulation (:mod:`fedtrain.simulation`), the deployed coordinator
and the deployed client (:mod:`fedtrain.deploy`). Those callers differ only
in how clients are reached: an in-process executor
(:func:`in_process_executor`) or a transport the deployment hands in.
Everything that can be checked is checked here, before the first round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedtrain import checkpoint
from fedtrain.config import (
    AttackKind, ClientEngine, Config, ConfigError, GradSampleMode, KeyColumn, PrivacyMode, RunMode, from_dict, to_dict,
)
from fedtrain.compression import CompressionPlan
from fedtrain.curves import plot_curves
from fedtrain.data import Dataset, load_dataset, partition
from fedtrain.data.clients import ClientData, PartitionedData, partitions_by_id
from fedtrain.data.partition import partition_labels
from fedtrain.data.synthetic import CLASSES, DIMENSION, SyntheticData
from fedtrain.buffered import BufferedEngine
from fedtrain.clock import ClientDurations, VirtualClock
from fedtrain.engine import Engine, RngStreams, RoundObserver
from fedtrain.huggingface import save_adapter
from fedtrain.layout import ParamLayout, frozen_fingerprint, parameter_counts
from fedtrain.models import build_model
from fedtrain.privacy.events import GaussianEvent
from fedtrain.privacy.policy import Release
from fedtrain.privacy.setting import build_policy
from fedtrain.metrics import CLASSIFICATION_METRICS, MetricNames
from fedtrain.results import Plot, RunWriter, Summary
from fedtrain.sampling import make_sampler, secret_sampling
from fedtrain.strategy import Strategy, load_strategy
from fedtrain.training.attack import AttackingExecutor, choose_attackers
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.compressing import CompressingExecutor
from fedtrain.training.dispatcher import Dispatcher, VirtualClockDispatcher
from fedtrain.training.executor import Executor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.task import Task, load_task, prediction
from fedtrain.training.trainer import LocalTrainer
from fedtrain.types import Evaluation, Params, RoundRecord

if TYPE_CHECKING:
    from fedtrain.secure.setting import SecureSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """The final model (flat, with its layout), every round's record and the summary."""

    params: torch.Tensor
    layout: ParamLayout
    records: tuple[RoundRecord, ...]
    summary: Summary
    run_dir: Path | None


def client_partitions(config: Config, data: Dataset) -> dict[str, np.ndarray]:
    """The training-record indices of every client, from the config's partitioner.

    ``natural`` always splits by the data set's key column (one client per
    distinct key, whatever ``data.key`` says), and ``data.num_clients`` must
    equal the number of keys; client ``"i"`` is the ``i``-th key in sorted
    order, so a deployed client's ``--partition i`` names the same role."""
    from fedtrain.config import Partition

    natural = config.data.partition is Partition.NATURAL
    if natural and data.keys is None:
        raise ConfigError(
            f"data.partition = 'natural': dataset {data.name!r} has no key column to take its clients from; "
            "use another data.partition"
        )
    if config.data.key is KeyColumn.KEY and data.keys is None:
        raise ConfigError(
            f"data.key = 'key': dataset {data.name!r} has no key column; use data.key = 'index'"
        )
    rng = np.random.default_rng(np.random.SeedSequence([config.run.seed, 0x9A27]))
    parts = partition(
        config.data.partition,
        partition_labels(data.y_train.numpy(), config.data.partition),
        config.data.num_clients,
        rng,
        alpha=config.data.alpha,
        shards_per_client=config.data.shards_per_client,
        keys=data.keys if natural or config.data.key is KeyColumn.KEY else None,
        allow_empty=config.data.allow_empty,
    )
    return partitions_by_id(parts)


@dataclass(frozen=True)
class FederatedData:
    """Every client's training records, the held-out test split, and the shapes
    a model needs."""

    data: ClientData
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int


def client_data(config: Config, device: torch.device) -> FederatedData:
    """The configured data set split among ``data.num_clients`` clients:
    generated per client for ``synthetic``, partitioned otherwise."""
    if config.data.dataset == "synthetic":
        synthetic = SyntheticData(
            config.data.num_clients,
            config.data.synthetic_alpha,
            config.data.synthetic_beta,
            config.data.test_fraction,
            config.run.seed,
            device,
            iid=config.data.synthetic_iid,
        )
        x_test, y_test = synthetic.test_set()
        return FederatedData(synthetic, x_test, y_test, (DIMENSION,), CLASSES)
    data = load_dataset(config.data, config.run.seed)
    parts = client_partitions(config, data)
    return FederatedData(
        PartitionedData(data.x_train, data.y_train, parts, device),
        data.x_test.to(device),
        data.y_test.to(device),
        data.input_shape,
        data.num_classes,
    )


SMALL_MODEL_PARAMETERS = 1_000_000


def cpu_threads(requested: int, num_parameters: int) -> int:
    """Threads for torch on the CPU. Intra-op threads only pay off for large
    tensors: a 5k-parameter MLP step measured 5x slower with 2 threads than
    with 1 on the 2-core CI machines, so small models get one."""
    if requested > 0:
        return requested
    return 1 if num_parameters < SMALL_MODEL_PARAMETERS else max(1, os.cpu_count() or 1)


def prepare_model(
    config: Config, input_shape: tuple[int, ...], num_classes: int, sample: torch.Tensor
) -> tuple[nn.Module, GradSampleMode]:
    """The configured model, made DP-SGD ready under sample-level privacy, and
    the per-sample gradient mode chosen for it (tried on ``sample``)."""
    model = build_model(
        config.model, input_shape, num_classes, config.run.seed, config.task.name, config.client.grad_checkpointing
    )
    grad_sample_mode = config.privacy.grad_sample_mode
    if config.privacy.mode is PrivacyMode.SAMPLE:
        from fedtrain.privacy.dpsgd import choose_mode, make_private_model

        model = make_private_model(model, config.privacy.fix_model)
        grad_sample_mode = choose_mode(model, grad_sample_mode, sample)
    return model, grad_sample_mode


@dataclass(frozen=True)
class Trainable:
    """The run's model as every party builds it: the trainer that holds it,
    its flat layout (what is federated: :mod:`fedtrain.layout`), and the
    per-sample gradient mode chosen for it."""

    trainer: LocalTrainer
    layout: ParamLayout
    grad_sample_mode: GradSampleMode

    def initial_params(self) -> torch.Tensor:
        """The model's initial flat parameters, on the trainer's device."""
        return self.layout.flatten(self.trainer.model.state_dict()).to(self.trainer.device)

    def fingerprint(self) -> str:
        """The fingerprint of what stays on each party (:func:`fedtrain.layout.frozen_fingerprint`)."""
        return frozen_fingerprint(self.trainer.model, self.layout)

    def final_state(self, params: torch.Tensor) -> Params:
        """The model's whole ``state_dict`` (on the CPU) with the federated
        tensors set to ``params``: frozen tensors as built, a tied tensor
        under each of its names."""
        self.trainer.load_(params)
        return {k: v.detach().cpu().clone() for k, v in self.trainer.model.state_dict().items()}


def build_trainable(
    config: Config,
    input_shape: tuple[int, ...],
    num_classes: int,
    records: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
) -> Trainable:
    """The configured task and model on ``device`` in a :class:`LocalTrainer`,
    with torch's CPU threads set for its size (:func:`cpu_threads`).

    ``records`` (the test split, or a deployed client's own data) are checked
    against the task, and the model's output for two of them against the
    task's targets, so that a model or data set that does not fit the task is
    refused before round 1 with the shapes named, not in every client."""
    task = load_task(config.task.name, config.task.options)
    x, y = records
    task.check_data(x, y, num_classes, f"data.dataset = {config.data.dataset!r}")
    model, grad_sample_mode = prepare_model(config, input_shape, num_classes, x[:2])
    check_model_output(task, model, x[:2], y[:2], num_classes)
    layout = ParamLayout.of_model(model)
    torch.set_num_threads(cpu_threads(config.run.threads, layout.numel))
    return Trainable(LocalTrainer(model, layout, device, task), layout, grad_sample_mode)


def check_model_output(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """Refuse ``model`` when its output for ``x`` does not fit ``task``'s
    targets ``y``, or (classes as integer labels) has fewer logits than the
    data set's ``num_classes``: two records need not show every label. Run
    in eval mode without gradients, so that no random stream or batch-norm
    statistic moves."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                output = model(x.to(next(iter(model.parameters()), torch.empty(0)).device))
            except Exception as exc:  # a model that cannot take the task's inputs at all
                raise ConfigError(
                    f"task.name = {task.name!r}: the model cannot run on the data's inputs ({x.dtype} of shape "
                    f"{tuple(x.shape)}): {type(exc).__name__}: {exc}"
                ) from None
        try:
            predicted = prediction(output)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        task.check_output(predicted, y.to(predicted.device))
        if predicted.dim() == 2 and y.dim() == 1 and not y.is_floating_point() and predicted.shape[1] < num_classes:
            raise ConfigError(
                f"model.name: the model returns {predicted.shape[1]} logits per record, but the data set has "
                f"num_classes = {num_classes} labels; allowed: a model with at least {num_classes} outputs"
            )
    finally:
        model.train(training)


@dataclass(frozen=True)
class SecurePlan:
    """Secure aggregation for a run (``secure.aggregation = true``): the
    protocol's settings, and whether clients are weighted by their record
    counts (the strategy's :attr:`~fedtrain.strategy.Strategy.weighted`;
    distributed DP always counts each once)."""

    settings: SecureSettings
    weighted: bool


def build_strategy(config: Config, deployed: bool = False) -> tuple[Strategy, SecurePlan | None]:
    """The configured strategy and, under secure aggregation, the plan, after
    the whole run was validated (:func:`validate_run`)."""
    strategy = load_strategy(config.strategy.name, config.strategy.options)
    return strategy, validate_run(config, strategy, deployed)


def validate_run(config: Config, strategy: Strategy, deployed: bool = False) -> SecurePlan | None:
    """Check the whole run once, before round 1, in a simulation and a
    deployment alike, and return its secure-aggregation plan (None without).

    Refuses a strategy that needs each update where the run reveals only a
    sum or a noisy mean (:func:`fedtrain.privacy.setting.check_strategy`),
    a user-level or distributed ``privacy.target_epsilon`` that no noise
    reaches, (``deployed``) ``secure.simulated_dropout``, a simulation-only
    knob, and a ring that could overflow or, under distributed DP, rounds
    too coarsely for the noise actually used, calibrated
    (:func:`fedtrain.secure.setting.check_secure`). Sample-level noise is
    calibrated per client from its record count, when the policy is built."""
    from fedtrain.privacy.setting import check_strategy, user_level_noise

    check_strategy(config, strategy)
    if deployed and config.clients.is_set:
        raise ConfigError(
            f"clients.speed = {config.clients.speed.value!r}: the [clients] speed model is a simulation's "
            "virtual clock, a deployment's clients take the time they take; allowed in a deployment: the "
            "[clients] defaults"
        )
    if config.privacy.mode in (PrivacyMode.USER, PrivacyMode.DISTRIBUTED):
        user_level_noise(config)
    if not config.secure.aggregation:
        return None
    from fedtrain.secure.setting import SecureSettings

    if deployed and config.secure.simulated_dropout:
        raise ConfigError(
            f"secure.simulated_dropout = {config.secure.simulated_dropout}: only a simulation drops clients "
            "on purpose; allowed in a deployment: 0"
        )
    return SecurePlan(SecureSettings.of(config), strategy.weighted)


def in_process_executor(
    config: Config, trainer: LocalTrainer, data: ClientData, secure: SecurePlan | None,
    compression: CompressionPlan | None = None,
) -> Executor:
    """The simulation's executor: sequential or batched training, with the
    configured Byzantine attack, uplink compression (after the attack: an
    attacker's update goes through the same client software) and secure
    aggregation wrapped around it."""
    executor: Executor
    if config.client.engine is ClientEngine.SEQUENTIAL:
        executor = SequentialExecutor(trainer, data, config.run.seed, config.client.timeout)
    else:
        executor = BatchedExecutor(
            trainer,
            data,
            config.run.seed,
            max_batch_clients=config.client.max_batch_clients or None,
            strict=config.client.engine is ClientEngine.BATCHED,
            timeout=config.client.timeout,
        )
    if config.attack.kind is not AttackKind.NONE:
        attackers = choose_attackers(data.ids, config.attack.fraction, config.run.seed)
        executor = AttackingExecutor(executor, attackers, config.attack.kind, config.attack.scale, config.run.seed)
    if compression is not None and compression.uplink is not None:
        executor = CompressingExecutor(executor, compression.uplink, dense=secure is not None)
    if secure is not None:
        from fedtrain.transport.in_process import InProcessSecureAggregation

        executor = InProcessSecureAggregation(
            executor, secure.settings, config.run.seed, weighted=secure.weighted,
            secure_noise=config.privacy.secure_noise,
        )
    return executor


def build_engine(
    config: Config,
    strategy: Strategy,
    executor: Executor,
    trainable: Trainable,
    test_set: tuple[torch.Tensor, torch.Tensor],
    sizes: Mapping[str, int],
    clients_per_round: int | None = None,
    compression: CompressionPlan | None = None,
    population: int | None = None,
    dispatcher: Dispatcher | None = None,
) -> Engine | BufferedEngine:
    """The round loop over ``executor`` for the clients of ``sizes`` (id →
    record count, in sampling order), with the configured sampler (of
    ``clients_per_round``, by default ``strategy.clients_per_round``) and
    privacy policy; the model is evaluated on ``test_set``. ``population``
    (default: every client of ``sizes``) is the client count of the config
    that the Poisson rate ``clients_per_round / population`` and the expected
    cohort come from: an audit's canary clients (:mod:`fedtrain.audit`) join
    the draw at the rate the accountant composes, and the public denominator
    of user-level DP stays that of the run without them.

    Under ``run.mode = "async"`` the loop is FedBuff's
    (:class:`~fedtrain.buffered.BufferedEngine`) over the executor on a
    virtual clock, the privacy policy sized for ``async.buffer_size``
    updates per release; with a speed model (``[clients]``) the synchronous
    loop keeps the same clock (:mod:`fedtrain.clock`). A deployment hands
    in its ``dispatcher`` (:class:`~fedtrain.transport.flower_dispatcher.FlowerDispatcher`),
    which carries the jobs over Flower on the real clock."""
    clients = list(sizes)
    per_round = config.strategy.clients_per_round if clients_per_round is None else clients_per_round
    counted = len(clients) if population is None else population
    sampler = make_sampler(config.strategy.sampling, per_round, counted)
    fewest_contributors = None
    if config.privacy.mode is PrivacyMode.DISTRIBUTED:
        from fedtrain.secure.setting import SecureSettings

        fewest_contributors = SecureSettings.of(config).fewest_contributors
    asynchronous = config.run.mode is RunMode.ASYNC
    expected = float(config.asynchrony.buffer_size) if asynchronous else sampler.expected_size(counted)
    privacy = build_policy(config, strategy, sizes, expected, trainable.grad_sample_mode, fewest_contributors)
    trainer = trainable.trainer
    x_test, y_test = test_set
    clock = None
    if config.clock_set and dispatcher is None:
        clock = VirtualClock(ClientDurations.of(
            config.clients, sizes, config.client.epochs, config.client.batch_size, config.run.seed
        ))
    rngs = RngStreams.from_seed(config.run.seed, secret_cohort=secret_sampling(config.privacy))

    def evaluate(params: torch.Tensor) -> Evaluation:
        return trainer.evaluate(params, x_test, y_test)

    if asynchronous:
        if dispatcher is None:
            if clock is None:
                raise ValueError("run.mode = 'async' in a simulation needs the virtual clock (config.clock_set)")
            dispatcher = VirtualClockDispatcher(executor, clock)
        return BufferedEngine(
            strategy=strategy,
            dispatcher=dispatcher,
            evaluate=evaluate,
            clients=clients,
            client=config.client,
            min_clients=config.strategy.min_clients,
            rngs=rngs,
            settings=config.asynchrony,
            clock=clock,
            privacy=privacy,
        )
    return Engine(
        strategy=strategy,
        executor=executor,
        sampler=sampler,
        evaluate=evaluate,
        clients=clients,
        client=config.client,
        min_clients=config.strategy.min_clients,
        rngs=rngs,
        privacy=privacy,
        compression=compression,
        clock=clock,
    )


def _journal_release(journal: checkpoint.LedgerJournal) -> Callable[[int, Release], None]:
    """The engine's journal hook: a round's privacy events, durably, before it is published."""

    def record(rnd: int, release: Release) -> None:
        if release.events:
            journal.append_(rnd, {ledger: [e.to_json() for e in events] for ledger, events in release.events.items()})

    return record


def run_engine(
    config: Config,
    engine: Engine | BufferedEngine,
    trainable: Trainable,
    params: torch.Tensor,
    out_dir: str | Path | None,
    progress: bool,
    resume: bool,
    started: float,
    trust_checkpoint: bool = False,
    plot: Plot = plot_curves,
    names: MetricNames = CLASSIFICATION_METRICS,
) -> RunResult:
    """Run ``engine`` from ``params`` (or from the last checkpoint in
    ``out_dir`` with ``resume``) and write the run folder: the part of a run
    that a simulation and a deployed coordinator share.

    The run folder's ledger journal records every round's privacy events
    before the round is published; a resume composes again each release that
    its checkpoint's ledger does not hold (a round re-run because its
    checkpoint was lost then costs twice: both of its releases were seen)."""
    earlier: list[RoundRecord] = []
    journal: checkpoint.LedgerJournal | None = None
    if resume:
        if out_dir is None:
            raise ConfigError("resume needs the run folder (out_dir) to resume from")
        saved = checkpoint.latest(out_dir, trust_checkpoint)
        changed = [d for d in checkpoint.config_differences(_with_defaults(saved.config), to_dict(config))
                   if not d.startswith("run.rounds:")]
        if changed:
            raise ConfigError(
                f"cannot resume {out_dir}: its checkpoint was written with another config ({'; '.join(changed)})"
            )
        engine.load_state_dict(saved.engine)
        journal, unaccounted = checkpoint.LedgerJournal.resume_(out_dir, saved, trust_checkpoint)
        for entry in unaccounted:
            try:
                engine.privacy.compose_release_({
                    ledger: tuple(GaussianEvent.from_json(e) for e in events) for ledger, events in entry.events.items()
                })
            except ValueError as exc:
                where = f"{journal.path} entry {entry.seq} (round {entry.round})"
                raise checkpoint.CheckpointError(f"{where}: {exc}") from None
            log.warning("round %d was released before its checkpoint was lost; its privacy cost is counted again",
                        entry.round)
        params = saved.params.to(params.device)
        earlier = [RoundRecord.from_json(r, names.names) for r in saved.records]
        log.info("resuming %s after round %d", out_dir, saved.round)
    observers: list[RoundObserver] = []
    writer = None
    if out_dir is not None:
        if journal is None:
            journal = checkpoint.LedgerJournal.create_(out_dir)
        engine.journal = _journal_release(journal)
        observers.append(checkpoint.Checkpointer(
            out_dir, engine.state_dict, to_dict(config), config.run.keep_checkpoints,
            [r.as_json() for r in earlier], journal=journal, every=config.run.checkpoint_every,
        ))
        writer = RunWriter(out_dir, config, earlier, plot, names)
        observers.append(writer)
    remaining = config.run.rounds - len(earlier)
    rounds_started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if progress:
            from fedtrain.progress import RoundProgress

            observers.append(stack.enter_context(RoundProgress(config.run.rounds, len(earlier), names=names)))
        params, new_records, stopped = engine.run(params, remaining, observers, first_round=len(earlier) + 1)
    rounds_ended = time.perf_counter()
    records = earlier + new_records
    final = engine.evaluate(params) if not records else records[-1]
    report = engine.privacy.report()
    num_parameters, num_trainable = parameter_counts(trainable.trainer.model)
    summary = Summary(
        final_accuracy=final.accuracy,
        final_loss=final.loss,
        best_accuracy=_best(records, "accuracy", final.accuracy),
        final_metrics=dict(final.metrics),
        score=names.score,
        best_score=_best(records, names.score, final.metrics.get(names.score)),
        rounds=len(records),
        wall_seconds=time.perf_counter() - started,
        started_at=time.time() - (time.perf_counter() - started),
        setup_seconds=rounds_started - started,
        rounds_seconds=rounds_ended - rounds_started,
        seed=config.run.seed,
        strategy=config.strategy.name,
        dataset=config.data.dataset,
        num_clients=config.data.num_clients,
        clients_per_round=config.strategy.clients_per_round,
        num_parameters=num_parameters,
        num_trainable_parameters=num_trainable,
        privacy_mode=config.privacy.mode.value,
        epsilon=report.epsilon,
        delta=report.delta,
        noise_multiplier=report.extra.get("noise_multiplier"),
        stopped_early=stopped,
    ).with_traffic(records)
    if writer is not None:
        writer.finish(summary, trainable.final_state(params))
        save_adapter(trainable.trainer.model, writer.dir)
    return RunResult(params, trainable.layout, tuple(records), summary, writer.dir if writer else None)


def _with_defaults(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """A checkpoint's config with every key it predates at its default, so
    that a key added to fedtrain later (at its default) is no difference; a
    config that no longer loads is compared as it was saved."""
    try:
        return to_dict(from_dict(saved))
    except ConfigError:
        return saved


def _best(records: Sequence[RoundRecord], metric: str, otherwise: float | None) -> float | None:
    """The highest ``metric`` over ``records`` (rounds without it skipped), or ``otherwise``."""
    values = [r.metrics[metric] for r in records if r.metrics.get(metric) is not None]
    return max(values) if values else otherwise
