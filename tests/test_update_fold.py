"""The fold: updates summed as they arrive in one bounded buffer, bit for bit
the unfolded reduction when the cohort fits one buffer; one-pass validation."""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch

from fedtrain import load_strategy
from fedtrain.aggregation import (
    FOLD_BUDGET_BYTES,
    Reduction,
    UpdateFold,
    fold_capacity,
    stack,
    strategy_reduction,
    weighted_mean,
)
from fedtrain.config import AccountantKind, ClientConfig
from fedtrain.engine import Engine, RngStreams
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.noise import SeededGaussian
from fedtrain.privacy.user_level import AdaptiveClipping, UserLevelDP
from fedtrain.sampling import UniformSampler
from fedtrain.training.executor import UpdateSink, takes_sink
from fedtrain.training.train_task import TrainTask
from fedtrain.types import (
    AggregateOrigin,
    AggregateUpdate,
    ClientFailure,
    ClientMetric,
    ClientUpdate,
    Evaluation,
    RoundOutcome,
    UpdateKind,
)
from fedtrain.validation import finite_norm, inspect_update

CPU = torch.device("cpu")


def _updates(n: int, numel: int, seed: int = 0, kind: UpdateKind = UpdateKind.DELTA) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn((n, numel), generator=g)
    sizes = torch.randint(1, 500, (n,), generator=g).tolist()
    return [
        ClientUpdate(f"c{i}", rows[i], int(sizes[i]), kind, {ClientMetric.TRAIN_LOSS.value: float(i) / 7})
        for i in range(n)
    ]


def _fold(reduction: Reduction, updates: Sequence[ClientUpdate], order: Sequence[int] | None = None,
          budget: int = FOLD_BUDGET_BYTES, borrow: bool = False) -> UpdateFold:
    numel = updates[0].vector.numel()
    fold = UpdateFold(reduction, numel, [u.client_id for u in updates], updates[0].kind, CPU, budget)
    for i in order if order is not None else range(len(updates)):
        if borrow:
            fold.add_(updates[i], borrow=True)
        else:
            row = fold.row()
            row.copy_(updates[i].vector)
            fold.add_(ClientUpdate(updates[i].client_id, row, updates[i].num_examples, updates[i].kind,
                                   updates[i].metrics))
    return fold


@pytest.mark.parametrize("reduction", [Reduction.WEIGHTED_MEAN, Reduction.MEAN])
def test_one_buffer_is_bit_identical_to_one_w_at_x_whatever_the_arrival_order(reduction: Reduction) -> None:
    updates = _updates(7, 1001)
    expected = weighted_mean(updates, reduction is Reduction.WEIGHTED_MEAN)
    for order in (range(7), [3, 0, 6, 1, 5, 2, 4]):
        fold = _fold(reduction, updates, list(order))
        assert fold.capacity == 7
        got = fold.result()
        assert fold.buffers_reduced == 0
        assert torch.equal(got, expected)
        assert [c.client_id for c in fold.clients] == [u.client_id for u in updates]


def test_one_buffer_sum_is_the_stacked_row_sum() -> None:
    updates = _updates(5, 333, seed=1)
    fold = _fold(Reduction.SUM, updates, [4, 2, 0, 1, 3])
    assert torch.equal(fold.result(), stack(updates).sum(dim=0))


def test_borrowed_updates_are_not_copied_and_reduce_as_before() -> None:
    """Updates an executor returned (separate tensors, the Flower transport's
    and tests' executors): the fold holds them by reference and gives the
    accumulation that :func:`weighted_mean` gives them."""
    updates = [ClientUpdate(u.client_id, u.vector.clone(), u.num_examples) for u in _updates(4, 257, seed=2)]
    fold = _fold(Reduction.WEIGHTED_MEAN, updates, borrow=True)
    assert fold._buffer is None
    assert torch.equal(fold.result(), weighted_mean(updates))


@pytest.mark.parametrize("reduction", list(Reduction))
def test_several_buffers_equal_one_w_at_x_up_to_rounding(reduction: Reduction) -> None:
    updates = _updates(23, 4096, seed=3)
    budget = 5 * 4 * 4096
    fold = _fold(reduction, updates, list(reversed(range(23))), budget=budget)
    assert fold.capacity == 5
    assert fold._buffer is not None and fold._buffer.shape == (5, 4096)
    got = fold.result()
    assert fold.buffers_reduced == 5
    if reduction is Reduction.SUM:
        expected = stack(updates).sum(dim=0)
    else:
        expected = weighted_mean(updates, reduction is Reduction.WEIGHTED_MEAN)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * scale)


