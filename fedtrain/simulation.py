"""``simulate``: a whole federated run in this process, from a config.

The run is built by :mod:`fedtrain.run`, as a deployment's is; a simulation
differs only in reaching its clients through an in-process executor.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtrain.compression import CompressionPlan
from fedtrain.config import Config
from fedtrain.curves import plot_curves
from fedtrain.results import Plot
from fedtrain.run import (
    RunResult, build_engine, build_strategy, build_trainable, client_data, in_process_executor, run_engine,
)
from fedtrain.training.canary import CanaryPlan
from fedtrain.training.trainer import resolve_device


def simulate(
    config: Config,
    out_dir: str | Path | None = None,
    progress: bool = False,
    resume: bool = False,
    trust_checkpoint: bool = False,
    plot: Plot = plot_curves,
    canaries: CanaryPlan | None = None,
) -> RunResult:
    """Run ``config`` in process; write the run folder when ``out_dir`` is given.

    Everything that can be checked is checked before the first round: data,
    partition, model, strategy and device. With ``resume`` the run continues
    from the last valid checkpoint in ``out_dir`` (``run.rounds`` may grow;
    any other change of config is refused) and ends exactly as an
    uninterrupted run would. ``trust_checkpoint`` accepts a checkpoint and a
    ledger journal that do not verify under the run key (see
    :mod:`fedtrain.checkpoint`); they are still read as data only. ``plot``
    draws the folder's ``curves.png`` (the CLI passes a
    :class:`~fedtrain.curves.CurvesProcess`'s, which draws in a child process).
    ``canaries`` (:func:`fedtrain.audit.audit`) inserts an audit's canary
    records and clients into this same run; the clients join the population
    at the configured sampling rate.
    """
    started = time.perf_counter()
    device = resolve_device(config.client.device)
    clients = client_data(config, device)
    strategy, secure = build_strategy(config)
    test_set = (clients.x_test, clients.y_test)
    trainable = build_trainable(config, clients.input_shape, clients.num_classes, test_set, device)
    compression = CompressionPlan.of(
        config.compression, config.run.seed, None if out_dir is None else Path(out_dir) / "residuals"
    )
    data = clients.data if canaries is None else canaries.add_records_(clients.data)
    executor = in_process_executor(config, trainable.trainer, data, secure, compression)
    sizes = {cid: data.size(cid) for cid in data.ids}
    population = None
    if canaries is not None:
        executor = canaries.wrap_executor_(executor, trainable.trainer)
        population = len(sizes)
        sizes.update(canaries.extra_clients())
    engine = build_engine(config, strategy, executor, trainable, test_set, sizes, compression=compression,
                          population=population)
    return run_engine(config, engine, trainable, trainable.initial_params(), out_dir, progress, resume,
                      started, trust_checkpoint, plot, trainable.trainer.objective.metric_names)
