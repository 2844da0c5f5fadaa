"""Batched virtual clients: a whole cohort trains at once with ``torch.func``.

:class:`~fedtrain.training.sequential.SequentialExecutor` trains one client after
another; with many small clients a round is then mostly Python and dispatcher
overhead (a few-kilobyte MLP step costs ~1 ms, whatever the batch). Here the
parameters of ``k`` clients are stacked (one row per client) and a local step
of all of them is one stacked forward pass and one backward pass: the
per-client matrix products become batched ones and the overhead is paid once
per step of the cohort, not once per step of each client. The stacked forward
is :class:`~fedtrain.training.stacked.StackedSequential` (batched tensor ops
written out) for a ``Sequential`` of common layers, else ``vmap`` of
``functional_call`` (any model ``torch.func`` runs, with ~1 ms more overhead
per step). The clients' losses are independent, so the gradient of their sum
with respect to the stacked parameters is each client's own gradient: written
out by :meth:`StackedSequential.gradients` for stacks of ``Linear`` layers and
activations (an MLP: no autograd graph to build, half the cost of a step),
else plain autograd (~20% faster than ``vmap(grad(...))``, which DP-SGD's
per-sample gradients and FedSGD's gradients at the shared global parameters
use). The stacked parameters are trained in place in the rows that become
the updates.

The math is the sequential one (:class:`~fedtrain.training.trainer.LocalTrainer`), so
the same seeds give the same updates up to float rounding:

* each client draws its batches from its own ``client_generator(seed, rnd,
  index)`` with the same calls in the same order (``randperm`` per epoch;
  under DP-SGD the noise seed, then one Poisson mask per step, from
  :meth:`LocalTrainer.noise_source` and :meth:`LocalTrainer.batch_randomness`,
  which with ``secure_noise`` make them the trainer's secret draws instead);
  a client whose records all fit in one batch draws nothing, since every
  step then sees all its records and their order only changes float rounding;
* clients have different numbers of records, so batches are padded to a common
  width with a mask (loss ``sum(mask · ce) / count``, ``ce`` from
  :meth:`~fedtrain.training.task.Task.per_record_loss`), and clients are sorted
  by their number of steps: at step ``t`` the clients still training are a
  prefix of the stack and only that prefix is computed and updated, so a
  client that has finished (parameters, momentum, Adam moments) does not move;
* SGD (momentum, weight decay) and Adam are
  :class:`~fedtrain.training.optimizer.LocalOptimizer`'s update functions
  (``torch.optim``'s functional kernels) run on the stacked tensors, each
  row a client; FedProx adds ``mu · (w − w_global)`` to the gradient;
  DP-SGD takes per-sample gradients (``vmap`` over samples inside ``vmap``
  over clients), clips and sums them as
  :func:`~fedtrain.privacy.mechanisms.per_sample_clipped_sum`, and adds each
  client's noise from its own :class:`~fedtrain.privacy.noise.NoiseSource`;
* clipping the updates and the metrics reported are
  :func:`~fedtrain.training.trainer.clip_and_report_`, the sequential ones.

Models ``torch.func`` cannot run this way (BatchNorm updating its running
statistics, dropout, tied weights, non-float32 tensors) are detected once per
kind of task by training two tiny clients both ways and comparing; then the
round goes to the sequential executor, with the reason logged once.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedtrain.training.executor import UpdateSink
from fedtrain.training.sequential import SequentialExecutor, client_generator
from fedtrain.training.stacked import StackedSequential
from fedtrain.training.optimizer import adam_step_, adam_step_count, sgd_step_
from fedtrain.training.task import prediction
from fedtrain.training.trainer import LocalTrainer, clip_and_report_
from fedtrain.training.train_task import TrainTask
from fedtrain.config import Optimizer, Precision
from fedtrain.data.clients import ClientData
from fedtrain.deadline import ClientTimeout, Deadline, call_with_timeout, timeout_reason
from fedtrain.privacy.dpsgd import sample_rate, steps_per_round
from fedtrain.privacy.mechanisms import clip_factors
from fedtrain.privacy.noise import NoiseSource
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.types import ClientFailure, ClientUpdate, RoundOutcome, UpdateKind

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
_Result = tuple[int, dict[str, float]]
"""A trained client's number of records and metrics, by its slot in the cohort."""

CUDA_MEMORY_SHARE = 0.8
"""Share of a CUDA device's free memory one chunk of the cohort may use: the
rest is headroom for the allocator's fragmentation and the temporaries the
estimate of :func:`client_bytes` leaves out."""

HOST_MEMORY_SHARE = 0.5
"""Share of the host's available memory one chunk may use on the CPU: the
process's other buffers (the data set, the coordinator's aggregate) and other
processes need the rest."""


def device_budget(device: torch.device) -> int:
    """Bytes one chunk of the cohort may use on ``device``: on CUDA
    :data:`CUDA_MEMORY_SHARE` of its free memory (``torch.cuda.mem_get_info``
    plus what PyTorch's caching allocator holds unused, which is free to this
    process), elsewhere :data:`HOST_MEMORY_SHARE` of the host's available
    memory (:func:`host_available_bytes`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(1, int(CUDA_MEMORY_SHARE * (free + cached)))
    return max(1, int(HOST_MEMORY_SHARE * host_available_bytes()))


def host_available_bytes() -> int:
    """The host memory a new allocation can get without swapping: Linux'
    ``MemAvailable`` (free plus reclaimable page cache), else the free
    physical pages ``sysconf`` reports; in a container with a memory limit
    (cgroup v2 ``memory.max``) at most what is left under that limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit, \
                open("/sys/fs/cgroup/memory.current", encoding="ascii") as current:
            cap = limit.read().strip()
            if cap != "max":
                available = min(available, max(0, int(cap) - int(current.read().strip())))
    except (OSError, ValueError):
        pass
    return available


