"""``fedtrain audit``: canaries in a real run, the bound against the claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtrain import config as config_mod
from fedtrain.audit import AUDIT_FILE, audit
from fedtrain.cli import main
from fedtrain.config import ConfigError
from fedtrain.privacy.audit import audit_bound
from fedtrain.run import build_engine, build_strategy, build_trainable, client_data, in_process_executor
from fedtrain.training.canary import CanaryClients, CanaryDraw, CanaryExecutor, canary_direction, canary_id
from fedtrain.training.train_task import TrainTask
from fedtrain.privacy.policy import ClientPrivacy

NO_DP = [
    "run.rounds=10", "data.num_clients=20", "strategy.clients_per_round=5", "strategy.sampling=poisson",
]
USER_DP = [
    "run.rounds=10", "data.num_clients=40", "strategy.clients_per_round=10", "privacy.target_epsilon=1",
    "model.hidden=32",
]


def test_without_dp_the_audit_detects_leakage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No DP, 20 clients, 1000 canaries: a lower bound above 1 at 95 % (about 2.8 measured)."""
    args = ["audit", "--out", str(tmp_path / "run"), "--quiet", "--canaries", "1000"]
    for item in NO_DP:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "claimed ε = none (no DP)" in printed and "audited lower bound ε ≥" in printed
    saved = json.loads((tmp_path / "run" / AUDIT_FILE).read_text())
    assert saved["claimed_epsilon"] is None
    assert saved["epsilon_lower_bound"] > 1.0
    assert f"{saved['epsilon_lower_bound']:.3f}" in printed
    assert saved["confidence"] == 0.95 and saved["delta"] == 1e-5
    canaries = saved["canaries"]
    assert canaries["count"] == 1000 and canaries["inserted"] == sum(canaries["included"])
    assert 0 < canaries["correct"] <= canaries["guesses"] <= 1000
    assert "Steinke" in saved["paper"] and saved["method"]["name"]
    recomputed = audit_bound(canaries["scores"], [bool(b) for b in canaries["included"]], 1e-5, 0.95)
    assert recomputed.epsilon_lower_bound == pytest.approx(saved["epsilon_lower_bound"])
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_user_level_bound_stays_below_the_claim(tmp_path: Path, seed: int) -> None:
    cfg = config_mod.load("simulations/dp_user.toml", [*USER_DP, f"run.seed={seed}"])
    result = audit(cfg, tmp_path / "run", canaries=1000)
    assert result.claimed_epsilon is not None and result.claimed_epsilon <= 1.0 + 1e-6
    assert 0.0 <= result.epsilon_lower_bound <= result.claimed_epsilon


def test_sample_level_bound_stays_below_the_claim(tmp_path: Path) -> None:
    cfg = config_mod.load("simulations/dp_sample_cross_silo.toml", ["run.rounds=2", "privacy.target_epsilon=2"])
    result = audit(cfg, tmp_path / "run", canaries=100)
    assert result.kind.value == "record"
    assert result.claimed_epsilon is not None and result.claimed_epsilon <= 2.0 + 1e-6
    assert 0.0 <= result.epsilon_lower_bound <= result.claimed_epsilon
    assert 0 < result.inserted < 100


def test_inclusion_comes_from_secrets_not_the_run_seed(tmp_path: Path) -> None:
    cfg = config_mod.load(None, ["run.rounds=1", "data.num_clients=5", "strategy.clients_per_round=2"])
    first = audit(cfg, tmp_path / "a", canaries=64)
    second = audit(cfg, tmp_path / "b", canaries=64)
    assert first.included != second.included
    assert CanaryDraw.secret(64).seeds != CanaryDraw.secret(64).seeds


@pytest.mark.parametrize(("sets", "key"), [
    (["privacy.mode=distributed", "secure.aggregation=true", "privacy.noise_multiplier=1"], "secure.aggregation"),
    (["compression.up=int8"], "compression.up"),
])
def test_refused_settings_name_the_key(tmp_path: Path, sets: list[str], key: str) -> None:
    cfg = config_mod.load(None, sets)
    with pytest.raises(ConfigError, match=key):
        audit(cfg, tmp_path / "run", canaries=10)
    assert not (tmp_path / "run").exists()


def test_canaries_join_at_the_configured_rate() -> None:
    """Canary clients grow the population but not the Poisson rate, nor the
    expected cohort that user-level DP divides by."""
    cfg = config_mod.load("simulations/dp_user.toml", USER_DP)
    device = torch.device("cpu")
    clients = client_data(cfg, device)
    strategy, secure = build_strategy(cfg)
    test_set = (clients.x_test, clients.y_test)
    trainable = build_trainable(cfg, clients.input_shape, clients.num_classes, test_set, device)
    plan = CanaryClients(CanaryDraw.secret(100))
    data = plan.add_records_(clients.data)
    executor = plan.wrap_executor_(in_process_executor(cfg, trainable.trainer, data, secure), trainable.trainer)
    sizes = {cid: data.size(cid) for cid in data.ids}
    population = len(sizes)
    sizes.update(plan.extra_clients())
    engine = build_engine(cfg, strategy, executor, trainable, test_set, sizes, population=population)
    assert len(engine.clients) == 40 + sum(plan.draw.included)
    assert engine.sampler.rate == pytest.approx(10 / 40)  # type: ignore[attr-defined]
    assert engine.privacy.expected_cohort == pytest.approx(10.0)  # type: ignore[attr-defined]
    assert engine.privacy.event.sample_rate == pytest.approx(10 / 40)  # type: ignore[attr-defined]


def test_canary_executor_makes_clipped_directions_and_trains_the_rest() -> None:
    cfg = config_mod.load(None, ["data.num_clients=4", "strategy.clients_per_round=2", "model.hidden=8"])
    device = torch.device("cpu")
    clients = client_data(cfg, device)
    strategy, secure = build_strategy(cfg)
    trainable = build_trainable(cfg, clients.input_shape, clients.num_classes, (clients.x_test, clients.y_test), device)
    inner = in_process_executor(cfg, trainable.trainer, clients.data, secure)
    seeds = {canary_id(0): 12345, canary_id(1): 678}
    executor = CanaryExecutor(inner, seeds, num_examples=7)
    params = trainable.initial_params()
    from fedtrain.types import RoundPlan

    task = TrainTask.of(cfg.client, RoundPlan(clients=("0", canary_id(1))), ClientPrivacy(clip=0.3))
    outcome = executor.train_round(1, ["0", canary_id(1)], task, params)
    by_id = {u.client_id: u for u in outcome.updates}
    assert set(by_id) == {"0", canary_id(1)}
    canary = by_id[canary_id(1)]
    assert float(canary.vector.norm()) == pytest.approx(0.3, rel=1e-5)
    assert torch.allclose(canary.vector / 0.3, canary_direction(678, params.numel(), device), atol=1e-6)
    assert canary.num_examples == 7 and canary.metrics == {"unclipped": 1.0}
    alone = inner.train_round(1, ["0"], task, params).updates[0]
    assert torch.equal(by_id["0"].vector, alone.vector)
    u, v = canary_direction(1, 10_000, device), canary_direction(2, 10_000, device)
    assert abs(float(u @ v)) < 0.05
