"""Batched chunks sized from the device's memory and the model's footprint."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedtrain import ParamLayout
from fedtrain.config import Optimizer, Partition
from fedtrain.data import partition
from fedtrain.data.clients import PartitionedData, partitions_by_id
from fedtrain.models import mlp
from fedtrain.training import batched as batched_module
from fedtrain.training.batched import (
    CUDA_MEMORY_SHARE,
    HOST_MEMORY_SHARE,
    BatchedExecutor,
    chunk_clients,
    client_bytes,
    device_budget,
    host_available_bytes,
)
from fedtrain.training.train_task import TrainTask
from fedtrain.training.trainer import LocalTrainer

CPU = torch.device("cpu")
GIB = 1 << 30

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chunks_are_cut_at_the_budget_and_the_cap() -> None:
    assert chunk_clients(100, [30] * 10, cap=10) == [3, 3, 3, 1]
    assert chunk_clients(100, [30] * 10, cap=2) == [2] * 5
    assert chunk_clients(100, [60, 50, 40, 10, 95], cap=10) == [1, 3, 1]
    assert chunk_clients(100, [100, 100], cap=10) == [1, 1]  # exactly at the budget still fits
    assert chunk_clients(100, [150, 10], cap=10) == [1, 1]  # too big alone: a chunk of one anyway
    assert chunk_clients(10**12, [1] * 7, cap=100) == [7]
    assert chunk_clients(100, [], cap=1) == []
    with pytest.raises(ValueError, match="memory budget = 0"):
        chunk_clients(0, [1], cap=1)
    with pytest.raises(ValueError, match="client.max_batch_clients = 0"):
        chunk_clients(1, [1], cap=0)


def test_a_clients_bytes_count_its_optimiser_state_and_batch() -> None:
    numel, trainable, width, per_record, records = 1000, 800, 32, 50, 4096
    sgd = client_bytes(numel, trainable, 0, width, per_record, records)
    momentum = client_bytes(numel, trainable, 1, width, per_record, records)
    adam = client_bytes(numel, trainable, 2, width, per_record, records)

    assert sgd == 4 * (2 * 1000 + 2 * 800 + 32 * 50) + 4096
    assert momentum - sgd == adam - momentum == 4 * trainable  # one float32 tensor per state
    assert client_bytes(numel, trainable, 0, 2 * width, per_record, records) - sgd == 4 * width * per_record
    with pytest.raises(ValueError, match=">= 0"):
        client_bytes(-1, 0, 0, 0, 0, 0)


def test_a_34m_parameter_model_fills_a_large_gpu_instead_of_one_client_per_chunk() -> None:
    """The old fixed 1 GiB budget trained any model above ~22M parameters one
    client at a time; 80 % of a free 139 GiB GPU holds dozens of them."""
    params = 34_000_000
    per_client = client_bytes(params, params, 2, 32, 3 * 20_000, 32 * 3 * 1024)
    assert 2 * per_client > GIB  # Adam: 6 float32 copies of 34M parameters, over 800 MB: two do not fit

    assert chunk_clients(1 * GIB, [per_client] * 64, cap=64) == [1] * 64
    fits = int(CUDA_MEMORY_SHARE * 139 * GIB) // per_client
    assert fits >= 60
    assert chunk_clients(int(CUDA_MEMORY_SHARE * 139 * GIB), [per_client] * 200, cap=200)[0] == fits


def test_the_cpu_budget_is_a_share_of_the_available_host_memory() -> None:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = host_available_bytes()
    budget = device_budget(CPU)

    assert 0 < available <= total
    assert 0 < budget <= total * HOST_MEMORY_SHARE
    assert abs(budget - HOST_MEMORY_SHARE * available) <= 0.1 * available  # memory moves a little between calls


def test_the_cuda_budget_is_a_share_of_free_plus_cached_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The arithmetic, with the device's answers fixed (no GPU here)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 139 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GIB)

    assert device_budget(torch.device("cuda:0")) == int(CUDA_MEMORY_SHARE * 12 * GIB)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_the_cuda_budget_follows_the_real_device() -> None:
    free, total = torch.cuda.mem_get_info(0)
    budget = device_budget(torch.device("cuda:0"))
    assert 0 < budget <= total
    assert budget >= 0.5 * CUDA_MEMORY_SHARE * free


def _data(num_clients: int = 40, records: int = 2000) -> PartitionedData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(records, 64, generator=g)
    y = torch.randint(0, 10, (records,), generator=g)
    parts = partition(Partition.DIRICHLET, y.numpy(), num_clients, np.random.default_rng(0), alpha=0.5)
    return PartitionedData(x, y, partitions_by_id(parts), CPU)


def _executor(data: PartitionedData, memory_budget: int | None = None) -> BatchedExecutor:
    torch.manual_seed(0)
    model = mlp((64,), 10, hidden=32)
    trainer = LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU)
    return BatchedExecutor(trainer, data, seed=3, memory_budget=memory_budget)


@pytest.mark.parametrize("optimizer", [Optimizer.SGD, Optimizer.ADAM])
def test_a_small_model_on_the_cpu_trains_its_whole_cohort_in_one_chunk(optimizer: Optimizer) -> None:
    data = _data()
    executor = _executor(data)
    task = TrainTask(epochs=1, batch_size=16, lr=0.01, optimizer=optimizer)
    params = executor.layout.flatten(executor.trainer.model.state_dict())
    outcome = executor.train_round(1, list(data.ids), task, params)
    sizes = {slot: data.size(cid) for slot, cid in enumerate(data.ids)}

    assert len(outcome.updates) == len(data.ids) and not outcome.failures
    assert executor._measured_budget is not None and executor._measured_budget >= GIB
    chunks = executor._chunks(sizes, task)
    assert len(chunks) == 1 and sorted(chunks[0]) == list(range(len(data.ids)))


def test_the_budget_is_measured_once_per_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(8, 400)
    executor = _executor(data)
    calls = []
    monkeypatch.setattr(batched_module, "device_budget", lambda device: calls.append(device) or 4 * GIB)
    task = TrainTask(epochs=1, batch_size=16, lr=0.01)
    params = executor.layout.flatten(executor.trainer.model.state_dict())
    for rnd in (1, 2, 3):
        executor.train_round(rnd, list(data.ids), task, params)

    assert calls == [CPU]
    assert executor._budget() == 4 * GIB


def test_an_explicit_budget_still_wins_over_the_devices() -> None:
    data = _data(8, 400)
    executor = _executor(data, memory_budget=1)
    task = TrainTask(epochs=1, batch_size=16, lr=0.01)
    sizes = {slot: data.size(cid) for slot, cid in enumerate(data.ids)}

    assert [len(c) for c in executor._chunks(sizes, task)] == [1] * len(data.ids)
    assert executor._measured_budget is None