def client_bytes(
    numel: int, trainable: int, optimizer_states: int, width: int, per_record: int, record_bytes: int
) -> int:
    """Estimated bytes one client takes in a batched chunk: float32 copies of
    its update row and the global parameters it starts from (``2 · numel``),
    of its gradients, one temporary and ``optimizer_states`` state tensors
    (momentum: 1, Adam: 2 moments) of the ``trainable`` parameters, of
    ``per_record`` float32 values (activations and their gradients, or
    per-sample gradients) for each of ``width`` records of a batch, plus its
    records' ``record_bytes``."""
    if min(numel, trainable, optimizer_states, width, per_record, record_bytes) < 0:
        raise ValueError("client_bytes: every count must be >= 0")
    return 4 * (2 * numel + (2 + optimizer_states) * trainable + width * per_record) + record_bytes


def chunk_clients(budget: int, costs: Sequence[int], cap: int) -> list[int]:
    """The lengths of consecutive chunks of clients whose estimated bytes
    ``costs`` (in training order) are cut where a chunk would exceed
    ``budget`` bytes or ``cap`` clients; a client above the budget on its
    own still gets a chunk, of one."""
    if budget <= 0:
        raise ValueError(f"memory budget = {budget}: must be > 0")
    if cap < 1:
        raise ValueError(f"client.max_batch_clients = {cap}: must be >= 1")
    lengths: list[int] = []
    used = 0
    for need in costs:
        if not lengths or lengths[-1] >= cap or used + need > budget:
            lengths.append(0)
            used = 0
        lengths[-1] += 1
        used += need
    return lengths

MIN_BATCH_CLIENTS = 4
"""Below this many clients a chunk trains one by one when its forward pass
needs ``vmap``: such a batched step costs ~1.5 ms more than a sequential one
(``torch.func`` and pytree overhead), which 4–5 clients pay back (measured on
the digits MLP, 1 thread)."""

MIN_STACKED_CLIENTS = 2
"""The same for models with a :class:`StackedSequential` form: 2 clients
trained together already take about a third of the time of one after the
other, 3 clients under a quarter (``simulations/many_clients.toml``'s MLP, 1
thread)."""

GATHER_BYTES = 64 << 20
"""Up to this many bytes, a chunk's records for all its steps are gathered at
once (see :meth:`_Batches.gathered`)."""

PROBE_RECORDS = 5
"""Records of the largest client that make the two probe clients: 5 records in
batches of 3 and 2 records in one, so the probe has ragged steps and padding
(which a layer mixing the samples of a batch would notice)."""


SPEED_CLIENTS = 8
"""Clients the ``auto`` engine's speed probe trains both ways (at least
``min_batch_clients``): enough for batching to pay off where it can."""

SPEED_MIN_SECONDS = 0.05
"""Below this, the probe's sequential step is too short to time against
scheduling noise (and batching small models is where it pays): ``auto`` keeps
batched. Above it the choice is timed, so for a model near parity it can
differ between runs on a loaded machine; set ``client.engine`` for a
bit-reproducible run."""


def _fastest_of_two(run: Callable[[], None]) -> float:
    """The shorter wall time of two calls of ``run``."""
    times = []
    for _ in range(2):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


class BatchedMode(str, enum.Enum):
    """The kind of batched computation a task needs: whether a model runs
    batched is probed once per kind (the value names it in logs and errors)."""

    GRADIENT = "gradient"
    """FedSGD: each client's mean gradient at the global parameters."""
    DP_SGD = "dp_sgd"
    """Local DP-SGD: per-sample gradients, clipped and noised."""
    TRAIN = "train"
    """Local SGD / Adam epochs."""

    @classmethod
    def of(cls, task: TrainTask) -> BatchedMode:
        """The mode ``task`` trains in."""
        if task.kind is UpdateKind.GRADIENT:
            return cls.GRADIENT
        return cls.DP_SGD if task.privacy.dp_sgd is not None else cls.TRAIN


def _unbatched_setting(task: TrainTask) -> str | None:
    """Why the batched engine cannot train ``task`` whatever the model: it
    steps in float32 on one batch per step (the sequential trainer does
    ``client.precision`` and ``client.grad_accum_steps``). FedSGD already sums
    all of a client's batches, so accumulation changes nothing there."""
    if task.precision is not Precision.FP32:
        return f"client.precision = {task.precision.value!r}: the batched engine trains in fp32 only"
    if task.grad_accum_steps != 1 and task.kind is not UpdateKind.GRADIENT:
        return (f"client.grad_accum_steps = {task.grad_accum_steps}: the batched engine takes one batch "
                "per optimiser step")
    return None


def _close(batched: torch.Tensor, sequential: torch.Tensor) -> bool:
    scale = float(sequential.abs().max()) if sequential.numel() else 0.0
    return float((batched - sequential).abs().max()) <= 1e-3 * scale + 1e-6