def test_capacity_is_bounded_by_the_budget_and_the_cohort() -> None:
    assert fold_capacity(20, 34_000_000) == 1
    assert fold_capacity(20, 8_000_000) == FOLD_BUDGET_BYTES // (4 * 8_000_000) < 20
    assert fold_capacity(20, 8_000_000, budget=1) == 1
    assert fold_capacity(20, 1_000, budget=4 * 1_000 * 7) == 7
    assert fold_capacity(3, 10) == 3
    with pytest.raises(ValueError, match="cohort"):
        fold_capacity(0, 10)


def test_only_strategies_that_average_are_folded() -> None:
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedsgd"):
        strategy = load_strategy(name)
        assert strategy_reduction(strategy.needs_individual_updates, strategy.weighted) is Reduction.WEIGHTED_MEAN
    assert strategy_reduction(False, False) is Reduction.MEAN
    for name in ("fedmedian", "trimmed_mean", "krum", "multi_krum"):
        strategy = load_strategy(name)
        assert strategy_reduction(strategy.needs_individual_updates, strategy.weighted) is None


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedsgd"])
def test_a_strategy_given_the_fold_aggregate_computes_what_it_computes_from_the_updates(name: str) -> None:
    kind = UpdateKind.GRADIENT if name == "fedsgd" else UpdateKind.DELTA
    numel = 513
    params = torch.randn(numel, generator=torch.Generator().manual_seed(9))
    a, b = load_strategy(name), load_strategy(name)
    for rnd in (1, 2, 3):
        updates = _updates(6, numel, seed=10 + rnd, kind=kind)
        rows = stack(updates).clone()
        updates = [ClientUpdate(u.client_id, rows[i], u.num_examples, kind, u.metrics) for i, u in enumerate(updates)]
        aggregate = _fold(Reduction.WEIGHTED_MEAN, updates).aggregate()
        assert isinstance(aggregate, AggregateUpdate) and aggregate.origin is AggregateOrigin.CLIENT_MEAN
        assert aggregate.client_id == "client-mean"
        assert aggregate.contributors == 6 and aggregate.num_examples == sum(u.num_examples for u in updates)
        assert inspect_update(aggregate, numel, kind).reason is None
        from_updates = a.aggregate(rnd, params, updates)
        from_fold = b.aggregate(rnd, params, [aggregate])
        assert torch.equal(from_updates, from_fold)
        params = from_updates


def test_norm_and_finiteness_in_one_pass_with_a_float64_fallback_on_overflow() -> None:
    v = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    assert finite_norm(v) == float(v.norm())
    huge = torch.full((16,), 3e37)
    assert float(torch.linalg.vector_norm(huge)) == math.inf
    assert finite_norm(huge) == pytest.approx(3e37 * 4, rel=1e-6)
    assert inspect_update(ClientUpdate("a", huge, 1), 16, UpdateKind.DELTA).reason is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = v.clone()
        w[17] = bad
        assert inspect_update(ClientUpdate("a", w, 1), v.numel(), UpdateKind.DELTA).reason == (
            "vector has NaN or infinite values"
        )
        assert not math.isfinite(finite_norm(w))


# ---------------------------------------------------------------- the engine


class ScriptedStream:
    """Pushes each client's fixed vector (or reports its failure); with
    ``stream`` false, the same executor returns the updates instead."""

    def __init__(self, vectors: dict[str, torch.Tensor | str], metrics: dict[str, dict[str, float]] | None = None,
                 stream: bool = True) -> None:
        self.vectors = vectors
        self.metrics = metrics or {}
        self.stream = stream
        self.pushed = 0

    def train_round(self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor,
                    sink: UpdateSink | None = None) -> RoundOutcome:
        if not self.stream:
            sink = None
        updates, failures = [], []
        for cid in clients:
            v = self.vectors[cid]
            if isinstance(v, str):
                failures.append(ClientFailure(cid, v))
                continue
            update = ClientUpdate(cid, v, 3, task.kind, self.metrics.get(cid, {}))
            if sink is None:
                updates.append(update)
            else:
                row = sink.row()
                if v.shape == row.shape and v.dtype == row.dtype:
                    row.copy_(v)
                    update = ClientUpdate(cid, row, 3, task.kind, update.metrics)
                sink.push(update)
                self.pushed += 1
        return RoundOutcome(tuple(updates), tuple(failures))


