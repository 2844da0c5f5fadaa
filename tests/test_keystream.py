"""Secret randomness is independent between draws, not only well distributed.

The defect these tests guard against: a ChaCha20 encryptor made anew per draw
with the draw's index in the first nonce bytes, which ``cryptography`` reads
as the block counter, so draw k + 1 was draw k shifted by one 64-byte block.
Every single draw passed every normality test; only a test of independence
between draws (at every lag) catches it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedtrain import ParamLayout, config
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import GradSampleMode
from fedtrain.models import mlp
from fedtrain.privacy import noise as noise_module
from fedtrain.privacy.dpsgd import DpSgdTask, steps_per_round
from fedtrain.privacy.keystream import Keystream
from fedtrain.privacy.noise import SUMMED_DRAWS, SecureGaussian, box_muller
from fedtrain.privacy.policy import ClientPrivacy

CPU = torch.device("cpu")
MAX_LAG = 64
CORRELATION_BOUND = 0.1
"""The issue's bound; with thousands of values an independent pair's
correlation has a std of about 1/√n (≤ 0.015 below), so a pass is no luck, and
the defect gave a correlation of 1 at lag 8."""


def _lagged_correlations(a: torch.Tensor, b: torch.Tensor, max_lag: int = MAX_LAG) -> torch.Tensor:
    """``corr(a[i], b[i + lag])`` and ``corr(a[i + lag], b[i])`` for every lag 0 … max_lag."""
    a, b = a.double().flatten(), b.double().flatten()
    out = []
    for lag in range(max_lag + 1):
        for x, y in ((a[: a.numel() - lag], b[lag:]), (a[lag:], b[: b.numel() - lag])):
            n = min(x.numel(), y.numel())
            out.append(torch.corrcoef(torch.stack([x[:n], y[:n]]))[0, 1])
    return torch.stack(out)


def _repeated_share(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of ``b``'s values that also occur in ``a``."""
    return float(torch.isin(b, a).double().mean())


def test_keystream_reads_never_overlap() -> None:
    stream = Keystream()
    a = torch.frombuffer(stream.read(8 * 4096), dtype=torch.int64)
    b = torch.frombuffer(stream.read(8 * 4096 + 3)[:-3], dtype=torch.int64)  # its odd tail is dropped, not reused
    c = torch.frombuffer(stream.read(8 * 4096), dtype=torch.int64)

    for x, y in ((a, b), (a, c), (b, c)):
        assert _repeated_share(x, y) == 0.0


def test_two_keystreams_differ() -> None:
    assert Keystream().read(64) != Keystream().read(64)


def test_keystream_rekeys_before_the_block_counter_wraps() -> None:
    stream = Keystream()
    stream._left = 128  # two blocks left under this key and nonce
    first = stream.read(128)
    after = stream.read(8 * 512)

    assert stream._left == (1 << 32) * 64 - 8 * 512
    words = torch.frombuffer(bytearray(first + after), dtype=torch.int64)
    assert words.unique().numel() == words.numel()