class BatchedExecutor:
    """Trains each round's cohort in chunks of stacked virtual clients.

    ``max_batch_clients`` caps the clients per chunk; chunks are otherwise
    sized so that their estimated memory (:func:`client_bytes`) stays within
    ``memory_budget`` bytes, by default :func:`device_budget` of the trainer's
    device, measured once, at the first round (so a run's chunks do not follow
    the machine's load from round to round; set ``max_batch_clients`` for
    chunks that are the same on every machine); chunks of fewer than
    ``min_batch_clients`` clients (default: :data:`MIN_STACKED_CLIENTS` or
    :data:`MIN_BATCH_CLIENTS`, by the model) train one by one, which is faster for them. With ``strict`` a model that cannot run
    batched is an error (``ValueError`` at its first round) instead of a
    logged fallback. Everything runs on ``trainer.device``. Update vectors
    are rows of one preallocated ``(cohort, P)`` buffer, as with
    :class:`SequentialExecutor`.
    """

    def __init__(
        self,
        trainer: LocalTrainer,
        data: ClientData,
        seed: int,
        max_batch_clients: int | None = None,
        memory_budget: int | None = None,
        min_batch_clients: int | None = None,
        strict: bool = False,
        timeout: float = 0.0,
    ) -> None:
        """``timeout`` (``client.timeout``) limits each client's data loading
        and each chunk's training: a chunk checks its
        :class:`~fedtrain.deadline.Deadline` between steps and, past it, fails
        all its clients; the round goes on with the next chunk."""
        if max_batch_clients is not None and max_batch_clients < 1:
            raise ValueError(f"max_batch_clients = {max_batch_clients}: must be >= 1")
        if min_batch_clients is not None and min_batch_clients < 1:
            raise ValueError(f"min_batch_clients = {min_batch_clients}: must be >= 1")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget = {memory_budget}: must be > 0")
        self.trainer = trainer
        self.data = data
        self.seed = seed
        self.max_batch_clients = max_batch_clients
        self.memory_budget = memory_budget
        self._measured_budget: int | None = None
        self._refusals: set[str] = set()
        self.strict = strict
        self.timeout = timeout
        self.sequential = SequentialExecutor(trainer, data, seed, timeout)
        self.layout = trainer.layout
        # A private copy: Opacus hooks that DP-SGD puts on the trainer's model
        # must not run inside the functional calls.
        self._model = copy.deepcopy(trainer.model).train()
        named = dict(self._model.named_parameters())
        self._trainable = tuple(n for n in self.layout.names if n in named and named[n].requires_grad)
        self._trainable_numel = sum(s for n, s in zip(self.layout.names, self.layout.sizes) if n in self._trainable)
        self._objective = trainer.objective
        self._stacked = StackedSequential.of(self._model) if self._objective.stacked_exact else None
        if min_batch_clients is None:
            min_batch_clients = MIN_STACKED_CLIENTS if self._stacked is not None else MIN_BATCH_CLIENTS
        self.min_batch_clients = min_batch_clients
        self._support: dict[BatchedMode, str | None] = {}
        self._buffer = torch.empty(0)
        self._activations = 0  # per-sample activation numel, measured by the probe
        self._record_bytes = 0
        self._static_reason = self._unsupported_by_design()

    # ------------------------------------------------------------------ round

    def train_round(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        sink: UpdateSink | None = None,
    ) -> RoundOutcome:
        """With a ``sink``, each chunk trains in rows of its own and its
        updates are pushed into the sink after the chunk (this executor then
        holds one chunk's rows, not the cohort's); without one, the updates
        are returned in cohort order on consecutive rows."""
        if task.kind is UpdateKind.GRADIENT and task.privacy.dp_sgd is not None:
            return self.sequential.train_round(rnd, clients, task, params, sink)  # fails each client, as it should
        params = params.to(self.trainer.device)
        failures: dict[int, ClientFailure] = {}
        sizes: dict[int, int] = {}
        for slot, cid in enumerate(clients):
            if cid not in self.sequential.index:
                failures[slot] = ClientFailure(cid, "unknown client id")
                continue
            refusal = task.privacy.refusal(cid)
            if refusal is not None:
                failures[slot] = ClientFailure(cid, refusal)
                continue
            try:
                sizes[slot] = self.data.size(cid)
            except Exception as exc:
                failures[slot] = ClientFailure(cid, f"{type(exc).__name__}: {exc}")
        if sizes and not self._supported(task, clients, sizes):
            return self.sequential.train_round(rnd, clients, task, params, sink)
        if sink is not None:
            for chunk in self._chunks(sizes, task):
                loaded = self._load(chunk, clients, failures)
                if loaded:
                    self._push_loaded(rnd, clients, task, params, loaded, failures, sink)
            return RoundOutcome((), tuple(failures[s] for s in sorted(failures)))
        rows = self._rows(len(clients), params.numel())
        results: dict[int, _Result] = {}
        for chunk in self._chunks(sizes, task):
            loaded = self._load(chunk, clients, failures)
            if loaded:
                self._train_loaded(rnd, clients, task, params, loaded, rows, results, failures)
        return self._outcome(clients, task, rows, results, failures)

    def _push_loaded(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        loaded: list[tuple[int, torch.Tensor, torch.Tensor]],
        failures: dict[int, ClientFailure],
        sink: UpdateSink,
    ) -> None:
        """Train one chunk in rows ``0 … k−1`` and push its updates into ``sink``."""
        names = [clients[slot] for slot, _, _ in loaded]
        local = [(i, x, y) for i, (_, x, y) in enumerate(loaded)]
        rows = self._rows(len(local), params.numel())
        results: dict[int, _Result] = {}
        lost: dict[int, ClientFailure] = {}
        self._train_loaded(rnd, names, task, params, local, rows, results, lost)
        for i, (slot, _, _) in enumerate(loaded):
            if i in lost:
                failures[slot] = lost[i]
            elif i in results:
                sink.push(ClientUpdate(names[i], rows[i], results[i][0], task.kind, results[i][1]))

    def _rows(self, n: int, numel: int) -> torch.Tensor:
        if self._buffer.shape[0] < n or self._buffer.shape[1:] != (numel,):
            self._buffer = torch.empty((n, numel), dtype=torch.float32, device=self.trainer.device)
        return self._buffer

    def _chunks(self, sizes: dict[int, int], task: TrainTask) -> list[list[int]]:
        """Slots by size, largest first (so chunks hold similar step counts),
        cut where the memory estimate or ``max_batch_clients`` would be exceeded."""
        order = sorted(sizes, key=lambda s: -sizes[s])
        cap = self.max_batch_clients or max(1, len(order))
        lengths = chunk_clients(self._budget(), [self._client_bytes(sizes[slot], task) for slot in order], cap)
        starts = [0, *itertools.accumulate(lengths)]
        return [order[a:b] for a, b in zip(starts, starts[1:])]

    def _budget(self) -> int:
        """``memory_budget``, or the device's, measured at the first call."""
        if self.memory_budget is not None:
            return self.memory_budget
        if self._measured_budget is None:
            self._measured_budget = device_budget(self.trainer.device)
            log.debug("batched chunks sized to %d MiB on %s", self._measured_budget >> 20, self.trainer.device)
        return self._measured_budget

    def _client_bytes(self, n: int, task: TrainTask) -> int:
        """:func:`client_bytes` of one client of ``n`` records: per record of a
        batch three copies of the activations the probe measured (forward
        output, saved input, gradient); under DP-SGD a Poisson batch up to
        four standard deviations above its mean, each record also with its
        per-sample gradient and its clipped copy."""
        trainable = self._trainable_numel
        width = min(task.batch_size, n)
        per_record = 3 * self._activations
        if task.privacy.dp_sgd is not None:
            width = task.batch_size + 4 * math.isqrt(task.batch_size) + 1
            per_record += 2 * trainable
        states = 2 if task.optimizer is Optimizer.ADAM else (1 if task.momentum else 0)
        return client_bytes(self.layout.numel, trainable, states, width, per_record, n * self._record_bytes)

    def _load(
        self, chunk: list[int], clients: Sequence[str], failures: dict[int, ClientFailure]
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        loaded = []
        for slot in chunk:
            cid = clients[slot]
            try:
                x, y = call_with_timeout(lambda: self.data.load(cid), self.timeout)
                if len(y) == 0:
                    raise ValueError("client has no training records")
            except ClientTimeout:
                failures[slot] = ClientFailure(cid, timeout_reason(self.timeout))
                continue
            except Exception as exc:  # a failing client must not end the round
                log.debug("client %s failed to load", cid, exc_info=True)
                failures[slot] = ClientFailure(cid, f"{type(exc).__name__}: {exc}")
                continue
            loaded.append((slot, x.to(self.trainer.device), y.to(self.trainer.device)))
        return loaded

    def _train_loaded(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        loaded: list[tuple[int, torch.Tensor, torch.Tensor]],
        rows: torch.Tensor,
        results: dict[int, _Result],
        failures: dict[int, ClientFailure],
    ) -> None:
        """Train one chunk, batched, or one by one when it is small or cannot be
        batched. A batched chunk that runs past ``client.timeout`` fails all
        its clients (they trained together); one by one, each client has the
        limit to itself."""
        slots = [s for s, _, _ in loaded]
        if len(slots) >= self.min_batch_clients:
            indices = [self.sequential.index[clients[s]] for s in slots]
            gens = [functools.partial(client_generator, self.seed, rnd, i) for i in indices]
            sigmas = [task.privacy.noise_multiplier_for(clients[s]) for s in slots]
            try:
                metrics = self._train_chunk(
                    task, params, [x for _, x, _ in loaded], [y for _, _, y in loaded], gens, rows, slots,
                    sigmas, Deadline(self.timeout),
                )
            except ClientTimeout:
                log.warning("round %d: a chunk of %d clients %s", rnd, len(slots), timeout_reason(self.timeout))
                for slot in slots:
                    failures[slot] = ClientFailure(clients[slot], timeout_reason(self.timeout))
                return
            except Exception as exc:  # e.g. records of different shapes, out of memory
                log.warning(
                    "round %d: batched training of %d clients failed (%s: %s); training them one by one "
                    "(out of memory? lower max_batch_clients or the memory budget)",
                    rnd, len(slots), type(exc).__name__, exc,
                )
            else:
                for (slot, _, y), m in zip(loaded, metrics):
                    results[slot] = (len(y), m)
                return
        for slot, x, y in loaded:
            cid = clients[slot]
            deadline = Deadline(self.timeout)
            try:
                own = dataclasses.replace(task, privacy=task.privacy.for_client(cid))
                result = self.trainer.train(
                    params, x, y, own, client_generator(self.seed, rnd, self.sequential.index[cid]), rows[slot]
                )
                deadline.check()
            except ClientTimeout:
                failures[slot] = ClientFailure(cid, timeout_reason(self.timeout))
                continue
            except Exception as exc:  # a failing client must not end the round
                failures[slot] = ClientFailure(cid, f"{type(exc).__name__}: {exc}")
                continue
            results[slot] = (result.num_examples, result.metrics)

    @staticmethod
    def _outcome(
        clients: Sequence[str], task: TrainTask, rows: torch.Tensor,
        results: dict[int, _Result], failures: dict[int, ClientFailure],
    ) -> RoundOutcome:
        """Updates in cohort order on consecutive rows (so aggregation gets a view)."""
        slots = sorted(results)
        if slots != list(range(len(slots))):
            rows[: len(slots)] = rows[torch.tensor(slots, device=rows.device)]
        updates = tuple(
            ClientUpdate(clients[s], rows[i], results[s][0], task.kind, results[s][1]) for i, s in enumerate(slots)
        )
        return RoundOutcome(updates, tuple(failures[s] for s in sorted(failures)))

    # ---------------------------------------------------------------- support

    def _unsupported_by_design(self) -> str | None:
        if any(d != torch.float32 for d in self.layout.dtypes):
            return "the model has tensors that are not float32"
        trained = [p for _, p in self._model.named_parameters(remove_duplicate=False) if p.requires_grad]
        if len(trained) != len({id(p) for p in trained}):
            return "the model has tied (shared) trainable parameters"
        if not self._trainable:
            return "the model has no trainable parameters"
        return None

    def _supported(self, task: TrainTask, clients: Sequence[str], sizes: dict[int, int]) -> bool:
        """Whether this kind of task runs batched; decided once per kind by
        training two tiny clients (from the largest loadable client's records)
        both ways and comparing."""
        mode = BatchedMode.of(task)
        refusal = _unbatched_setting(task)
        if refusal is not None:
            if self.strict:
                raise ValueError(f"batched clients unsupported for {mode.value} tasks: {refusal}")
            if refusal not in self._refusals:
                self._refusals.add(refusal)
                log.warning("batched clients unsupported for %s tasks, training one by one: %s", mode.value, refusal)
            return False
        if mode not in self._support:
            reason = self._static_reason
            if reason is None:
                largest = sorted(sizes, key=lambda s: -sizes[s])
                loaded = next((got for s in largest for got in self._load([s], clients, {})), None)
                if loaded is None:
                    return True  # nobody loads: the batched path reports the failures
                reason = self._probe(task, loaded[1], loaded[2])
            if reason is not None and self.strict:
                raise ValueError(f"batched clients unsupported for {mode.value} tasks: {reason}")
            self._support[mode] = reason
            if reason is not None:
                log.warning("batched clients unsupported for %s tasks, training one by one: %s", mode.value, reason)
        return self._support[mode] is None

    def _probe(self, task: TrainTask, x: torch.Tensor, y: torch.Tensor) -> str | None:
        m = min(len(y), PROBE_RECORDS)
        half = max(1, m // 2)
        xs, ys = [x[:m], x[:half]], [y[:m], y[:half]]
        privacy = task.privacy
        if privacy.dp_sgd is not None:  # reproducible noise, so that both ways agree
            privacy = ClientPrivacy(privacy.clip, dataclasses.replace(privacy.dp_sgd, secure_noise=False))
        probe = dataclasses.replace(task, epochs=1, batch_size=max(1, (m + 1) // 2), privacy=privacy)
        params = self.layout.flatten(self.trainer.model.state_dict()).to(self.trainer.device)
        saved = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        expected = torch.empty((2, params.numel()), device=params.device)
        try:
            want = [
                self.trainer.train(params, xi, yi, probe, torch.Generator().manual_seed(i), expected[i]).metrics
                for i, (xi, yi) in enumerate(zip(xs, ys))
            ]
        except Exception as exc:
            return f"sequential training of the probe failed ({type(exc).__name__}: {exc})"
        finally:
            self.trainer.model.load_state_dict(saved)
        got_rows = torch.empty_like(expected)
        try:
            gens = [functools.partial(torch.Generator().manual_seed, i) for i in range(2)]
            got = self._train_chunk(probe, params, xs, ys, gens, got_rows, [0, 1])
        except Exception as exc:
            return f"torch.func cannot run the model ({type(exc).__name__}: {exc})"
        if not _close(got_rows, expected):
            return self._difference_reason(probe, params, xs, ys)
        for g, w in zip(got, want):
            if g.keys() != w.keys() or any(abs(g[k] - w[k]) > 1e-3 * abs(w[k]) + 1e-6 for k in w):
                return f"batched and sequential metrics differ ({g} vs {w})"
        self._measure(x[:1])
        return None if self.strict else self._slower_reason(probe, params, x, y)

    def _difference_reason(
        self, probe: TrainTask, params: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor]
    ) -> str:
        """Why the probe's batched and sequential updates differ. Under Adam,
        the probe is run again with SGD: when SGD agrees, the gradients agree
        and Adam's normalisation is the cause — it divides each coordinate by
        the root of its squared gradient, so a gradient that is mathematically
        zero but float noise (around 1e-9) in one engine becomes a full step of
        ``lr`` there."""
        if probe.optimizer is Optimizer.ADAM:
            sgd = dataclasses.replace(probe, optimizer=Optimizer.SGD, momentum=0.0)
            want = torch.empty((2, params.numel()), device=params.device)
            got = torch.empty_like(want)
            saved = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
            try:
                for i, (xi, yi) in enumerate(zip(xs, ys)):
                    self.trainer.train(params, xi, yi, sgd, torch.Generator().manual_seed(i), want[i])
            finally:
                self.trainer.model.load_state_dict(saved)
            gens = [functools.partial(torch.Generator().manual_seed, i) for i in range(2)]
            self._train_chunk(sgd, params, xs, ys, gens, got, [0, 1])
            if _close(got, want):
                return ("batched and sequential Adam updates differ although their SGD updates agree: some "
                        "gradient coordinates are zero in exact arithmetic but float noise in one engine, and "
                        "Adam divides by their root mean square, turning that noise into full steps of client.lr")
        return ("batched and sequential updates differ (the model keeps state outside its "
                "parameters or mixes the records of a batch)")

    def _slower_reason(self, probe: TrainTask, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> str | None:
        """Why ``auto`` trains this model one client after another although it
        could batch it: :data:`SPEED_CLIENTS` clients' local step on a batch of
        ``client.batch_size`` records, timed both ways (the faster of two runs
        each, so that a first call's set-up does not count), is not faster
        batched. (vmap has no batching rule that fuses attention, so a small
        transformer's batched step costs as much as its sequential steps.)"""
        m = min(len(y), probe.batch_size)
        task = dataclasses.replace(probe, epochs=1, batch_size=m)
        k = max(SPEED_CLIENTS, self.min_batch_clients)
        xs, ys = [x[:m]] * k, [y[:m]] * k
        rows = torch.empty((k, params.numel()), device=params.device)
        saved = {name: v.detach().clone() for name, v in self.trainer.model.state_dict().items()}

        def sequential() -> None:
            for i in range(k):
                self.trainer.train(params, xs[i], ys[i], task, torch.Generator().manual_seed(i), rows[i])

        def batched() -> None:
            gens = [functools.partial(torch.Generator().manual_seed, i) for i in range(k)]
            self._train_chunk(task, params, xs, ys, gens, rows, list(range(k)))

        try:
            one_by_one = _fastest_of_two(sequential)
            together = _fastest_of_two(batched)
        finally:
            self.trainer.model.load_state_dict(saved)
        if together <= one_by_one or one_by_one < SPEED_MIN_SECONDS:
            return None
        return (f"batched is not faster for this model: a step of {k} clients took {together * 1e3:.0f} ms batched, "
                f"{one_by_one * 1e3:.0f} ms one after another")

    def _measure(self, x: torch.Tensor) -> None:
        """Per-sample activation count and record bytes, for the memory estimate."""
        count = [0]

        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                count[0] += output.numel()

        handles = [m.register_forward_hook(hook) for m in self._model.modules()]
        try:
            with torch.no_grad():
                self._model.eval()(x)
        finally:
            self._model.train()
            for h in handles:
                h.remove()
        self._activations = count[0]
        self._record_bytes = x[0].numel() * x.element_size() + 8

    # ----------------------------------------------------------------- math

    def _train_chunk(
        self,
        task: TrainTask,
        params: torch.Tensor,
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
        gens: list[Callable[[], torch.Generator]],
        rows: torch.Tensor,
        slots: list[int],
        sigmas: Sequence[float] | None = None,
        deadline: Deadline | None = None,
    ) -> list[dict[str, float]]:
        """Train clients ``(xs[i], ys[i])`` together; write client ``i``'s update
        into ``rows[slots[i]]``; return each client's metrics. ``gens[i]()``
        makes client ``i``'s generator, called only when its draws are needed
        (deriving one costs ~50 µs, a tenth of a small batched step).
        ``sigmas[i]`` is client ``i``'s DP-SGD noise multiplier (default: the
        task's); past ``deadline``, checked every epoch of the batch plan and
        every step, :class:`~fedtrain.deadline.ClientTimeout` is raised."""
        deadline = deadline if deadline is not None else Deadline(0)
        bs = task.batch_size
        gradient = task.kind is UpdateKind.GRADIENT
        sizes = [y.shape[0] for y in ys]
        steps = [math.ceil(m / bs) if gradient else steps_per_round(m, bs, task.epochs) for m in sizes]
        order = sorted(range(len(ys)), key=lambda i: -steps[i])  # the clients still running are a prefix
        n = [sizes[i] for i in order]
        k, device, dp = len(n), params.device, task.privacy.dp_sgd
        offsets = [0, *itertools.accumulate(n)][:-1]
        noises: list[NoiseSource] = []
        if dp is None and max(n) <= bs:
            batches = _whole_clients(n, offsets, 1 if gradient else task.epochs, device)
        else:
            if gradient:  # LocalTrainer._mean_gradient: consecutive batches
                plan = [[np.arange(s, min(s + bs, n[i])) for s in range(0, n[i], bs)] for i in range(k)]
            elif dp is None:
                plan = [_epoch_batches(n[i], task, gens[order[i]], deadline) for i in range(k)]
            else:  # LocalTrainer._train_dp_sgd's draws: the noise (seed), then one mask per step
                made = [gens[i]() for i in order]
                noises = [self.trainer.noise_source(dp.secure_noise, g) for g in made]
                coins = [self.trainer.batch_randomness(dp.secure_noise, g) for g in made]
                plan = [
                    [np.flatnonzero(coins[i].bernoulli(n[i], sample_rate(n[i], bs))) for _ in range(steps[order[i]])]
                    for i in range(k)
                ]
            batches = _pad(plan, offsets, device)
        x, y = torch.cat([xs[i] for i in order]), torch.cat([ys[i] for i in order])
        views = self.layout.views(params)
        consts = {name: v for name, v in views.items() if name not in self._trainable}
        anchor = {name: views[name] for name in self._trainable}
        targets = [slots[i] for i in order]
        in_place = rows.device == device and targets == list(range(targets[0], targets[0] + k))
        out = rows[targets[0]:targets[0] + k] if in_place else torch.empty((k, params.numel()), device=device)
        with torch.no_grad():
            if gradient:
                out.zero_()
                grads, loss = self._gradients(anchor, consts, x, y, batches,
                                              torch.tensor(n, dtype=torch.float32, device=device), deadline)
                stacked = self.layout.views(out)
                for name, g in grads.items():
                    stacked[name].copy_(g)
                seen = n
            else:
                out.copy_(params.expand(k, -1))  # every client starts at the global model, trained in place
                stacked = self.layout.views(out)
                weights = {name: stacked[name] for name in self._trainable}
                if dp is None:
                    loss = self._train_sgd(task, weights, anchor, consts, x, y, batches, deadline)
                else:
                    expected = torch.tensor([sample_rate(m, bs) * m for m in n], device=device)
                    own = [dp.noise_multiplier] * k if sigmas is None else [sigmas[i] for i in order]
                    self._train_dp(task, weights, anchor, consts, x, y, batches, noises, expected, own, deadline)
                    loss = torch.zeros(k, device=device)
                out.sub_(params)
                seen = [m * task.epochs for m in n]
            metrics = clip_and_report_(out, [value / count for value, count in zip(loss.tolist(), seen)], task)
            if not in_place:
                rows.index_copy_(0, torch.tensor(targets, device=rows.device), out.to(rows.device))
        position = {i: p for p, i in enumerate(order)}
        return [metrics[position[i]] for i in range(k)]

    def _client_loss(
        self, p: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One client's batch loss ``sum(mask · ce) / count`` and its summed loss."""
        ce = self._objective.per_record_loss(prediction(functional_call(self._model, (p, consts), (x,))), y)
        total = (ce * m).sum()
        return total / count, total.detach()

    def _stacked_objective(
        self, p: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum over the ``j`` stacked clients of their batch losses
        ``sum(weight · ce)`` (weight = mask / count, so each is
        :meth:`_client_loss`), through
        :class:`~fedtrain.training.stacked.StackedSequential` instead of
        ``vmap``; and every record's loss, detached."""
        if self._stacked is None:
            raise ValueError("the model has no stacked form")
        ce = self._objective.per_record_loss(self._stacked(_with_consts(p, consts), x).transpose(1, 2), y)
        return (ce * weight).sum(), ce.detach()

    def _vmap_objective(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`_stacked_objective` for any model ``torch.func`` runs: ``vmap`` of
        every record's loss."""
        losses_of = vmap(self._record_losses, in_dims=(0, None, 0, 0))

        def objective(p: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor,
                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ce = losses_of(p, consts, x, y)
            return (ce * weight).sum(), ce.detach()

        return objective

    def _record_losses(self, p: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One client's loss of each record of a batch."""
        return self._objective.per_record_loss(prediction(functional_call(self._model, (p, consts), (x,))), y)

    def _sample_loss(self, p: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One record's loss, for per-sample gradients."""
        output = prediction(functional_call(self._model, (p, consts), (x.unsqueeze(0),)))
        return self._objective.mean_loss(output, y.unsqueeze(0))

    def _train_sgd(
        self, task: TrainTask, weights: Tensors, anchor: Tensors, consts: Tensors,
        x: torch.Tensor, y: torch.Tensor, batches: _Batches, deadline: Deadline,
    ) -> torch.Tensor:
        """Local SGD/Adam epochs on the stacked ``weights``; returns each client's
        summed loss. The gradient of the sum of the clients' losses is each
        client's gradient in its own row."""
        gradients = self._gradients_by_hand if self._stacked is not None and self._stacked.differentiable else (
            self._autograd(self._stacked_objective if self._stacked is not None else self._vmap_objective()))
        step = stacked_optimizer(task, weights, anchor)
        ce = torch.zeros(batches.mask.shape, device=x.device)
        prefixes: dict[int, Tensors] = {}
        for t, j, xb, yb, weight in batches.gathered(x, y):
            deadline.check()
            if j not in prefixes:
                prefixes[j] = {name: w[:j] for name, w in weights.items()}
            grads, ce[t, :j] = gradients(prefixes[j], consts, xb, yb, weight)
            step(j, grads)
        return (ce * batches.mask).sum(dim=(0, 2))

    def _gradients_by_hand(
        self, p: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
    ) -> tuple[Tensors, torch.Tensor]:
        """The trainable parameters' gradients of :meth:`_stacked_objective`
        from :meth:`StackedSequential.gradients` (no autograd), and every
        record's loss."""
        if self._stacked is None:
            raise ValueError("the model has no stacked form")
        grads, losses = self._stacked.gradients(_with_consts(p, consts), x, y, weight)
        return {name: grads[name] for name in self._trainable}, losses

    @staticmethod
    def _autograd(objective: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[
            ..., tuple[Tensors, torch.Tensor]]:
        """``objective``'s gradients with respect to the stacked parameters, by autograd."""

        def gradients(p: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor,
                      weight: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
            current = {name: w.detach().requires_grad_() for name, w in p.items()}
            with torch.enable_grad():
                total, losses = objective(current, consts, x, y, weight)
                grads = torch.autograd.grad(total, list(current.values()))
            return dict(zip(current, grads)), losses

        return gradients

    def _train_dp(
        self, task: TrainTask, weights: Tensors, anchor: Tensors, consts: Tensors,
        x: torch.Tensor, y: torch.Tensor, batches: _Batches, noises: list[NoiseSource], expected: torch.Tensor,
        sigmas: Sequence[float], deadline: Deadline,
    ) -> None:
        """DP-SGD as :class:`~fedtrain.privacy.dpsgd.DpSgdStepper`: per-sample
        gradients clipped to ``max_grad_norm`` and summed, plus ``N(0, (σᵢ·C)²)``
        from each client's own noise source at its own noise multiplier
        ``sigmas[i]``, divided by its expected batch ``q·n``."""
        dp = task.privacy.dp_sgd
        if dp is None:
            raise ValueError("no DP-SGD settings in this task")
        per_sample = vmap(vmap(grad(self._sample_loss), in_dims=(None, None, 0, 0)), in_dims=(0, None, 0, 0))
        names = [n for n, p in self._model.named_parameters() if p.requires_grad]  # the stepper's noise order
        numels = [weights[n][0].numel() for n in names]
        stds = [sigma * dp.max_grad_norm for sigma in sigmas]
        step = stacked_optimizer(task, weights, anchor)
        for _, j, idx, mask in batches:
            deadline.check()
            g = per_sample({name: w[:j] for name, w in weights.items()}, consts, x[idx], y[idx])
            squared = sum(g[n].flatten(2).pow(2).sum(dim=2) for n in names)
            factors = clip_factors(squared.sqrt(), dp.max_grad_norm) * mask
            noise = torch.stack([noises[i].gaussian(sum(numels), stds[i], x.device) for i in range(j)])
            grads = {}
            for name, z in zip(names, noise.split(numels, dim=1)):
                summed = torch.einsum("cb,cb...->c...", factors, g[name])
                grads[name] = (summed + z.reshape(summed.shape)) / expected[:j].view(-1, *[1] * (summed.dim() - 1))
            step(j, grads)

    def _gradients(
        self, params: Tensors, consts: Tensors, x: torch.Tensor, y: torch.Tensor,
        batches: _Batches, sizes: torch.Tensor, deadline: Deadline,
    ) -> tuple[Tensors, torch.Tensor]:
        """FedSGD: each client's mean gradient over all its records at the global
        parameters (summed over its batches), and its summed loss."""
        grads_of = vmap(grad(self._client_loss, has_aux=True), in_dims=(None, None, 0, 0, 0, 0))
        k = len(sizes)
        total = {name: torch.zeros((k, *p.shape), device=x.device) for name, p in params.items()}
        loss = torch.zeros(k, device=x.device)
        for _, j, idx, mask in batches:
            deadline.check()
            grads, summed = grads_of(params, consts, x[idx], y[idx], mask, sizes[:j])
            loss[:j] += summed
            for name, g in grads.items():
                total[name][:j] += g
        return total, loss


@dataclass(frozen=True)
class _Batches:
    """Every client's batches, padded to one width, step-major (so the running
    clients of a step are one contiguous block): ``idx[t, i]`` indexes the
    chunk's concatenated records (padding points at the client's first record,
    with ``mask`` 0); ``weight`` is ``mask`` over the batch's record count (at
    least 1); ``running[t]`` clients (a prefix: clients are sorted by their
    number of steps, longest first) take step ``t``. ``repeated``: every step
    is the same batch of every client (the tensors are one step expanded)."""

    idx: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor
    running: list[int]
    repeated: bool = False

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(t, j, indices, mask)`` of each step, for the ``j`` running clients."""
        for t, j in enumerate(self.running):
            yield t, j, self.idx[t, :j], self.mask[t, :j]

    def gathered(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(t, j, x, y, weight)`` of each step's running clients. The
        records of all steps are gathered in one indexing call when they fit in
        :data:`GATHER_BYTES` (one call per step costs more than the step's
        arithmetic on small models), else step by step."""
        if self.repeated:
            xb, yb, weight = x[self.idx[0]], y[self.idx[0]], self.weight[0]
            for t, j in enumerate(self.running):
                yield t, j, xb, yb, weight
            return
        if self.idx.numel() * (x[:1].numel() * x.element_size() + y[:1].numel() * y.element_size()) <= GATHER_BYTES:
            xs, ys = x[self.idx], y[self.idx]
            for t, j in enumerate(self.running):
                yield t, j, xs[t, :j], ys[t, :j], self.weight[t, :j]
            return
        for t, j in enumerate(self.running):
            idx = self.idx[t, :j]
            yield t, j, x[idx], y[idx], self.weight[t, :j]


def _with_consts(p: Tensors, consts: Tensors) -> Tensors:
    """The stacked trainable parameters ``p`` plus the frozen ones, the same
    for every one of the ``k`` stacked clients (expanded, not copied)."""
    if not consts:
        return p
    k = next(iter(p.values())).shape[0]
    return {**p, **{name: c.expand(k, *c.shape) for name, c in consts.items()}}


def _epoch_batches(
    n: int, task: TrainTask, generator: Callable[[], torch.Generator], deadline: Deadline
) -> list[np.ndarray]:
    """The record indices of each step, as LocalTrainer._train_sgd draws them.
    When one batch holds all ``n`` records, every step is the whole client in
    some order, and the order changes a batch's loss only by float rounding:
    the records are then taken in order and no permutation is drawn."""
    if n <= task.batch_size:
        return [np.arange(n)] * task.epochs
    g = generator()
    batches: list[np.ndarray] = []
    for _ in range(task.epochs):
        deadline.check()
        order = torch.randperm(n, generator=g).numpy()
        batches.extend(order[s:s + task.batch_size] for s in range(0, n, task.batch_size))
    return batches


def _whole_clients(n: list[int], offsets: list[int], steps: int, device: torch.device) -> _Batches:
    """:class:`_Batches` when every step of every client is all its records
    (each fits in one batch, see :func:`_epoch_batches`): one ``(k, width)``
    pattern, the same at every step (expanded, not copied)."""
    width = max(n)
    cols = np.arange(width)
    mask = (cols < np.asarray(n)[:, None]).astype(np.float32)
    idx = np.asarray(offsets)[:, None] + cols * (mask > 0)
    weight = mask / np.asarray(n, dtype=np.float32)[:, None]
    idx_t, mask_t, weight_t = (torch.from_numpy(a).to(device).expand(steps, *a.shape) for a in (idx, mask, weight))
    return _Batches(idx_t, mask_t, weight_t, [len(n)] * steps, repeated=True)


def _pad(plan: list[list[np.ndarray]], offsets: list[int], device: torch.device) -> _Batches:
    """Per-client lists of per-step record indices → :class:`_Batches`, built
    with a fixed number of numpy operations whatever the number of batches (on
    arrays this small a numpy call costs a fraction of a torch one, which is
    why the plans are numpy arrays too)."""
    k, counts = len(plan), np.array([len(p) for p in plan])
    steps = int(counts.max())
    flat = [b for p in plan for b in p]
    lengths = np.array([len(b) for b in flat], dtype=np.int64)
    width = max(1, int(lengths.max(initial=0)))  # every batch may be empty under DP-SGD's Poisson sampling
    client = np.repeat(np.arange(k), counts)  # of each batch
    step = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = np.repeat(client * steps + step, lengths)  # of each record index, in the (k · steps, width) layout
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    start = np.asarray(offsets, dtype=np.int64)
    idx = np.repeat(start, steps * width).reshape(k, steps, width)
    mask = np.zeros((k, steps, width), dtype=np.float32)
    if flat:
        idx.reshape(k * steps, width)[rows, cols] = np.concatenate(flat) + np.repeat(start[client], lengths)
        mask.reshape(k * steps, width)[rows, cols] = 1.0
    idx, mask = idx.transpose(1, 0, 2).copy(), mask.transpose(1, 0, 2).copy()
    weight = mask / np.maximum(mask.sum(axis=2, keepdims=True), 1.0)
    running = (counts[None, :] > np.arange(steps)[:, None]).sum(axis=1).tolist()
    return _Batches(*(torch.from_numpy(a).to(device) for a in (idx, mask, weight)), running)


def stacked_optimizer(task: TrainTask, weights: Tensors, anchor: Tensors) -> Callable[[int, Tensors], None]:
    """``step(j, grads)``: one optimiser step of the first ``j`` stacked
    clients, in place on ``weights``: :func:`~fedtrain.training.optimizer.sgd_step_`
    or :func:`~fedtrain.training.optimizer.adam_step_`, the update
    :class:`~fedtrain.training.optimizer.LocalOptimizer` makes, on the stacked
    tensors. FedProx's ``mu · (w − anchor)`` is added to the gradient first.

    The running clients are a prefix of the stack and all take their ``t``-th
    step together, so one Adam step count per tensor serves them all; momentum
    and moments start as zeros (a zero momentum buffer gives the first step's
    buffer, the gradient), so every step updates prefixes of the same state."""
    mu, wd, lr = task.proximal_mu, task.weight_decay, task.lr
    adam = task.optimizer is Optimizer.ADAM
    first = {k: torch.zeros_like(w) for k, w in weights.items()} if adam or task.momentum else {}
    second = {k: torch.zeros_like(w) for k, w in weights.items()} if adam else {}
    steps: list[torch.Tensor] = []
    prefixes: dict[int, tuple[list[torch.Tensor], ...]] = {}

    def step(j: int, grads: Tensors) -> None:
        if j not in prefixes:  # the same names in the same order at every step of a round
            names = list(grads)
            prefixes[j] = tuple([state[name][:j] for name in names] if state else []
                                for state in (weights, first, second)) + ([anchor[name] for name in names],)
            if adam and not steps:
                steps.extend(adam_step_count() for _ in names)
        p, m, v, a = prefixes[j]
        g = list(grads.values())
        if mu > 0:
            pull = torch._foreach_sub(p, a)
            torch._foreach_mul_(pull, mu)
            g = torch._foreach_add(g, pull)
        if adam:
            adam_step_(p, g, m, v, steps, lr, wd)
        else:
            sgd_step_(p, g, m, lr, task.momentum, wd)

    return step