class ScriptedBackend(ScriptedStream):
    """The four-argument executor of earlier releases: never given a sink."""

    def train_round(self, rnd: int, clients: Sequence[str], task: TrainTask,  # type: ignore[override]
                    params: torch.Tensor) -> RoundOutcome:
        return super().train_round(rnd, clients, task, params)


def _user_dp(adaptive: bool) -> UserLevelDP:
    return UserLevelDP(
        accountant=Accountant(AccountantKind.RDP), noise_multiplier=1.0, clip=1.0, sample_rate=0.5,
        amplified=True, expected_cohort=4.0, delta=1e-5, max_epsilon=0.0, noise=SeededGaussian(0),
        adaptive=AdaptiveClipping(0.5, 0.2, 2.0) if adaptive else None,
    )


def _engine(executor: object, strategy: str, privacy: UserLevelDP | None = None) -> Engine:
    clients = tuple(executor.vectors)  # type: ignore[attr-defined]
    extra = {} if privacy is None else {"privacy": privacy}
    return Engine(
        strategy=load_strategy(strategy), executor=executor,  # type: ignore[arg-type]
        sampler=UniformSampler(len(clients)),
        evaluate=lambda p: Evaluation({"loss": float(p.sum())}, num_examples=1),
        clients=clients, client=ClientConfig(), min_clients=1, rngs=RngStreams.from_seed(0), **extra,
    )


def _vectors() -> dict[str, torch.Tensor | str]:
    g = torch.Generator().manual_seed(5)
    return {
        "good": torch.randn(6, generator=g) * 0.1,
        "nan": torch.tensor([1.0, float("nan"), 0, 0, 0, 0]),
        "other": torch.randn(6, generator=g) * 0.1,
        "short": torch.ones(2),
        "big": torch.full((6,), 5.0),
        "double": torch.ones(6, dtype=torch.float64),
        "crashed": "RuntimeError: boom",
        "third": torch.randn(6, generator=g) * 0.1,
    }


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedmedian"])
def test_streamed_rounds_equal_returned_rounds(strategy: str) -> None:
    """Same updates pushed into the sink or returned: the same model, record
    and rejection reasons; a streaming executor hands no updates back."""
    metrics = {c: {ClientMetric.TRAIN_LOSS.value: 0.25 * i} for i, c in enumerate(_vectors())}
    streamed, returned = ScriptedStream(_vectors(), metrics), ScriptedBackend(_vectors(), metrics)
    assert takes_sink(streamed) and not takes_sink(returned)
    a, b = _engine(streamed, strategy), _engine(returned, strategy)
    pa = pb = torch.zeros(6)
    for rnd in (1, 2):
        pa, ra = a.run_round(rnd, pa)
        pb, rb = b.run_round(rnd, pb)
        assert torch.equal(pa, pb)
        assert (ra.num_clients, ra.num_failed, ra.train_loss, dict(ra.failures)) == (
            rb.num_clients, rb.num_failed, rb.train_loss, dict(rb.failures))
    assert ra.num_clients == 4 and ra.failures["nan"] == "vector has NaN or infinite values"
    assert ra.failures["short"] == "shape (2,), expected (6,)"
    assert streamed.pushed == (0 if strategy == "fedmedian" else 14)


@pytest.mark.parametrize("adaptive", [False, True])
def test_user_level_dp_admits_as_it_folds_with_the_reasons_of_the_unfolded_release(adaptive: bool) -> None:
    metrics = {c: {ClientMetric.UNCLIPPED.value: 1.0} for c in ("good", "other", "big")}
    streamed = ScriptedStream(_vectors(), metrics)
    returned = ScriptedBackend(_vectors(), metrics)
    a, b = _engine(streamed, "fedavg", _user_dp(adaptive)), _engine(returned, "fedavg", _user_dp(adaptive))
    pa, ra = a.run_round(1, torch.zeros(6))
    pb, rb = b.run_round(1, torch.zeros(6))
    assert torch.equal(pa, pb)
    assert dict(ra.failures) == dict(rb.failures)
    assert ra.failures["big"].startswith("update norm 12.2474 exceeds privacy.clip = 1")
    if adaptive:
        assert ra.failures["third"] == "metric 'unclipped' missing or not 0/1 under adaptive clipping"
        assert ra.privacy["clip"] == rb.privacy["clip"] != 1.0
    assert (ra.num_clients, ra.epsilon) == (rb.num_clients, rb.epsilon)