def test_uniforms_are_in_the_unit_interval_and_bernoulli_has_its_rate() -> None:
    stream = Keystream()
    u = stream.uniform(100_000)
    flips = stream.bernoulli(100_000, 0.3)

    assert float(u.min()) > 0.0 and float(u.max()) <= 1.0
    assert abs(float(u.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / 100_000)
    assert abs(float(flips.double().mean()) - 0.3) < 6 * math.sqrt(0.3 * 0.7 / 100_000)
    with pytest.raises(ValueError, match="probability = 1.5"):
        stream.bernoulli(3, 1.5)


def test_consecutive_gaussian_draws_are_independent_at_every_lag() -> None:
    source = SecureGaussian()
    a = source.gaussian(20_000, 1.0, CPU)
    b = source.gaussian(20_000, 1.0, CPU)

    assert float(_lagged_correlations(a, b).abs().max()) < CORRELATION_BOUND
    # Within one draw too (lag 0 is the draw with itself).
    assert float(_lagged_correlations(a, a)[2:].abs().max()) < CORRELATION_BOUND
    # Float32 normals collide by chance about 4 times in 20,000²; a shifted copy shares nearly all.
    assert _repeated_share(a, b) < 0.01


def test_each_sample_sums_several_normals_against_the_floating_point_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Golden value: the output is Σ of ``SUMMED_DRAWS`` Box–Muller normals,
    scaled by ``std / √SUMMED_DRAWS`` (Opacus' secure_mode; Holohan & Braghin 2021)."""
    draws = [torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64) * (k + 1) / SUMMED_DRAWS
             for k in range(SUMMED_DRAWS)]

    class Recorded:
        def __init__(self) -> None:
            self.calls = 0

        def uniform(self, count: int) -> torch.Tensor:
            self.calls += 1
            return draws[self.calls - 1][:count]

    source = SecureGaussian()
    monkeypatch.setattr(source, "_stream", Recorded())
    out = source.gaussian(3, 2.0, CPU)

    expected = sum(box_muller(d)[:3] for d in draws) * (2.0 / math.sqrt(SUMMED_DRAWS))
    assert SUMMED_DRAWS == 4 and noise_module.SUMMED_DRAWS == 4
    assert torch.equal(out, expected.to(torch.float32))


def test_dp_sgd_updates_of_two_clients_on_one_trainer_are_independent() -> None:
    """One trainer (one noise source) trains two clients one after the other,
    as the sequential engine and a deployed client do. With the noise far above
    the clipped gradients, each update is almost all noise."""
    torch.manual_seed(0)
    model = mlp((16,), 4, hidden=512)
    layout = ParamLayout.of(model.state_dict())
    trainer = LocalTrainer(model, layout, CPU)
    params = layout.flatten(model.state_dict())
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    dp = DpSgdTask(noise_multiplier=1000.0, max_grad_norm=0.01, mode=GradSampleMode.EW, secure_noise=True)
    task = TrainTask(epochs=1, batch_size=16, lr=0.1, momentum=0.0, privacy=ClientPrivacy(dp_sgd=dp))
    assert 8 * steps_per_round(64, 16, 1) <= MAX_LAG  # the old defect's lag lies within the lags tested

    updates = []
    for seed in (1, 2):
        out = torch.empty_like(params)
        trainer.train(params, x, y, task, torch.Generator().manual_seed(seed), out)
        updates.append(out.clone())

    assert params.numel() > 10_000  # a correlation's std 1/√n < 0.01: the bound is 10σ
    assert float(_lagged_correlations(updates[0], updates[1]).abs().max()) < CORRELATION_BOUND


def test_released_models_of_consecutive_rounds_have_independent_noise(tmp_path: Path) -> None:
    """User-level DP with a learning rate of 1e-30: each round's model delta is
    the Gaussian noise alone; read from the run's checkpoints, the deltas of
    consecutive rounds are uncorrelated at every lag from 0 to 64."""
    from fedtrain import checkpoint
    from fedtrain.simulation import simulate

    cfg = config.load(None, [
        "privacy.mode=user", "privacy.noise_multiplier=1.0", "privacy.clip=0.3", "client.lr=1e-30",
        "data.num_clients=10", "strategy.clients_per_round=5", "run.rounds=4", "run.keep_checkpoints=4",
        "privacy.adaptive_clip=true",
    ])
    simulate(cfg, out_dir=tmp_path)
    models = [checkpoint.read(tmp_path / f"checkpoint-{r:06d}.pt").params.double() for r in range(1, 5)]
    deltas = [b - a for a, b in zip(models, models[1:])]

    assert all(float(d.std()) > 0.001 for d in deltas)
    for earlier, later in zip(deltas, deltas[1:]):
        assert float(_lagged_correlations(earlier, later).abs().max()) < CORRELATION_BOUND
