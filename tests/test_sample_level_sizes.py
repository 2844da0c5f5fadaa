"""Sample-level DP with record counts the clients declare: each client's
noise is calibrated from its own count, so no client's claim sets another's
privacy or utility; a count the run does not allow leaves that client out,
never ends the run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrain import ParamLayout, config, load_strategy
from fedtrain.aggregation import stack
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ConfigError, GradSampleMode, Partition
from fedtrain.data import partition
from fedtrain.data.clients import PartitionedData, partitions_by_id
from fedtrain.models import mlp
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.privacy.sample_level import SampleLevelDP
from fedtrain.privacy.setting import build_policy
from fedtrain.results import read_metrics
from fedtrain.simulation import simulate
from fedtrain.types import ClientUpdate

TARGET = 4.0


def _policy(sizes: dict[str, int], *extra: str) -> SampleLevelDP:
    cfg = config.load(None, ["privacy.mode=sample", f"privacy.target_epsilon={TARGET}", "run.rounds=3", *extra])
    policy = build_policy(cfg, load_strategy("fedavg"), sizes, 2.0, GradSampleMode.EW)
    assert isinstance(policy, SampleLevelDP)
    return policy


def test_a_one_record_client_does_not_change_another_clients_noise() -> None:
    alone = _policy({"a": 300, "b": 1000}, "privacy.min_records=1")
    beside_tiny = _policy({"a": 300, "b": 1000, "tiny": 1}, "privacy.min_records=1")

    privacy = beside_tiny.client_privacy(1)
    for cid in ("a", "b"):
        assert privacy.noise_multiplier_for(cid) == alone.client_privacy(1).noise_multiplier_for(cid)
    assert privacy.noise_multiplier_for("tiny") > privacy.noise_multiplier_for("a") > privacy.noise_multiplier_for("b")


def test_each_client_trains_with_its_own_noise_and_learns_nothing_of_the_others() -> None:
    policy = _policy({"a": 300, "b": 1000})
    task = TrainTask(epochs=1, batch_size=32, lr=0.1, privacy=policy.client_privacy(1))

    sent = dataclasses.replace(task, privacy=task.privacy.for_client("a")).as_json()

    assert sent["privacy"]["dp_sgd"]["noise_multiplier"] == policy.noise["a"]
    assert sent["privacy"]["noise_multipliers"] == {} and sent["privacy"]["excluded"] == {}
    assert TrainTask.from_json(json.loads(json.dumps(sent))).privacy.dp_sgd.noise_multiplier == policy.noise["a"]


def test_every_clients_epsilon_after_the_run_is_within_the_target() -> None:
    sizes = {"q1": 20, "mid": 300, "big": 1000}
    policy = _policy(sizes)

    for rnd in (1, 2, 3):
        assert policy.check(rnd, list(sizes)) is None
        policy.release(rnd, list(sizes), [])

    for cid in sizes:
        assert 0.99 * TARGET <= policy.epsilon(cid) <= TARGET, cid
    assert policy.report().epsilon <= TARGET
    assert policy.report().extra["noise_multiplier"] == min(policy.noise.values())


def test_a_zero_record_claim_leaves_that_client_out_without_an_exception() -> None:
    policy = _policy({"a": 300, "zero": 0, "few": 5})
    privacy = policy.client_privacy(1)

    assert set(policy.noise) == {"a"}
    assert "num_records = 0" in (privacy.refusal("zero") or "")
    assert "below privacy.min_records = 16" in (privacy.refusal("few") or "")
    assert privacy.refusal("a") is None
    vector = torch.zeros(3)
    release = policy.release(1, ["a", "zero"], [ClientUpdate("a", vector, 300), ClientUpdate("zero", vector, 1)])
    assert [u.client_id for u in release.updates] == ["a"]
    assert [cid for cid, _ in release.rejected] == ["zero"]
    assert policy.epsilon("zero") == 0.0 and policy.epsilon("a") > 0


def test_no_client_with_enough_records_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="privacy.min_records = 16: no client has that many records"):
        _policy({"a": 3, "b": 0})


def test_min_records_is_a_checked_config_key() -> None:
    assert config.load(None, []).privacy.min_records == 16
    with pytest.raises(ConfigError, match="privacy.min_records = 0"):
        config.load(None, ["privacy.min_records=0"])


def _data() -> PartitionedData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, 16, generator=g), torch.randint(0, 4, (200,), generator=g)
    parts = partition(Partition.DIRICHLET, y.numpy(), 6, np.random.default_rng(0), alpha=0.3)
    return PartitionedData(x, y, partitions_by_id(parts), torch.device("cpu"))


def _trainer() -> LocalTrainer:
    torch.manual_seed(0)
    model = mlp((16,), 4, hidden=8)
    return LocalTrainer(model, ParamLayout.of(model.state_dict()), torch.device("cpu"))


def test_batched_dp_sgd_adds_each_clients_own_noise_as_sequential_does() -> None:
    data = _data()
    ids = list(data.ids)
    own = {cid: 0.2 + 2.0 * i for i, cid in enumerate(ids)}
    dp = DpSgdTask(noise_multiplier=max(own.values()), max_grad_norm=0.5, mode=GradSampleMode.HOOKS,
                   secure_noise=False)
    task = TrainTask(epochs=1, batch_size=8, lr=0.1,
                     privacy=ClientPrivacy(dp_sgd=dp, noise_multipliers=own, excluded={ids[-1]: "left out"}))
    trainer = _trainer()
    params = trainer.layout.flatten(trainer.model.state_dict())

    seq = SequentialExecutor(trainer, data, seed=3).train_round(1, ids, task, params)
    batched = BatchedExecutor(_trainer(), data, seed=3, strict=True).train_round(1, ids, task, params)
    uniform = SequentialExecutor(_trainer(), data, seed=3).train_round(
        1, ids, dataclasses.replace(task, privacy=ClientPrivacy(dp_sgd=dp)), params)

    assert [(f.client_id, f.reason) for f in batched.failures] == [(ids[-1], "left out")] == [
        (f.client_id, f.reason) for f in seq.failures]
    assert [u.client_id for u in batched.updates] == ids[:-1]
    torch.testing.assert_close(stack(batched.updates), stack(seq.updates), rtol=0, atol=1e-5)
    assert not torch.allclose(stack(seq.updates)[0], stack(uniform.updates)[0])  # its own σ, not the largest


def test_a_simulation_leaves_a_small_client_out_and_keeps_every_epsilon_within_the_target(tmp_path: Path) -> None:
    """Digits in 3 Dirichlet(0.1) clients of 840, 149 and 448 records;
    ``privacy.min_records = 200`` leaves client 1 out."""
    cfg = config.load(None, [
        "data.num_clients=3", "strategy.clients_per_round=3", "data.alpha=0.1", "run.rounds=2",
        "privacy.mode=sample", f"privacy.target_epsilon={TARGET}", "privacy.min_records=200",
        "model.hidden=16", "client.batch_size=64",
    ])

    result = simulate(cfg, out_dir=tmp_path)
    rows = read_metrics(tmp_path)

    assert len(result.records) == 2
    assert all(set(r["failures"]) == {"1"} and "privacy.min_records = 200" in r["failures"]["1"] for r in rows)
    assert all(r.num_clients == 2 for r in result.records)
    assert result.summary.epsilon is not None and 0.9 * TARGET < result.summary.epsilon <= TARGET
