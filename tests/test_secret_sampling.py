"""Under DP with secure noise the sample is secret: cohorts and DP-SGD batches
come from a CSPRNG, not from the published ``run.seed``; seeded runs stay
reproducible.

Reproducibility from the seed without DP or with ``secure_noise = false`` is
also covered by tests/test_simulation.py::test_same_seed_gives_bit_identical_metrics,
tests/test_privacy_runs.py::test_reproducible_noise_gives_identical_runs,
tests/test_checkpoint.py::test_resumed_run_equals_uninterrupted_run and
tests/test_batched.py::test_batched_updates_equal_sequential (seeded DP-SGD,
batched equals sequential).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from fedtrain import ParamLayout, config
from fedtrain.aggregation import stack
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import GradSampleMode, PrivacyConfig, PrivacyMode
from fedtrain.data.clients import PartitionedData
from fedtrain.engine import RngStreams
from fedtrain.models import mlp
from fedtrain.privacy.accountant import epsilon_for
from fedtrain.privacy.dpsgd import DpSgdStepper, DpSgdTask
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.privacy.setting import build_policy
from fedtrain.sampling import (
    PoissonSampler,
    Randomness,
    SecretRandomness,
    SeededRandomness,
    UniformSampler,
    secret_sampling,
)
from fedtrain.simulation import simulate
from fedtrain.strategy import load_strategy

CPU = torch.device("cpu")
SYNTHETIC = [
    "data.dataset=synthetic", "data.num_clients=40", "strategy.clients_per_round=8", "run.rounds=3",
    "client.epochs=1",
]
USER_DP = ["privacy.mode=user", "privacy.noise_multiplier=1.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cohorts(monkeypatch: pytest.MonkeyPatch, overrides: Sequence[str]) -> list[tuple[str, ...]]:
    """Every cohort a simulated run draws."""
    drawn: list[tuple[str, ...]] = []
    with monkeypatch.context() as patch:
        for cls in (PoissonSampler, UniformSampler):
            def spy(self: object, clients: Sequence[str], randomness: Randomness, original=cls.sample) -> tuple[str, ...]:
                cohort = original(self, clients, randomness)
                drawn.append(cohort)
                return cohort

            patch.setattr(cls, "sample", spy)
        simulate(config.load(None, SYNTHETIC + list(overrides)))
    return drawn


# ------------------------------------------------------------------ cohorts


@pytest.mark.parametrize("sampling", ["poisson", "uniform"])
def test_secret_cohorts_differ_between_runs_with_the_same_seed(
    sampling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = USER_DP + [f"strategy.sampling={sampling}"]

    first, second = _cohorts(monkeypatch, run), _cohorts(monkeypatch, run)

    assert len(first) == len(second) == 3
    assert first != second


@pytest.mark.parametrize("privacy", [["privacy.secure_noise=false", *USER_DP], []], ids=["seeded-dp", "no-dp"])
@pytest.mark.parametrize("sampling", ["poisson", "uniform"])
def test_seeded_cohorts_repeat_with_the_same_seed(
    sampling: str, privacy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = privacy + [f"strategy.sampling={sampling}"]

    assert _cohorts(monkeypatch, run) == _cohorts(monkeypatch, run)


def test_seeded_cohorts_are_the_draws_they_always_were() -> None:
    clients = [str(k) for k in range(50)]
    expected_rng, rng = np.random.default_rng(3), np.random.default_rng(3)

    poisson = PoissonSampler(0.2).sample(clients, SeededRandomness(rng))
    uniform = UniformSampler(7).sample(clients, SeededRandomness(rng))

    assert poisson == tuple(clients[i] for i in np.flatnonzero(expected_rng.random(50) < 0.2))
    assert uniform == tuple(clients[i] for i in np.sort(expected_rng.choice(50, size=7, replace=False)))


def test_secret_poisson_cohort_sizes_have_the_expected_mean_and_variance() -> None:
    clients = [str(k) for k in range(1000)]
    rate, draws = 0.1, 2000
    randomness = SecretRandomness()

    sizes = np.array([len(PoissonSampler(rate).sample(clients, randomness)) for _ in range(draws)])

    mean, var = len(clients) * rate, len(clients) * rate * (1 - rate)
    assert abs(sizes.mean() - mean) < 6 * math.sqrt(var / draws)
    assert abs(sizes.var(ddof=1) - var) < 6 * var * math.sqrt(2 / (draws - 1))


def test_secret_uniform_cohorts_are_fixed_size_distinct_and_uniform() -> None:
    clients = [str(k) for k in range(100)]
    k, draws = 10, 2000
    randomness = SecretRandomness()
    counts = np.zeros(len(clients), dtype=np.int64)

    for _ in range(draws):
        cohort = UniformSampler(k).sample(clients, randomness)
        assert len(set(cohort)) == k
        counts[[int(c) for c in cohort]] += 1

    p = k / len(clients)
    assert np.abs(counts - draws * p).max() < 6 * math.sqrt(draws * p * (1 - p))


def test_secret_choice_refuses_an_impossible_sample() -> None:
    with pytest.raises(ValueError, match="sample size k = 5: must be in"):
        SecretRandomness().choose(3, 5)


def test_secret_streams_of_one_seed_draw_apart_and_keep_checkpointing() -> None:
    a, b = RngStreams.from_seed(0, secret_cohort=True), RngStreams.from_seed(0, secret_cohort=True)
    seeded = RngStreams.from_seed(0)

    assert not np.array_equal(a.cohort.bernoulli(256, 0.5), b.cohort.bernoulli(256, 0.5))
    assert isinstance(seeded.cohort, SeededRandomness)
    assert a.sampling.bit_generator.state == seeded.sampling.bit_generator.state


@pytest.mark.parametrize(("mode", "secure", "expected"), [
    (PrivacyMode.NONE, True, False),
    (PrivacyMode.USER, True, True),
    (PrivacyMode.SAMPLE, True, True),
    (PrivacyMode.DISTRIBUTED, True, True),
    (PrivacyMode.USER, False, False),
])
def test_samples_are_secret_under_dp_with_secure_noise(mode: PrivacyMode, secure: bool, expected: bool) -> None:
    assert secret_sampling(PrivacyConfig(mode=mode, secure_noise=secure)) is expected


def test_seeded_dp_warns_that_epsilon_assumes_a_secret_seed(caplog: pytest.LogCaptureFixture) -> None:
    def policy_warnings(*extra: str) -> list[str]:
        caplog.clear()
        cfg = config.load(None, SYNTHETIC + USER_DP + ["strategy.sampling=poisson", *extra])
        with caplog.at_level(logging.WARNING, logger="fedtrain.privacy.setting"):
            build_policy(cfg, load_strategy("fedavg", {}), {}, 8.0, GradSampleMode.EW)
        return [r.getMessage() for r in caplog.records]

    seeded = policy_warnings("privacy.secure_noise=false")

    assert len(seeded) == 1
    assert "run.seed = 0" in seeded[0] and "the reported ε assumes the seed is secret" in seeded[0]
    assert policy_warnings() == []


def test_a_secret_cohort_run_resumes(tmp_path: Path) -> None:
    run = SYNTHETIC + USER_DP + ["strategy.sampling=poisson"]
    simulate(config.load(None, run + ["run.rounds=2"]), out_dir=tmp_path)

    resumed = simulate(config.load(tmp_path / "config.toml", ["run.rounds=4"]), out_dir=tmp_path, resume=True)

    assert [r.round for r in resumed.records] == [1, 2, 3, 4]
    assert resumed.records[-1].epsilon == pytest.approx(epsilon_for(1.0, 8 / 40, 4, 1e-5, config.AccountantKind.RDP))


# ---------------------------------------------------------- DP-SGD batches


def _records(sizes: Sequence[int] = (60, 5, 33, 120, 17, 80)) -> PartitionedData:
    g = torch.Generator().manual_seed(0)
    total = sum(sizes)
    x, y = torch.rand(total, 64, generator=g), torch.randint(0, 10, (total,), generator=g)
    bounds = np.cumsum([0, *sizes])
    parts = {str(i): np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))}
    return PartitionedData(x, y, parts, CPU)


def _trainer() -> LocalTrainer:
    torch.manual_seed(0)
    model = mlp((64,), 10, hidden=16)
    return LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU)


def _dp_task(secure: bool, noise_multiplier: float = 0.0) -> TrainTask:
    """A DP-SGD task as a deployed client receives it (through JSON). Without
    noise, the update depends on the records only through which batches
    were drawn."""
    task = TrainTask(
        epochs=2, batch_size=8, lr=0.1,
        privacy=ClientPrivacy(dp_sgd=DpSgdTask(noise_multiplier, 1.0, GradSampleMode.HOOKS, secure_noise=secure)),
    )
    decoded = TrainTask.from_json(json.loads(json.dumps(task.as_json())))
    assert decoded == task
    return decoded


def _train_twice(secure: bool) -> tuple[torch.Tensor, torch.Tensor]:
    data = _records()
    x, y = data.load("3")
    trainer = _trainer()
    params = trainer.layout.flatten(trainer.model.state_dict())
    out = torch.empty((2, params.numel()))
    for row in out:
        trainer.train(params, x, y, _dp_task(secure), torch.Generator().manual_seed(11), row)
    return out[0], out[1]


def test_secret_dp_sgd_batches_differ_with_the_same_seed() -> None:
    first, second = _train_twice(secure=True)

    assert not torch.equal(first, second)


def test_seeded_dp_sgd_batches_repeat_with_the_same_seed() -> None:
    first, second = _train_twice(secure=False)

    assert torch.equal(first, second)


def test_secret_dp_sgd_batch_sizes_have_the_expected_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = DpSgdStepper.noisy_gradient

    def spy(self: DpSgdStepper, x: torch.Tensor, y: torch.Tensor, *rest: object) -> float:
        sizes.append(len(y))
        return original(self, x, y, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(DpSgdStepper, "noisy_gradient", spy)
    n, batch, epochs = 200, 20, 5
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    task = TrainTask(
        epochs=epochs, batch_size=batch, lr=0.1,
        privacy=ClientPrivacy(dp_sgd=DpSgdTask(1.0, 1.0, GradSampleMode.HOOKS, secure_noise=True)),
    )
    trainer = _trainer()
    params = trainer.layout.flatten(trainer.model.state_dict())

    trainer.train(params, x, y, task, torch.Generator().manual_seed(0), torch.empty(params.numel()))

    q, steps = batch / n, epochs * n // batch
    assert len(sizes) == steps
    assert abs(sum(sizes) - steps * n * q) < 6 * math.sqrt(steps * n * q * (1 - q))


def _round(backend: SequentialExecutor | BatchedExecutor, task: TrainTask, params: torch.Tensor) -> torch.Tensor:
    outcome = backend.train_round(1, list(backend.data.ids), task, params)
    assert not outcome.failures
    return stack(outcome.updates).clone()


def test_batched_dp_sgd_draws_secret_batches_and_seeded_ones_match_sequential() -> None:
    data = _records()
    batched_trainer, sequential_trainer = _trainer(), _trainer()
    params = batched_trainer.layout.flatten(batched_trainer.model.state_dict())
    batched = BatchedExecutor(batched_trainer, data, seed=7, strict=True)
    sequential = SequentialExecutor(sequential_trainer, data, seed=7)

    secret = [_round(batched, _dp_task(secure=True), params) for _ in range(2)]
    seeded = _round(batched, _dp_task(secure=False), params)

    assert not torch.equal(secret[0], secret[1])
    assert torch.equal(seeded, _round(batched, _dp_task(secure=False), params))
    torch.testing.assert_close(seeded, _round(sequential, _dp_task(secure=False), params), rtol=0, atol=1e-5)
