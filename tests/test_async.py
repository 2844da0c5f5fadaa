"""Buffered asynchronous aggregation (FedBuff, fedtrain/buffered.py): the
dispatch invariants, staleness weights and drops, its exact equivalence with
synchronous FedAvg where one exists, privacy accounting, budget stop, resume
and the config's refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtrain import config
from fedtrain.buffered import BufferedEngine, staleness_weight
from fedtrain.training.dispatcher import Job, VirtualClockDispatcher
from fedtrain.config import AsyncConfig, ConfigError, Staleness
from fedtrain.results import read_metrics
from fedtrain.run import build_engine, build_strategy, build_trainable, client_data, in_process_executor, validate_run
from fedtrain.simulation import simulate
from fedtrain.training.train_task import TrainTask
from fedtrain.types import ClientUpdate, RoundPlan

pytestmark = pytest.mark.usefixtures("one_thread")

NO_PLOT: Any = lambda *a, **k: None  # noqa: E731
EQUAL = ["data.num_clients=20", "data.partition=iid", "clients.step_seconds=2.0"]
"""Twenty clients of 71–72 records: every job lasts 3 steps (client.batch_size 32)."""
ASYNC = ["run.mode=async", "async.concurrency=8", "async.buffer_size=4", "data.num_clients=20"]
STRAGGLERS = ["clients.speed=stragglers", "clients.stragglers_fraction=0.3"]


def _run(overrides: list[str], out: Path | None = None, resume: bool = False) -> Any:
    return simulate(config.load(None, overrides), out_dir=out, plot=NO_PLOT, resume=resume)


def _rows(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]


# ------------------------------------------------------------------ weights


def test_staleness_weights_are_fedbuffs_and_xie_et_als() -> None:
    poly = AsyncConfig()
    hinge = AsyncConfig(staleness=Staleness.HINGE, staleness_exponent=2.0, hinge_after=3)

    assert [staleness_weight(s, poly) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert staleness_weight(7, AsyncConfig(staleness=Staleness.CONSTANT)) == 1.0
    assert [staleness_weight(s, hinge) for s in (0, 3, 4, 6)] == [1.0, 1.0, 1 / 3, 1 / 7]
    with pytest.raises(ValueError, match="staleness = -1"):
        staleness_weight(-1, poly)


# ------------------------------------------------------------------ equivalence with sync


@pytest.mark.parametrize("extra", [[], ["strategy.name=fedadam"], ["client.engine=sequential"]],
                         ids=["fedavg", "fedadam", "sequential"])
def test_buffer_of_the_whole_concurrency_at_equal_speeds_is_the_synchronous_round(extra: list[str]) -> None:
    sync_config = ["run.rounds=4", "strategy.clients_per_round=5", *EQUAL, *extra]
    sync = _run(sync_config)
    buffered = _run([*sync_config, "run.mode=async", "async.concurrency=5", "async.buffer_size=5"])

    assert torch.equal(sync.params, buffered.params)
    assert [r.metrics for r in sync.records] == [r.metrics for r in buffered.records]
    times = [6.0, 12.0, 18.0, 24.0]
    assert [r.virtual_time for r in sync.records] == [r.virtual_time for r in buffered.records] == times
    assert all(set(r.staleness.values()) == {0} and len(r.staleness) == 5 for r in buffered.records)


def test_a_sync_run_waits_for_its_slowest_client_and_without_a_speed_model_writes_no_clock(tmp_path: Path) -> None:
    plain = _run(["run.rounds=2", "data.num_clients=20"], tmp_path / "plain")
    slow = _run(["run.rounds=2", "data.num_clients=20", "clients.speed=stragglers",
                 "clients.stragglers_fraction=1.0", "clients.stragglers_slowdown=3.0", "data.partition=iid"])

    assert all("virtual_time" not in row for row in read_metrics(tmp_path / "plain"))
    assert plain.records[0].virtual_time is None
    assert [r.virtual_time for r in slow.records] == [9.0, 18.0]


# ------------------------------------------------------------------ dispatch invariants


def _engine(overrides: list[str]) -> tuple[BufferedEngine, torch.Tensor]:
    cfg = config.load(None, overrides)
    device = torch.device("cpu")
    data = client_data(cfg, device)
    strategy, secure = build_strategy(cfg)
    test_set = (data.x_test, data.y_test)
    trainable = build_trainable(cfg, data.input_shape, data.num_classes, test_set, device)
    executor = in_process_executor(cfg, trainable.trainer, data.data, secure)
    sizes = {cid: data.data.size(cid) for cid in data.data.ids}
    engine = build_engine(cfg, strategy, executor, trainable, test_set, sizes)
    assert isinstance(engine, BufferedEngine)
    return engine, trainable.initial_params()


def test_a_client_never_has_two_jobs_and_contributes_at_most_once_per_buffer() -> None:
    engine, params = _engine([*ASYNC, *STRAGGLERS, "run.rounds=12"])
    dispatcher = engine.dispatcher
    submit, collect = dispatcher.submit, dispatcher.collect
    buffers: list[list[str]] = []
    late: list[str] = []
    busiest = 0

    def checked_submit(job: Job, task: Any, p: torch.Tensor) -> None:
        nonlocal busiest
        if job.client_id in {j.client_id for j in dispatcher.in_flight()}:
            late.append(job.client_id)
        submit(job, task, p)
        busiest = max(busiest, len(dispatcher.in_flight()))

    def recorded_collect(jobs: Any) -> Any:
        buffers.append([j.client_id for j in jobs])
        return collect(jobs)

    dispatcher.submit, dispatcher.collect = checked_submit, recorded_collect  # type: ignore[method-assign]

    _, records, stopped = engine.run(params, 12)

    assert stopped is None and late == []
    assert len(buffers) == 12 and all(len(b) == len(set(b)) == 4 for b in buffers)
    assert any(s > 0 for r in records for s in r.staleness.values())
    assert busiest == 8
    assert dispatcher.trainings < sum(len(b) for b in buffers)


def test_the_dispatcher_trains_lazily_one_call_per_model_version_and_forgets_used_models() -> None:
    engine, params = _engine([*ASYNC, "client.engine=sequential", "run.rounds=1"])
    dispatcher = engine.dispatcher
    assert isinstance(dispatcher, VirtualClockDispatcher)
    calls: list[tuple[int, list[str]]] = []
    train_round = dispatcher.executor.train_round

    def recorded(rnd: int, clients: Any, task: Any, p: torch.Tensor, sink: Any = None) -> Any:
        calls.append((rnd, list(clients)))
        return train_round(rnd, clients, task, p)

    dispatcher.executor.train_round = recorded  # type: ignore[method-assign]
    task = TrainTask.of(config.ClientConfig(), RoundPlan(("0",)), engine.privacy.client_privacy(1))
    jobs = [Job(0, "0", 0, 0.0), Job(1, "1", 0, 0.0), Job(2, "2", 3, 0.0)]
    for job in jobs:
        dispatcher.submit(job, task, params + job.version)
    finished = [dispatcher.next_finished() for _ in jobs]

    outcomes = dispatcher.collect([jobs[0]])

    assert calls == [(1, ["0", "1"]), (4, ["2"])]
    assert set(outcomes) == {0} and isinstance(outcomes[0], ClientUpdate)
    assert not dispatcher._models
    assert [f.time for f in finished if f is not None] == sorted(f.time for f in finished if f is not None)
    assert set(dispatcher.collect(jobs[1:])) == {1, 2} and calls[2:] == []


def test_stale_updates_are_weighted_as_configured_in_metrics_jsonl(tmp_path: Path) -> None:
    _run([*ASYNC, *STRAGGLERS, "run.rounds=10"], tmp_path / "run")

    rows = read_metrics(tmp_path / "run")

    stale = [(s, rows[i]["staleness_weights"][c]) for i, r in enumerate(rows) for c, s in r["staleness"].items()]
    assert any(s > 0 for s, _ in stale)
    assert all(w == (1 + s) ** -0.5 for s, w in stale)
    times = [r["virtual_time"] for r in rows]
    assert times == sorted(times) and times[0] > 0


def test_updates_older_than_max_staleness_are_dropped_with_the_reason() -> None:
    result = _run([*ASYNC, "clients.speed=lognormal", "clients.spread=1.5", "async.max_staleness=1", "run.rounds=12"])

    reasons = [why for r in result.records for why in r.failures.values()]
    assert any("exceeds async.max_staleness = 1" in why for why in reasons)
    assert all(s <= 1 for r in result.records for s in r.staleness.values())
    assert all(r.num_failed == len(r.failures) for r in result.records)


def test_batched_and_sequential_engines_give_the_same_async_run() -> None:
    common = [*ASYNC, *STRAGGLERS, "run.rounds=6"]
    batched = _run([*common, "client.engine=batched"])
    sequential = _run([*common, "client.engine=sequential"])

    assert torch.allclose(batched.params, sequential.params, atol=1e-5)
    assert [r.staleness for r in batched.records] == [r.staleness for r in sequential.records]
    assert [r.virtual_time for r in batched.records] == [r.virtual_time for r in sequential.records]


# ------------------------------------------------------------------ privacy


DP = ["privacy.mode=user", "privacy.noise_multiplier=1.5", "privacy.secure_noise=false", "privacy.clip=1.0"]


def _independent_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Opacus' RDP accountant on ``releases`` Gaussian releases of a replace-one
    sum: sensitivity 2C, so (z/2, q = 1) each."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier / 2.0, 1.0, releases)]
    return accountant.get_epsilon(delta)


def test_user_level_epsilon_matches_an_independent_recomputation_of_the_releases(tmp_path: Path) -> None:
    _run([*ASYNC, *STRAGGLERS, *DP, "run.rounds=6"], tmp_path / "run")

    rows = read_metrics(tmp_path / "run")
    journal = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]

    assert [r["epsilon"] for r in rows] == pytest.approx([_independent_epsilon(1.5, k, 1e-5) for k in range(1, 7)])
    assert [e["round"] for e in journal] == list(range(1, 7))
    assert all(e["events"]["coordinator"][0]["noise_multiplier"] == 0.75 and
               e["events"]["coordinator"][0]["sample_rate"] == 1.0 for e in journal)


def test_target_epsilon_is_calibrated_for_run_rounds_aggregations() -> None:
    result = _run([*ASYNC, *STRAGGLERS, "privacy.mode=user", "privacy.target_epsilon=20", "privacy.secure_noise=false",
                   "run.rounds=5"])

    assert result.records[-1].epsilon == pytest.approx(20.0, rel=0.02)
    assert result.records[-1].epsilon <= 20.0 + 1e-9


def test_the_budget_stops_before_an_aggregation_would_exceed_it() -> None:
    limit = (_independent_epsilon(1.5, 3, 1e-5) + _independent_epsilon(1.5, 4, 1e-5)) / 2
    result = _run([*ASYNC, *STRAGGLERS, *DP, f"privacy.max_epsilon={limit}", "run.rounds=10"])

    assert len(result.records) == 3
    assert result.summary.stopped_early is not None and "privacy.max_epsilon" in result.summary.stopped_early
    assert result.records[-1].epsilon <= limit


def test_sample_level_dp_composes_each_clients_jobs() -> None:
    result = _run([*ASYNC, *STRAGGLERS, "privacy.mode=sample", "privacy.noise_multiplier=1.0",
                   "privacy.secure_noise=false", "privacy.min_records=1", "run.rounds=4"])

    assert [r.epsilon is not None and r.epsilon > 0 for r in result.records] == [True] * 4
    assert result.records[-1].epsilon >= result.records[0].epsilon


# ------------------------------------------------------------------ resume


def test_a_resumed_async_run_continues_and_never_undercounts_the_ledger(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _run([*ASYNC, *STRAGGLERS, *DP, "run.rounds=4"], run)
    before = _rows(run)

    resumed = simulate(config.load(run / "config.toml", ["run.rounds=8"]), out_dir=run, resume=True, plot=NO_PLOT)

    rows = _rows(run)
    assert [r["round"] for r in rows] == list(range(1, 9))
    assert rows[:4] == before
    times = [r["virtual_time"] for r in rows]
    assert times == sorted(times) and times[4] > times[3]
    assert [r["epsilon"] for r in rows] == pytest.approx([_independent_epsilon(1.5, k, 1e-5) for k in range(1, 9)])
    assert len((run / "ledger.jsonl").read_text().splitlines()) == 8
    assert len(resumed.records) == 8 and first.records[-1].round == 4
    assert all(len(r["staleness"]) == 4 for r in rows)


def test_a_resumed_sync_run_keeps_its_virtual_clock(tmp_path: Path) -> None:
    common = ["run.rounds=4", "strategy.clients_per_round=4", *STRAGGLERS]
    _run(common, tmp_path / "full")
    _run([*common, "run.rounds=2"], tmp_path / "split")

    simulate(config.load(tmp_path / "split" / "config.toml", ["run.rounds=4"]), out_dir=tmp_path / "split",
             resume=True, plot=NO_PLOT)

    assert _rows(tmp_path / "split") == _rows(tmp_path / "full")
    assert all(r["virtual_time"] > 0 for r in _rows(tmp_path / "full"))


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["async.buffer_size=3"], "async.buffer_size = 3: has no effect with run.mode = 'sync'"),
        ([*ASYNC, "async.concurrency=30"],
         "async.concurrency = 30 with run.mode = 'async': must be <= data.num_clients = 20"),
        ([*ASYNC, "strategy.sampling=poisson"], "strategy.sampling = 'poisson' with run.mode = 'async'"),
        ([*ASYNC, "secure.aggregation=true"], "secure.aggregation = true with run.mode = 'async'"),
        ([*ASYNC, "compression.up=int8"], "compression.up = 'int8' with run.mode = 'async'"),
        ([*ASYNC, "strategy.min_clients=5"],
         "strategy.min_clients = 5 with run.mode = 'async': must be <= async.buffer_size = 4"),
        ([*ASYNC, "async.hinge_after=2"], "async.hinge_after = 2: has no effect unless async.staleness = 'hinge'"),
        (["clients.spread=1.0"], "clients.spread = 1.0: has no effect with clients.speed = 'constant'"),
        (["run.mode=later"], "run.mode = 'later': allowed values are one of 'sync', 'async'"),
        (["async.staleness=linear", "run.mode=async"], "async.staleness = 'linear': allowed values are"),
    ],
)
def test_config_refusals_name_the_key_the_value_and_what_is_allowed(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=_literal(message)):
        config.load(None, overrides)


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_a_deployment_takes_async_and_refuses_a_speed_model() -> None:
    strategy, _ = build_strategy(config.load(None, ASYNC))
    assert validate_run(config.load(None, ASYNC), strategy, deployed=True) is None
    with pytest.raises(ConfigError, match=r"clients.speed = 'stragglers'.*allowed in a deployment"):
        validate_run(config.load(None, STRAGGLERS), strategy, deployed=True)
    assert validate_run(config.load(None, ASYNC), strategy) is None


def test_the_async_table_is_written_under_its_toml_name() -> None:
    table = config.to_dict(config.load(None, ASYNC))

    assert table["async"]["buffer_size"] == 4 and "asynchrony" not in table
    assert config.from_dict(table).asynchrony.buffer_size == 4
    assert math.isclose(table["clients"]["step_seconds"], 1.0)
