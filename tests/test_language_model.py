"""The language-model task through every training path: batched equals
sequential (SGD and Adam), DP-SGD runs on the per-sequence loss, the
``auto`` engine says why it trains a transformer one client at a time, and
a whole run reports perplexity."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrain import ParamLayout, config
from fedtrain.config import Optimizer
from fedtrain.data.clients import PartitionedData
from fedtrain.models import gpt
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.config import GradSampleMode
from fedtrain.simulation import simulate
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.task import LanguageModel
from fedtrain.training.train_task import TrainTask
from fedtrain.training.trainer import LocalTrainer

CPU = torch.device("cpu")
VOCAB, T = 12, 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(records: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of a noisy cycle over the vocabulary: learnable next tokens."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (records, 1), generator=g)
    seq = (start + torch.arange(T + 1)) % VOCAB
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=g), seq)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _data(clients: int = 4) -> PartitionedData:
    x, y = _tokens(24 * clients, 0)
    parts = {str(i): np.arange(i * 24, (i + 1) * 24) for i in range(clients)}
    return PartitionedData(x, y, parts, CPU)


def _trainer() -> LocalTrainer:
    torch.manual_seed(0)
    model = gpt((T,), VOCAB, layers=1, heads=2, embedding=16)
    return LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU, LanguageModel())


@pytest.mark.parametrize("optimizer", [Optimizer.SGD, Optimizer.ADAM])
def test_batched_language_model_updates_equal_sequential(optimizer: Optimizer) -> None:
    data = _data()
    task = TrainTask(epochs=2, batch_size=8, lr=0.05 if optimizer is Optimizer.SGD else 0.003, optimizer=optimizer)
    ids = list(data.ids)
    params = ParamLayout.of(_trainer().model.state_dict()).flatten(_trainer().model.state_dict())

    want = SequentialExecutor(_trainer(), data, seed=0).train_round(1, ids, task, params)
    got = BatchedExecutor(_trainer(), data, seed=0, strict=True).train_round(1, ids, task, params)

    assert not want.failures and not got.failures
    # Adam turns float noise in gradients that are zero in exact arithmetic into
    # steps of up to lr; 1e-5 is under 0.5% of one step here.
    atol = 1e-6 if optimizer is Optimizer.SGD else 1e-5
    for w, g in zip(want.updates, got.updates):
        assert w.client_id == g.client_id
        torch.testing.assert_close(g.vector, w.vector, rtol=1e-4, atol=atol)
        assert g.metrics.keys() == w.metrics.keys()


def test_dp_sgd_trains_a_language_model_on_the_per_sequence_loss() -> None:
    data = _data(1)
    trainer = _trainer()
    x, y = data.load("0")
    dp = DpSgdTask(noise_multiplier=0.5, max_grad_norm=1.0, mode=GradSampleMode.HOOKS, secure_noise=False)
    task = TrainTask(epochs=1, batch_size=8, lr=0.1, privacy=ClientPrivacy(dp_sgd=dp))
    params = trainer.layout.flatten(trainer.model.state_dict())
    from fedtrain.privacy.dpsgd import make_private_model

    private = LocalTrainer(make_private_model(trainer.model, False), trainer.layout, CPU, LanguageModel())
    out = torch.empty_like(params)

    result = private.train(params, x, y, task, torch.Generator().manual_seed(0), out)

    assert result.num_examples == len(y)
    assert torch.isfinite(out).all() and float(out.norm()) > 0


def test_auto_engine_names_why_a_transformer_trains_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = gpt((T,), VOCAB, layers=2, heads=4, embedding=64)
    trainer = LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU, LanguageModel())
    data = _data()
    task = TrainTask(epochs=1, batch_size=8, lr=0.003, optimizer=Optimizer.ADAM)
    params = trainer.layout.flatten(model.state_dict())

    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        outcome = BatchedExecutor(trainer, data, seed=0).train_round(1, list(data.ids), task, params)

    assert len(outcome.updates) == 4
    reasons = [r.getMessage() for r in caplog.records if "training one by one" in r.getMessage()]
    assert not reasons or any(("not faster" in r) or ("Adam" in r) for r in reasons), reasons


def _write_token_dataset(folder: Path) -> Path:
    path = folder / "tokens.py"
    path.write_text(f'''
import torch
from fedtrain.data import Dataset

def make(seed):
    g = torch.Generator().manual_seed(seed)
    def tokens(n):
        start = torch.randint(0, {VOCAB}, (n, 1), generator=g)
        seq = (start + torch.arange({T} + 1)) % {VOCAB}
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    x, y = tokens(160)
    xt, yt = tokens(40)
    return Dataset("tokens", x, y, xt, yt, {VOCAB}, ({T},))
''')
    return path


def test_a_language_model_run_reports_perplexity_and_learns(tmp_path: Path) -> None:
    source = _write_token_dataset(tmp_path)
    cfg = config.load(None, [
        "task.name=language_model", f"data.dataset={source}:make", "data.partition=iid", "data.num_clients=4",
        "strategy.clients_per_round=4", "model.name=gpt", "model.layers=1", "model.heads=2", "model.embedding=32",
        "client.optimizer=adam", "client.lr=0.01", "client.epochs=2", "client.batch_size=8", "run.rounds=8",
    ])

    result = simulate(cfg, tmp_path / "run", plot=lambda *a: None)

    rows = [r.as_json() for r in result.records]
    assert list(rows[0])[:4] == ["round", "loss", "perplexity", "accuracy"]
    assert rows[-1]["perplexity"] == pytest.approx(np.exp(rows[-1]["loss"]))
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] > 0.9
    assert result.summary.final_metrics["perplexity"] < VOCAB
    assert result.summary.score == "accuracy"


def test_a_model_whose_output_does_not_fit_the_task_is_refused_before_round_1(tmp_path: Path) -> None:
    source = _write_token_dataset(tmp_path)
    cfg = config.load(None, ["task.name=language_model", f"data.dataset={source}:make", "data.partition=iid",
                             "data.num_clients=2", "strategy.clients_per_round=2", "model.name=mlp"])

    with pytest.raises(ValueError, match=r"the model cannot run on the data.s inputs \(torch.int64 of shape \(2, 16\)\)"):
        simulate(cfg)


def test_a_deployed_client_trains_the_language_model_the_config_names(tmp_path: Path) -> None:
    """The worker behind a deployed client builds the run's task from the
    coordinator's config, trains its own token ids with it, and refuses a
    plug-in task it was not allowed to import."""
    import json as json_module

    from fedtrain.deploy.worker import ClientWorker, PluginRefused
    from fedtrain.transport.relay import Hello

    x, y = _tokens(24, 3)
    np.savez(tmp_path / "own.npz", x=x.numpy(), y=y.numpy())
    cfg = config.load(None, ["task.name=language_model", "model.name=gpt", "model.layers=1", "model.heads=2",
                             "model.embedding=16", "client.lr=0.01", "client.optimizer=adam"])
    worker = ClientWorker("alice", None, tmp_path / "own.npz", "cpu")

    info = worker.hello(Hello(config.to_dict(cfg), (T,), VOCAB))
    trainer = worker._setup[1]  # type: ignore[index]
    params = trainer.layout.flatten(trainer.model.state_dict()).numpy()
    task = TrainTask.of(cfg.client, __import__("fedtrain").RoundPlan(clients=("alice",)), ClientPrivacy())
    reply = worker.train(1, json_module.dumps(task.as_json()), params)

    assert info.num_records == 24 and isinstance(trainer.objective, LanguageModel)
    assert reply.update.shape == params.shape and np.isfinite(reply.update).all() and np.abs(reply.update).max() > 0
    assert reply.metrics["train_loss"] > 0
    plugin = config.to_dict(config.replace(cfg, ["task.name=my_tasks:Mine"]))
    with pytest.raises(PluginRefused, match=r"task.name = 'my_tasks:Mine' is a plug-in"):
        ClientWorker("bob", None, tmp_path / "own.npz", "cpu").hello(Hello(plugin, (T,), VOCAB))
