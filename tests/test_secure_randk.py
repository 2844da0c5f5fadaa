"""``compression.up = 'randk'`` under secure aggregation: SecAgg+ runs on the
round's ``k`` kept coordinates, not the whole vector.

The exact equality the compact path must keep: the ring's scale is
``levels / clip_range`` with ``levels = max_signed // num_clients``, which does
not depend on the vector's length, and every client's decoded randk update is
zero off the round's coordinates, so masking the ``k`` kept values gives the
same ring sum on them as masking the dense vector, and the same zeros
elsewhere: the models are bit-identical, not merely close.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrain import config as cfg
from fedtrain.compression import (
    CompactSecureAggregate, CompressionPlan, kept, randk_indices, randk_seed, secure_coordinates, uncompressed_nbytes,
)
from fedtrain.config import Compression
from fedtrain.run import build_engine, build_strategy, build_trainable, client_data, in_process_executor
from fedtrain.secure.messages import AdvertiseRequest, MaskedInput, ShareDelivery
from fedtrain.secure.protocol import SecureClient
from fedtrain.secure.round import run_secure_round
from fedtrain.secure.setting import SecureSettings
from fedtrain.simulation import simulate
from fedtrain.transport.in_process import InProcessChannel, InProcessSecureAggregation
from fedtrain.types import AggregateOrigin, UpdateKind

FRACTION = 0.1
RANDK = ["data.num_clients=8", "strategy.clients_per_round=4", "client.epochs=1", "run.rounds=3",
         "secure.aggregation=true", "compression.up=randk", f"compression.fraction={FRACTION}"]


def _run(config: cfg.Config, compact: bool) -> tuple[torch.Tensor, list[int]]:
    """``config``'s simulation, round by round, with the compact secure path
    or the dense reference (every client masks its whole decoded vector)."""
    clients = client_data(config, torch.device("cpu"))
    strategy, secure = build_strategy(config)
    test_set = (clients.x_test, clients.y_test)
    trainable = build_trainable(config, clients.input_shape, clients.num_classes, test_set, torch.device("cpu"))
    compression = CompressionPlan.of(config.compression, config.run.seed)
    executor = in_process_executor(config, trainable.trainer, clients.data, secure, compression)
    if not isinstance(executor, InProcessSecureAggregation):
        raise TypeError(f"expected the secure executor, got {type(executor).__name__}")
    executor.compact = compact
    sizes = {cid: clients.data.size(cid) for cid in clients.data.ids}
    engine = build_engine(config, strategy, executor, trainable, test_set, sizes, compression=compression)
    params = trainable.initial_params()
    bytes_up = []
    for rnd in range(1, config.run.rounds + 1):
        params, record = engine.run_round(rnd, params)
        assert record.num_failed == 0 and record.num_clients == 4
        bytes_up.append(record.bytes_up)
    return params, bytes_up


@pytest.mark.parametrize("feedback", ["true", "false"])
def test_the_compact_secure_sum_is_bit_identical_to_the_dense_one_and_costs_k_values(feedback: str) -> None:
    config = cfg.load(None, [*RANDK, f"compression.error_feedback={feedback}"])
    compact, compact_bytes = _run(config, compact=True)
    dense, dense_bytes = _run(config, compact=False)
    assert torch.equal(compact, dense)
    numel = compact.numel()
    k = kept(numel, FRACTION)
    assert compact_bytes == [4 * (k + 1) * 4] * 3  # 4 clients, k values and the weight, 32-bit ring
    assert dense_bytes == [4 * uncompressed_nbytes(numel)] * 3
    assert all(d / c >= 0.9 * numel / k for c, d in zip(compact_bytes, dense_bytes))


def test_metrics_jsonl_counts_the_masked_k_vectors(tmp_path: Path) -> None:
    config = cfg.load(None, [*RANDK, "run.rounds=2", "secure.bits=64"])
    result = simulate(config, tmp_path, plot=lambda *a, **k: None)
    k = kept(result.params.numel(), FRACTION)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["bytes_up"] for r in rows] == [r["num_clients"] * (k + 1) * 8 for r in rows]
    assert all(r["num_clients"] == 4 for r in rows)


def test_distributed_dp_noise_stays_on_the_rounds_coordinates() -> None:
    config = cfg.load(None, [*RANDK, "run.rounds=1", "privacy.mode=distributed", "privacy.noise_multiplier=0.5",
                             "privacy.clip=0.5", "privacy.secure_noise=false", "compression.error_feedback=false"])
    result = simulate(config, None, plot=lambda *a, **k: None)
    assert result.records[0].num_clients == 4 and result.records[0].num_failed == 0
    clients = client_data(config, torch.device("cpu"))
    test_set = (clients.x_test, clients.y_test)
    start = build_trainable(config, clients.input_shape, clients.num_classes, test_set,
                            torch.device("cpu")).initial_params()
    numel = start.numel()
    shared = randk_indices(randk_seed(config.run.seed, 1), numel, kept(numel, FRACTION))
    changed = torch.nonzero(result.params != start).flatten()
    assert set(changed.tolist()) <= set(shared.tolist())
    assert changed.numel() > 0.9 * shared.numel(), "the noise reaches (almost) every kept coordinate"


class _DenseLiar(SecureClient):
    """Masks its ``k`` values, then pads the masked input to the model's
    length, as a client that ignores the announced length would."""

    padding = 0

    def masked_input(self, delivery: ShareDelivery, update: np.ndarray, weight: int) -> MaskedInput:
        masked = super().masked_input(delivery, update, weight)
        pad = np.zeros(self.padding, dtype=masked.vector.dtype)
        return MaskedInput(masked.sender, np.concatenate([masked.vector, pad]))


def test_a_masked_input_of_the_wrong_length_is_refused_and_the_round_goes_on() -> None:
    numel, n = 500, 6
    coordinates = secure_coordinates(Compression.RANDK, FRACTION, 7, 1, numel)
    assert coordinates is not None
    k = coordinates.numel()
    dense = np.zeros((n, numel), dtype=np.float32)
    dense[:, coordinates.numpy()] = np.random.default_rng(1).uniform(-0.5, 0.5, (n, k))
    _DenseLiar.padding = numel - k

    def open_client(request: AdvertiseRequest) -> SecureClient:
        kind = _DenseLiar if request.recipient == 2 else SecureClient
        return kind(request.recipient, request.setup)

    channel = InProcessChannel(open_client, lambda c: (dense[c.index, coordinates.numpy()], c.index + 1))
    settings = SecureSettings(bits=32, clip_range=1.0, max_weight=100, neighbours=0, threshold=0.5,
                              simulated_dropout=0.0)
    ids = [f"c{i}" for i in range(n)]
    secure = run_secure_round(channel, settings, rnd=1, ids=ids, planned=n, params=torch.zeros(numel),
                              kind=UpdateKind.DELTA, distributed_noise=0.0, weighted=True, coordinates=coordinates)

    assert [(f.client_id, f.reason) for f in secure.failures] == [
        ("c2", f"secure aggregation: masked vector shape ({numel + 1},), expected ({k + 1},)")
    ]
    aggregate = secure.aggregate
    assert isinstance(aggregate, CompactSecureAggregate) and aggregate.origin is AggregateOrigin.SECURE_SUM
    assert aggregate.contributors == n - 1 and aggregate.masked_nbytes == (k + 1) * 4
    survivors = [i for i in range(n) if i != 2]
    expected = sum(dense[i].astype(np.float64) * (i + 1) for i in survivors) / sum(i + 1 for i in survivors)
    np.testing.assert_allclose(aggregate.vector.numpy(), expected, atol=settings.clip_range * 1e-6)
    off = np.setdiff1d(np.arange(numel), coordinates.numpy())
    assert not aggregate.vector.numpy()[off].any()


def test_without_randk_the_secure_length_is_the_models() -> None:
    assert secure_coordinates(Compression.NONE, FRACTION, 7, 1, 500) is None
    coordinates = secure_coordinates(Compression.RANDK, FRACTION, 7, 2, 500)
    assert coordinates is not None and torch.equal(coordinates, randk_indices(randk_seed(7, 2), 500, 50))


def test_a_deployed_worker_masks_k_values_and_refuses_any_other_length() -> None:
    from fedtrain import RoundPlan
    from fedtrain.config import to_dict
    from fedtrain.compression import decode, from_wire
    from fedtrain.deploy.worker import ClientWorker
    from fedtrain.transport.relay import TrainReply
    from fedtrain.privacy.policy import ClientPrivacy
    from fedtrain.secure import wire
    from fedtrain.training.train_task import TrainTask
    from fedtrain.transport.relay import Hello

    config = cfg.load(None, ["data.num_clients=3", "strategy.clients_per_round=3", "secure.aggregation=true",
                             "compression.up=randk", f"compression.fraction={FRACTION}"])
    data = client_data(config, torch.device("cpu"))
    class Recording(ClientWorker):
        replies: list[TrainReply] = []

        def train(self, rnd: int, task_json: str, params: np.ndarray) -> TrainReply:
            reply = super().train(rnd, task_json, params)
            self.replies.append(reply)
            return reply

    worker = Recording("0", "0", None, "cpu")
    worker.hello(Hello(to_dict(config), data.input_shape, data.num_classes))
    trainer = worker._setup[1]  # type: ignore[index]
    params = trainer.layout.flatten(trainer.model.state_dict()).numpy()
    numel = params.size
    k = kept(numel, FRACTION)
    task = json.dumps(TrainTask.of(config.client, RoundPlan(clients=("0",)), ClientPrivacy()).as_json())
    settings = SecureSettings.of(config)
    graph = settings.graph(3)

    def opening(length: int) -> bytes:
        setup = settings.setup(graph, vector_length=length, noise_stddev=0.0, weighted=True)
        return wire.encode(AdvertiseRequest(0, setup))

    for wrong in (numel, k - 1, k + 1):
        with pytest.raises(ValueError, match=rf"setup.vector_length = {wrong}, this client masks {k} values"):
            worker.train_secure(1, task, params, opening(wrong))
    worker.train_secure(1, task, params, opening(k))
    held = worker._held[1].update
    assert held is not None and held.shape == (k,)
    coordinates = randk_indices(randk_seed(config.run.seed, 1), numel, k)
    sent = worker.replies[-1].compressed
    assert sent is not None
    decoded = decode(from_wire(sent, numel), numel)
    assert np.count_nonzero(held) > 0
    np.testing.assert_array_equal(held, decoded[coordinates].numpy())
