"""Compression in whole runs: accuracy effect, bytes accounting, resume,
and composition with user-level DP, robust strategies and secure aggregation.

``simulate_compressed`` is :func:`fedtrain.simulation.simulate` without a plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedtrain import config as cfg
from fedtrain.compression import (
    HEADER_BYTES, CompressedUpdate, CompressionPlan, EncodeState, encode, uncompressed_nbytes,
)
from fedtrain.config import Compression
from fedtrain.run import RunResult, build_engine, build_strategy, build_trainable, client_data
from fedtrain.simulation import simulate
from fedtrain.types import RoundOutcome

BASE = ["run.rounds=4", "data.num_clients=8", "strategy.clients_per_round=4", "client.epochs=1"]


def simulate_compressed(config: cfg.Config, out_dir: Path | None = None, resume: bool = False) -> RunResult:
    return simulate(config, out_dir, resume=resume, plot=lambda *a, **k: None)


def _config(*overrides: str) -> cfg.Config:
    return cfg.load(None, [*BASE, *overrides])


def test_uncompressed_run_counts_float32_bytes(tmp_path: Path) -> None:
    result = simulate_compressed(_config(), tmp_path)
    numel = result.params.numel()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["bytes_up"] == row["num_clients"] * (HEADER_BYTES + 4 * numel)
        assert row["bytes_down"] == 4 * uncompressed_nbytes(numel)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in rows)


def test_compressed_runs_send_fewer_bytes_and_still_learn() -> None:
    plain = simulate_compressed(_config())
    int8 = simulate_compressed(_config("compression.up=int8"))
    topk = simulate_compressed(_config("compression.up=topk", "compression.fraction=0.05"))
    up = [sum(r.bytes_up for r in run.records) for run in (plain, int8, topk)]
    assert up[0] / up[1] > 3.9 and up[0] / up[2] > 9
    assert int8.summary.final_accuracy > plain.summary.final_accuracy - 0.05
    assert not torch.equal(int8.params, plain.params)


def test_downlink_clients_train_from_the_decoded_model() -> None:
    plain = simulate_compressed(_config())
    down = simulate_compressed(_config("compression.down=int8"))
    numel = plain.params.numel()
    assert down.records[0].bytes_down == 4 * uncompressed_nbytes(numel)
    assert all(r.bytes_down < 4 * uncompressed_nbytes(numel) / 3.5 for r in down.records[1:])
    assert not torch.equal(plain.params, down.params)
    assert down.summary.final_accuracy > 0.5


def test_resume_with_error_feedback_is_bit_identical(tmp_path: Path) -> None:
    options = ("compression.up=topk", "compression.fraction=0.05", "compression.down=int4",
               "compression.residual_memory_mb=0")
    whole = simulate_compressed(_config(*options), tmp_path / "whole")
    assert list((tmp_path / "whole" / "residuals").glob("*.pt"))
    simulate_compressed(_config(*options, "run.rounds=2"), tmp_path / "cut")
    resumed = simulate_compressed(_config(*options), tmp_path / "cut", resume=True)
    assert torch.equal(whole.params, resumed.params)
    assert [r.bytes_up for r in whole.records] == [r.bytes_up for r in resumed.records]


def test_user_level_dp_bounds_the_decoded_update_and_refuses_a_crafted_one() -> None:
    dp = ("privacy.mode=user", "privacy.noise_multiplier=0.5", "privacy.clip=0.5", "privacy.secure_noise=false",
          "compression.up=int8")
    result = simulate_compressed(_config(*dp, "compression.error_feedback=true"))
    assert all(r.num_failed == 0 and r.num_clients == 4 for r in result.records)

    config = _config(*dp)
    plan = CompressionPlan.of(config.compression, config.run.seed)

    class Crafted:
        """Sends an int8 payload whose decoded norm is 10× the clip."""

        def train_round(self, rnd, clients, task, params, sink=None) -> RoundOutcome:
            v = torch.ones(params.numel()) * (5.0 / params.numel() ** 0.5)
            c = encode(v, Compression.INT8, EncodeState(torch.Generator().manual_seed(0), block=256))
            return RoundOutcome(tuple(
                CompressedUpdate(client_id=cid, vector=torch.empty(0), num_examples=10, payload=c) for cid in clients
            ), ())

    clients = client_data(config, torch.device("cpu"))
    strategy, _ = build_strategy(config)
    test_set = (clients.x_test, clients.y_test)
    trainable = build_trainable(config, clients.input_shape, clients.num_classes, test_set, torch.device("cpu"))
    sizes = {cid: clients.data.size(cid) for cid in clients.data.ids}
    engine = build_engine(config, strategy, Crafted(), trainable, test_set, sizes, compression=plan)
    _, record = engine.run_round(1, trainable.initial_params())
    assert record.num_clients == 0 and record.num_failed == 4
    assert all("exceeds privacy.clip" in why for why in record.failures.values())


def test_krum_and_median_aggregate_decoded_updates() -> None:
    from fedtrain.compression import kept

    initial = simulate_compressed(_config("run.rounds=1", "client.lr=1e-12")).params
    for name in ("krum", "fedmedian"):
        result = simulate_compressed(_config(f"strategy.name={name}", "compression.up=topk",
                                             "compression.fraction=0.1", "run.rounds=1"))
        assert result.records[0].num_failed == 0 and result.records[0].num_clients == 4
        changed = int((result.params != initial).sum())
        assert 0 < changed <= kept(initial.numel(), 0.1)  # Krum: one decoded update; median: zero where most are


def test_randk_under_secure_aggregation_changes_only_the_rounds_coordinates() -> None:
    config = _config("secure.aggregation=true", "compression.up=randk", "compression.fraction=0.1",
                     "compression.error_feedback=false", "run.rounds=1")
    from fedtrain.compression import kept, randk_indices, randk_seed

    start = _config("run.rounds=1")
    initial = build_trainable(start, (64,), 10, (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long)),
                              torch.device("cpu")).initial_params()
    result = simulate_compressed(config)
    changed = torch.nonzero(result.params != initial).flatten()
    numel = initial.numel()
    allowed = set(randk_indices(randk_seed(config.run.seed, 1), numel, kept(numel, 0.1)).tolist())
    assert 0 < changed.numel() <= len(allowed) and set(changed.tolist()) <= allowed
    assert result.records[0].num_clients == 4


def test_batched_and_sequential_compress_alike() -> None:
    a = simulate_compressed(_config("client.engine=sequential", "compression.up=int8"))
    b = simulate_compressed(_config("client.engine=batched", "compression.up=int8"))
    assert [r.bytes_up for r in a.records] == [r.bytes_up for r in b.records]
    assert torch.allclose(a.params, b.params, atol=1e-4)


def test_a_deployment_takes_what_a_simulation_takes_under_secure_aggregation() -> None:
    """A deployment carries compression.down and randk under secure
    aggregation; what the simulation refuses there (topk, a second rounding)
    it refuses too, with the same message."""
    import pytest

    from fedtrain.config import ConfigError
    from fedtrain.run import build_strategy

    for deployed in (False, True):
        build_strategy(_config("compression.up=randk", "secure.aggregation=true"), deployed=deployed)
        build_strategy(_config("compression.down=int8", "secure.aggregation=true"), deployed=deployed)
        build_strategy(_config("compression.down=int8", "compression.up=int8"), deployed=deployed)
    with pytest.raises(ConfigError, match=r"compression.up = 'topk' with secure.aggregation = true.*randk"):
        _config("compression.up=topk", "secure.aggregation=true")
    with pytest.raises(ConfigError, match=r"compression.up = 'int8' with secure.aggregation = true.*round twice"):
        _config("compression.up=int8", "secure.aggregation=true")
