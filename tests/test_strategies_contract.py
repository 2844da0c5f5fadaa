"""Contract tests shared by every built-in strategy, then unit tests per strategy.

Every name in ``fedtrain.strategy.BUILTIN_STRATEGIES`` is loaded with
``fedtrain.load_strategy(name, {})`` and must honour the :class:`fedtrain.Strategy`
contract: output shape and dtype, no in-place writes, a plan over a subset of
the cohort, determinism, and a checkpoint round trip that continues bit for bit.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import textwrap

import numpy as np
import pytest
import torch

from fedtrain import ClientUpdate, RoundPlan, Strategy, UpdateKind, load_strategy, stack
from fedtrain.strategy import BUILTIN_STRATEGIES
from strategies.fedyogi import Yogi

P = 7  # parameter count of the toy model
NAMES = sorted(BUILTIN_STRATEGIES)

# What one aggregation of n identical updates ``u`` must do, per built-in:
# "delta": params + u (server_lr 1, no momentum yet on the first step);
# "gradient": params - server_lr * u; "adaptive": a server optimiser whose
# first step moves every coordinate in the direction of u.
FIRST_STEP = {
    "fedavg": "delta",
    "fedprox": "delta",
    "fedavgm": "delta",
    "fedmedian": "delta",
    "trimmed_mean": "delta",
    "krum": "delta",
    "multi_krum": "delta",
    "fedadam": "adaptive",
    "fedadagrad": "adaptive",
    "fedyogi": "adaptive",
    "fedsgd": "gradient",
}
STATEFUL = sorted(n for n, k in FIRST_STEP.items() if k == "adaptive") + ["fedavgm"]
ROBUST = {"fedmedian", "trimmed_mean", "krum", "multi_krum"}


def vec(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, generator=g, dtype=torch.float32) * scale


def kind_of(strategy: Strategy) -> UpdateKind:
    return strategy.configure(1, ["a", "b"], np.random.default_rng(0)).kind


def make_updates(kind: UpdateKind, n: int = 5, seed: int = 0) -> list[ClientUpdate]:
    return [
        ClientUpdate(f"c{i}", vec(seed * 100 + i), num_examples=i + 1, kind=kind)
        for i in range(n)
    ]


def buffer_updates(kind: UpdateKind, n: int = 5, seed: int = 0) -> tuple[torch.Tensor, list[ClientUpdate]]:
    """Updates that are consecutive rows of one buffer, so ``stack`` returns a view."""
    buf = torch.stack([vec(seed * 100 + i) for i in range(n)])
    return buf, [ClientUpdate(f"c{i}", buf[i], i + 1, kind) for i in range(n)]


def run_rounds(strategy: Strategy, params: torch.Tensor, rounds: range) -> torch.Tensor:
    kind = kind_of(strategy)
    for rnd in rounds:
        params = strategy.aggregate(rnd, params, make_updates(kind, seed=rnd))
    return params


# Loading errors are ``ValueError`` subclasses (``fedtrain.plugin.PluginError``);
# the tests match on ValueError and the message only.


def save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------
# Contract, over every built-in


def test_every_builtin_is_classified() -> None:
    assert set(FIRST_STEP) == set(BUILTIN_STRATEGIES)


@pytest.mark.parametrize("name", NAMES)
def test_loads_as_a_strategy(name: str) -> None:
    strategy = load_strategy(name, {})
    assert isinstance(strategy, Strategy)
    assert isinstance(strategy.needs_individual_updates, bool)
    assert strategy.needs_individual_updates == (name in ROBUST)


@pytest.mark.parametrize("name", NAMES)
def test_configure_returns_plan_over_subset(name: str) -> None:
    strategy = load_strategy(name, {})
    clients = ["a", "b", "c", "d"]
    plan = strategy.configure(3, clients, np.random.default_rng(1))
    assert isinstance(plan, RoundPlan)
    assert isinstance(plan.clients, tuple)
    assert set(plan.clients) <= set(clients)
    assert len(set(plan.clients)) == len(plan.clients)
    assert isinstance(plan.kind, UpdateKind)
    assert plan.proximal_mu >= 0


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_no_in_place_writes(name: str, n: int) -> None:
    strategy = load_strategy(name, {})
    params = vec(99)
    params_before = params.clone()
    buf, updates = buffer_updates(kind_of(strategy), n=n)
    buf_before = buf.clone()
    assert stack(updates).data_ptr() == buf.data_ptr()  # the zero-copy path
    result = strategy.aggregate(1, params, updates)
    assert result.shape == params.shape
    assert result.dtype == torch.float32
    assert bool(torch.isfinite(result).all())
    assert torch.equal(params, params_before)
    assert torch.equal(buf, buf_before)
    assert result.data_ptr() != params.data_ptr()
    # the result must not alias the strategy's internal state either: scribbling
    # on it must not change what the strategy does next
    twin = load_strategy(name, {})
    twin_result = twin.aggregate(1, params, updates)
    assert torch.equal(result, twin_result)
    result.add_(1e6)
    assert torch.equal(
        strategy.aggregate(2, twin_result, updates), twin.aggregate(2, twin_result, updates)
    )


@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("name", NAMES)
def test_identical_updates_give_one_step(name: str, n: int) -> None:
    strategy = load_strategy(name, {})
    kind = kind_of(strategy)
    params = vec(1)
    u = vec(2)
    updates = [ClientUpdate(f"c{i}", u.clone(), i + 1, kind) for i in range(n)]
    result = strategy.aggregate(1, params, updates)
    expected = FIRST_STEP[name]
    if expected == "delta":
        torch.testing.assert_close(result, params + u, rtol=1e-6, atol=1e-6)
    elif expected == "gradient":
        lr = strategy.server_lr  # type: ignore[attr-defined]
        torch.testing.assert_close(result, params - lr * u, rtol=1e-6, atol=1e-6)
    else:
        assert bool(torch.isfinite(result).all())
        assert torch.equal(torch.sign(result - params), torch.sign(u))
        again = load_strategy(name, {}).aggregate(1, params, updates)
        assert torch.equal(result, again)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name: str) -> None:
    a = run_rounds(load_strategy(name, {}), vec(5), range(1, 4))
    b = run_rounds(load_strategy(name, {}), vec(5), range(1, 4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_update_kind_is_rejected(name: str) -> None:
    strategy = load_strategy(name, {})
    wrong = UpdateKind.DELTA if kind_of(strategy) is UpdateKind.GRADIENT else UpdateKind.GRADIENT
    with pytest.raises(ValueError, match="c0"):
        strategy.aggregate(1, vec(0), make_updates(wrong, n=3))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_continues_bit_for_bit(name: str) -> None:
    original = load_strategy(name, {})
    params = run_rounds(original, vec(7), range(1, 4))
    state = save_load(original.state_dict())
    if name in STATEFUL:
        assert state  # three rounds in, the optimiser has moments to keep
    restored = load_strategy(name, {})
    restored.load_state_dict(state)
    cont = run_rounds(original, params.clone(), range(4, 6))
    resumed = run_rounds(restored, params.clone(), range(4, 6))
    assert torch.equal(cont, resumed)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_of_a_restored_strategy_before_its_first_round(name: str) -> None:
    """Restore, checkpoint again at once (no round in between), restore again."""
    original = load_strategy(name, {})
    params = run_rounds(original, vec(7), range(1, 3))
    middle = load_strategy(name, {})
    middle.load_state_dict(save_load(original.state_dict()))
    restored = load_strategy(name, {})
    restored.load_state_dict(save_load(middle.state_dict()))
    assert torch.equal(
        run_rounds(original, params.clone(), range(3, 5)),
        run_rounds(restored, params.clone(), range(3, 5)),
    )


@pytest.mark.parametrize("name", NAMES)
def test_fresh_state_round_trip(name: str) -> None:
    original = load_strategy(name, {})
    restored = load_strategy(name, {})
    restored.load_state_dict(save_load(original.state_dict()))
    assert torch.equal(run_rounds(original, vec(3), range(1, 3)), run_rounds(restored, vec(3), range(1, 3)))


@pytest.mark.parametrize("name", NAMES)
def test_in_memory_state_dict_is_a_snapshot(name: str) -> None:
    """Without serialisation in between, a state_dict must still be a snapshot."""
    original = load_strategy(name, {})
    params = run_rounds(original, vec(7), range(1, 4))
    state = original.state_dict()
    restored = load_strategy(name, {})
    restored.load_state_dict(state)
    cont = run_rounds(original, params.clone(), range(4, 6))
    resumed = run_rounds(restored, params.clone(), range(4, 6))
    assert torch.equal(cont, resumed)


@pytest.mark.parametrize("name", sorted(set(NAMES) - set(STATEFUL)))
def test_stateless_strategies_reject_foreign_state(name: str) -> None:
    strategy = load_strategy(name, {})
    assert strategy.state_dict() == {}
    with pytest.raises(ValueError):
        strategy.load_state_dict({"state": {}})


# --------------------------------------------------------------------------
# FedAvg, FedProx, FedSGD


def _constant_updates(values_and_counts, kind=UpdateKind.DELTA) -> list[ClientUpdate]:
    return [
        ClientUpdate(f"c{i}", torch.full((P,), float(v)), n, kind)
        for i, (v, n) in enumerate(values_and_counts)
    ]


def test_fedavg_weights_by_examples() -> None:
    params = vec(0)
    updates = _constant_updates([(1.0, 1), (5.0, 3)])
    weighted = load_strategy("fedavg", {}).aggregate(1, params, updates)
    torch.testing.assert_close(weighted, params + 0.25 * 1.0 + 0.75 * 5.0)
    equal = load_strategy("fedavg", {"weighted": False}).aggregate(1, params, updates)
    torch.testing.assert_close(equal, params + 3.0)


def test_fedavg_server_lr_scales_the_step() -> None:
    params = vec(0)
    updates = _constant_updates([(2.0, 1), (2.0, 1)])
    result = load_strategy("fedavg", {"server_lr": 0.5}).aggregate(1, params, updates)
    torch.testing.assert_close(result, params + 1.0)


def test_fedprox_plan_and_aggregate() -> None:
    strategy = load_strategy("fedprox", {"mu": 0.3})
    plan = strategy.configure(1, ["a", "b"], np.random.default_rng(0))
    assert plan == RoundPlan(clients=("a", "b"), kind=UpdateKind.DELTA, proximal_mu=0.3)
    updates = make_updates(UpdateKind.DELTA)
    assert torch.equal(
        strategy.aggregate(1, vec(1), updates),
        load_strategy("fedavg", {}).aggregate(1, vec(1), updates),
    )


def test_fedsgd_plan_and_step() -> None:
    strategy = load_strategy("fedsgd", {"server_lr": 0.5})
    plan = strategy.configure(1, ["a", "b"], np.random.default_rng(0))
    assert plan.kind is UpdateKind.GRADIENT and plan.clients == ("a", "b")
    params = vec(0)
    grads = _constant_updates([(1.0, 1), (5.0, 3)], kind=UpdateKind.GRADIENT)
    torch.testing.assert_close(strategy.aggregate(1, params, grads), params - 0.5 * 4.0)
    unweighted = load_strategy("fedsgd", {"server_lr": 0.5, "weighted": False})
    torch.testing.assert_close(unweighted.aggregate(1, params, grads), params - 0.5 * 3.0)
    with pytest.raises(ValueError, match="gradient"):
        strategy.aggregate(1, params, _constant_updates([(1.0, 1)]))


# --------------------------------------------------------------------------
# Server optimisers


def test_fedavgm_momentum_accumulates() -> None:
    strategy = load_strategy("fedavgm", {"server_lr": 1.0, "momentum": 0.9})
    u = vec(3)
    updates = [ClientUpdate("a", u, 1)]
    p0 = vec(0)
    p1 = strategy.aggregate(1, p0, updates)
    torch.testing.assert_close(p1, p0 + u)
    p2 = strategy.aggregate(2, p1, updates)
    torch.testing.assert_close(p2, p1 + 1.9 * u)
    no_momentum = load_strategy("fedavgm", {"momentum": 0.0})
    q1 = no_momentum.aggregate(1, p0, updates)
    torch.testing.assert_close(no_momentum.aggregate(2, q1, updates), q1 + u)


@pytest.mark.parametrize("name,lr", [("fedadam", 0.01), ("fedadagrad", 0.1), ("fedyogi", 0.01)])
def test_adaptive_first_step_is_about_server_lr(name: str, lr: float) -> None:
    strategy = load_strategy(name, {})
    assert strategy.server_lr == lr  # the documented default
    u = vec(4)
    u = torch.where(u.abs() < 0.5, torch.sign(u) * 0.5 + (u == 0) * 0.5, u)  # |u| >= 0.5
    params = vec(0)
    step = strategy.aggregate(1, params, [ClientUpdate("a", u, 1)]) - params
    torch.testing.assert_close(step.abs(), torch.full((P,), lr), rtol=3e-2, atol=0)
    assert torch.equal(torch.sign(step), torch.sign(u))


def test_fedadam_first_step_exact() -> None:
    """torch Adam with bias correction: first step = lr * g / (|g| + tau)."""
    strategy = load_strategy("fedadam", {"server_lr": 0.1, "tau": 0.01})
    u = vec(4)
    params = vec(0)
    step = strategy.aggregate(1, params, [ClientUpdate("a", u, 1)]) - params
    torch.testing.assert_close(step, 0.1 * u / (u.abs() + 0.01), rtol=1e-5, atol=1e-6)


def test_yogi_optimizer_matches_hand_computed_step() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = Yogi([p], lr=0.1, betas=(0.9, 0.99), eps=1e-3, initial_accumulator=1e-6)
    p.grad = torch.tensor([2.0, 0.5], dtype=torch.float64)
    opt.step()
    # coordinate 0: g = 2: m = 0.2, v = 1e-6 - 0.01*4*sign(1e-6 - 4) = 0.040001
    expected0 = 1.0 - 0.1 * 0.2 / (math.sqrt(0.040001) + 1e-3)
    # coordinate 1: g = 0.5: m = 0.05, v = 1e-6 + 0.01*0.25 = 0.002501
    expected1 = -2.0 - 0.1 * 0.05 / (math.sqrt(0.002501) + 1e-3)
    torch.testing.assert_close(p.detach(), torch.tensor([expected0, expected1], dtype=torch.float64))
    # second step, g = 0.1 on coordinate 0: g² = 0.01 < v, so v shrinks (sign +1)
    p.grad = torch.tensor([0.1, 0.0], dtype=torch.float64)
    before = p.detach().clone()
    opt.step()
    m0, v0 = 0.9 * 0.2 + 0.1 * 0.1, 0.040001 - 0.01 * 0.01
    m1, v1 = 0.9 * 0.05, 0.002501
    torch.testing.assert_close(
        p.detach(),
        before - 0.1 * torch.tensor([m0 / (math.sqrt(v0) + 1e-3), m1 / (math.sqrt(v1) + 1e-3)],
                                    dtype=torch.float64),
    )


def test_fedyogi_matches_hand_computation_over_two_rounds() -> None:
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 0.01
    strategy = load_strategy(
        "fedyogi", {"server_lr": lr, "beta1": b1, "beta2": b2, "tau": tau, "weighted": False}
    )
    d1 = vec(11)
    d2 = d1 * torch.tensor([0.05, 3.0, 0.05, 3.0, 0.05, 3.0, 0.05])  # both signs of v - g²
    params = vec(12)
    out = strategy.aggregate(1, params, [ClientUpdate("a", d1, 1), ClientUpdate("b", d1, 9)])
    out = strategy.aggregate(2, out, [ClientUpdate("a", d2, 1)])

    x = params.double().numpy().copy()
    m = np.zeros(P)
    v = np.full(P, tau * tau)
    for d in (d1, d2):
        g = -d.double().numpy()
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * g * g * np.sign(v - g * g)
        x = x - lr * m / (np.sqrt(v) + tau)
    torch.testing.assert_close(out, torch.from_numpy(x).float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Robust aggregation


def test_fedmedian_odd_and_even() -> None:
    params = torch.zeros(P)
    odd = _constant_updates([(1, 1), (100, 1), (2, 1)])
    torch.testing.assert_close(load_strategy("fedmedian", {}).aggregate(1, params, odd), torch.full((P,), 2.0))
    even = _constant_updates([(1, 1), (10, 1), (3, 1), (2, 1)])
    torch.testing.assert_close(load_strategy("fedmedian", {}).aggregate(1, params, even), torch.full((P,), 2.5))


def test_fedmedian_is_per_coordinate() -> None:
    updates = make_updates(UpdateKind.DELTA, n=5)
    result = load_strategy("fedmedian", {}).aggregate(1, torch.zeros(P), updates)
    assert torch.equal(result, stack(updates).median(dim=0).values)


def test_trimmed_mean_drops_extremes() -> None:
    updates = _constant_updates([(1, 1), (2, 1), (3, 1), (100, 1), (-50, 1)])
    result = load_strategy("trimmed_mean", {"beta": 0.2}).aggregate(1, torch.zeros(P), updates)
    torch.testing.assert_close(result, torch.full((P,), 2.0))


@pytest.mark.parametrize(
    "beta,n,k",
    [(0.1, 10, 1), (0.1, 9, 0), (0.3, 10, 3), (0.29, 100, 29), (0.2, 5, 1), (0.49, 3, 1),
     (0.49, 2, 0), (0.4, 1, 0), (0.0, 8, 0)],
)
def test_trimmed_mean_count(beta: float, n: int, k: int) -> None:
    strategy = load_strategy("trimmed_mean", {"beta": beta})
    assert strategy.num_trimmed(n) == k
    assert n - 2 * strategy.num_trimmed(n) >= 1


def test_trimmed_mean_beta_zero_is_the_mean() -> None:
    updates = make_updates(UpdateKind.DELTA, n=4)
    result = load_strategy("trimmed_mean", {"beta": 0.0}).aggregate(1, torch.zeros(P), updates)
    torch.testing.assert_close(result, stack(updates).mean(dim=0))


def _with_outlier() -> tuple[torch.Tensor, list[ClientUpdate]]:
    u = vec(21)
    honest = [u + vec(30 + i, scale=0.01) for i in range(4)]
    vectors = honest[:2] + [torch.full((P,), 1e6)] + honest[2:]
    return u, [ClientUpdate(f"c{i}", v, 10) for i, v in enumerate(vectors)]


@pytest.mark.parametrize(
    "name,options",
    [
        ("fedmedian", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {}),
        ("krum", {"num_byzantine": 1}),
        ("multi_krum", {"num_byzantine": 1}),
        ("multi_krum", {"num_selected": 3}),
    ],
)
def test_robust_strategies_ignore_one_huge_outlier(name: str, options: dict) -> None:
    u, updates = _with_outlier()
    params = vec(0)
    result = load_strategy(name, options).aggregate(1, params, updates)
    assert float((result - params - u).norm()) < 0.1


def test_fedavg_is_moved_by_the_outlier() -> None:
    u, updates = _with_outlier()
    params = vec(0)
    result = load_strategy("fedavg", {}).aggregate(1, params, updates)
    assert float((result - params - u).norm()) > 1e4


def test_krum_returns_one_of_the_updates() -> None:
    updates = make_updates(UpdateKind.DELTA, n=6)
    params = vec(0)
    result = load_strategy("krum", {"num_byzantine": 1}).aggregate(1, params, updates)
    assert any(torch.equal(result, params + u.vector) for u in updates)


def test_krum_picks_the_central_update() -> None:
    # points on a line: 0, 1, 2, 3.5, 10 -> with 2 neighbours (n - f - 2, f = 1) the
    # scores per coordinate are 1+4, 1+1, 1+2.25, 2.25+6.25, 42.25+64: value 1 wins
    updates = _constant_updates([(0, 1), (1, 1), (2, 1), (3.5, 1), (10, 1)])
    result = load_strategy("krum", {"num_byzantine": 1}).aggregate(1, torch.zeros(P), updates)
    assert torch.equal(result, torch.full((P,), 1.0))


def test_krum_scores_accurate_for_close_updates_far_from_zero() -> None:
    """Centring before the Gram trick keeps small distances between large vectors."""
    from strategies.krum import krum_scores

    base = torch.full((P,), 1000.0)
    rows = torch.stack([base + vec(40 + i, scale=1e-2) for i in range(5)])
    exact = torch.cdist(rows.double(), rows.double()) ** 2
    exact.fill_diagonal_(float("inf"))
    expected = torch.sort(exact, dim=1).values[:, :3].sum(dim=1)
    torch.testing.assert_close(krum_scores(rows, 0), expected, rtol=1e-3, atol=1e-6)


def test_multi_krum_with_all_selected_is_the_plain_mean() -> None:
    updates = make_updates(UpdateKind.DELTA, n=5)
    params = vec(0)
    expected = params + stack(updates).mean(dim=0)
    for options in ({}, {"num_selected": 5}, {"num_selected": 50}):
        result = load_strategy("multi_krum", options).aggregate(1, params, updates)
        torch.testing.assert_close(result, expected)


def test_multi_krum_with_one_selected_is_krum() -> None:
    updates = make_updates(UpdateKind.DELTA, n=6)
    params = vec(0)
    assert torch.equal(
        load_strategy("multi_krum", {"num_byzantine": 1, "num_selected": 1}).aggregate(1, params, updates),
        load_strategy("krum", {"num_byzantine": 1}).aggregate(1, params, updates),
    )


def test_robust_strategies_need_individual_updates() -> None:
    for name in ROBUST:
        assert load_strategy(name, {}).needs_individual_updates
    for name in set(NAMES) - ROBUST:
        assert not load_strategy(name, {}).needs_individual_updates


# --------------------------------------------------------------------------
# Construction and loading


@pytest.mark.parametrize(
    "name,options,argument",
    [
        ("fedavg", {"server_lr": -1}, "server_lr"),
        ("fedavg", {"server_lr": 0}, "server_lr"),
        ("fedavg", {"server_lr": float("nan")}, "server_lr"),
        ("fedavg", {"server_lr": "fast"}, "server_lr"),
        ("fedavg", {"weighted": "yes"}, "weighted"),
        ("fedprox", {"mu": -0.1}, "mu"),
        ("fedprox", {"server_lr": -1.0}, "server_lr"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"server_lr": 0.0}, "server_lr"),
        ("fedadam", {"beta1": 1.0}, "beta1"),
        ("fedadam", {"beta2": -0.1}, "beta2"),
        ("fedadam", {"tau": 0.0}, "tau"),
        ("fedadagrad", {"tau": -1e-3}, "tau"),
        ("fedadagrad", {"server_lr": float("inf")}, "server_lr"),
        ("fedyogi", {"beta2": 1.5}, "beta2"),
        ("fedyogi", {"server_lr": -0.01}, "server_lr"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("trimmed_mean", {"beta": -0.1}, "beta"),
        ("krum", {"num_byzantine": -1}, "num_byzantine"),
        ("krum", {"num_byzantine": 1.5}, "num_byzantine"),
        ("multi_krum", {"num_selected": 0}, "num_selected"),
        ("multi_krum", {"num_byzantine": True}, "num_byzantine"),
        ("fedsgd", {"server_lr": 0}, "server_lr"),
    ],
)
def test_constructor_errors_name_the_argument(name: str, options: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{argument} = "):
        load_strategy(name, options)
    module, _, attr = BUILTIN_STRATEGIES[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    with pytest.raises(ValueError, match=rf"^{argument} = "):
        cls(**options)


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ValueError) as info:
        load_strategy("nope")
    message = str(info.value)
    assert "nope" in message
    for name in BUILTIN_STRATEGIES:
        assert name in message


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="bogus"):
        load_strategy("fedavg", {"bogus": 1})


def test_names_are_case_insensitive() -> None:
    assert type(load_strategy("FedAvg", {})).__name__ == "FedAvg"


def test_user_strategy_from_a_file(tmp_path) -> None:
    path = tmp_path / "my.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from fedtrain import Strategy, weighted_mean

            class MyStrategy(Strategy):
                def __init__(self, scale: float = 1.0) -> None:
                    self.scale = scale

                def aggregate(self, rnd, params, updates):
                    return params + self.scale * weighted_mean(updates)
            """
        )
    )
    strategy = load_strategy(f"{path}:MyStrategy", {"scale": 2.0})
    assert isinstance(strategy, Strategy)
    params = torch.zeros(P)
    result = strategy.aggregate(1, params, _constant_updates([(1.0, 1), (3.0, 1)]))
    torch.testing.assert_close(result, torch.full((P,), 4.0))
    with pytest.raises(ValueError, match="bogus"):
        load_strategy(f"{path}:MyStrategy", {"bogus": 1})
    with pytest.raises(ValueError, match="Missing"):
        load_strategy(f"{path}:Missing", {})


def test_a_plug_in_sees_every_update_unless_it_declares_it_uses_only_their_mean(tmp_path) -> None:
    from fedtrain import config
    from fedtrain.simulation import simulate

    path = tmp_path / "seen.py"
    path.write_text(textwrap.dedent(
        """
        import json
        from fedtrain import Strategy, weighted_mean

        class Each(Strategy):
            def __init__(self, out: str) -> None:
                self.out = out

            def aggregate(self, rnd, params, updates):
                with open(self.out, "w") as f:
                    json.dump([[u.client_id, u.contributors] for u in updates], f)
                return params + weighted_mean(updates)

        class MeanOnly(Each):
            needs_individual_updates = False
        """
    ))
    seen = {}
    for name in ("Each", "MeanOnly"):
        out = tmp_path / f"{name}.json"
        cfg = config.load(None, [f"strategy.name={path}:{name}", f"strategy.options.out={str(out)!r}",
                                 "run.rounds=1", "strategy.clients_per_round=4"])
        simulate(cfg, plot=lambda *a, **k: None)
        seen[name] = json.loads(out.read_text())
    assert len(seen["Each"]) == 4 and all(c == 1 for _, c in seen["Each"])
    assert seen["MeanOnly"] == [["client-mean", 4]]
