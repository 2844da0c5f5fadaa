"""Secure DP noise made on the tensor's device: the keystream stays a ChaCha20
stream on the CPU, the device only transforms its words, and the result is the
CPU path's (exactly on the CPU), independent between consecutive draws."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrain.privacy import keystream as keystream_module
from fedtrain.privacy.keystream import Keystream, uniform_from_words
from fedtrain.privacy.mechanisms import add_gaussian_
from fedtrain.privacy.noise import SUMMED_DRAWS, SecureGaussian, box_muller, gaussian_from_words

CPU = torch.device("cpu")
CORRELATION_BOUND = 0.1
"""As in ``tests/test_keystream.py``: with 20,000 values an independent pair's
correlation has a std of about 0.007; a shifted copy correlates at 1."""

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _twins(monkeypatch: pytest.MonkeyPatch) -> tuple[SecureGaussian, SecureGaussian]:
    """Two sources whose keystreams are the same real ChaCha20 stream (key and
    nonce fixed for the test instead of drawn from ``secrets``)."""
    monkeypatch.setattr(keystream_module.secrets, "token_bytes", lambda n: bytes(range(7, 7 + n)))
    first, second = SecureGaussian(), SecureGaussian()
    monkeypatch.undo()
    return first, second


def _lagged_correlations(a: torch.Tensor, b: torch.Tensor, max_lag: int = 64) -> torch.Tensor:
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    out = []
    for lag in range(max_lag + 1):
        for x, y in ((a[: a.numel() - lag], b[lag:]), (a[lag:], b[: b.numel() - lag])):
            n = min(x.numel(), y.numel())
            out.append(torch.corrcoef(torch.stack([x[:n], y[:n]]))[0, 1])
    return torch.stack(out)


@pytest.mark.parametrize("n", [1, 3, 6, 1001, 20_000])  # odd counts and reads that end mid-block
def test_the_device_transform_on_the_cpu_is_the_cpu_path_exactly(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    cpu_path, device_path = _twins(monkeypatch)

    for std in (1.0, 0.37):  # two consecutive draws: both keep reading the stream alike
        want = cpu_path.gaussian(n, std, CPU)
        got = device_path.gaussian_on(n, std, CPU)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert torch.equal(got, want)


def test_twin_streams_are_real_keystreams_not_a_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _twins(monkeypatch)
    assert a._stream.read(64) == b._stream.read(64)
    assert SecureGaussian()._stream.read(64) != a._stream.read(64)  # the patch is undone: fresh keys again


def test_uniforms_from_words_are_the_keystreams_uniforms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keystream_module.secrets, "token_bytes", lambda n: bytes(n))
    a, b = Keystream(), Keystream()
    words = a.words(4097)
    u = uniform_from_words(words)

    assert torch.equal(u, b.uniform(4097))
    assert float(u.min()) > 0.0 and float(u.max()) <= 1.0
    top = torch.tensor([-1, 0, (1 << 63) - 1], dtype=torch.int64)  # all bits set, none, all but the top one
    assert uniform_from_words(top).tolist() == [1.0, 2.0**-53, 0.5]


def test_box_muller_is_the_textbook_expression_bit_for_bit() -> None:
    u = Keystream().uniform(200_002)
    pairs = u.numel() // 2
    radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
    angle = 2.0 * math.pi * u[pairs:]
    want = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])

    assert torch.equal(box_muller(u), want)
    assert torch.equal(box_muller(u[:7]), box_muller(u[:6]))  # an odd uniform is left over


def test_the_keystream_is_chacha20_of_zeros_in_whole_blocks_per_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads write the keystream straight into their result; the bytes are the
    cipher's own, each read starting on a fresh 64-byte block."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    monkeypatch.setattr(keystream_module.secrets, "token_bytes", lambda n: bytes(range(3, 3 + n)))
    stream = Keystream()
    reference = Cipher(algorithms.ChaCha20(bytes(range(3, 35)), bytes(4) + bytes(range(3, 15))), mode=None).encryptor()
    for count in (0, 1, 63, 64, 65, 1000, 8 * 4097, 1_000_003):
        got = stream.read(count)
        assert isinstance(got, bytearray)
        assert bytes(got) == reference.update(bytes(-(-count // 64) * 64))[:count]


def test_consecutive_device_draws_are_independent_at_every_lag() -> None:
    source = SecureGaussian()
    a = source.gaussian_on(20_000, 1.0, CPU)
    b = source.gaussian_on(20_000, 1.0, CPU)
    c = source.gaussian(20_000, 1.0, CPU)  # the CPU path reads on from the same stream

    for x, y in ((a, b), (b, c), (a, c)):
        assert float(_lagged_correlations(x, y).abs().max()) < CORRELATION_BOUND
        assert float(torch.isin(y, x).double().mean()) < 0.01
    assert float(_lagged_correlations(a, a)[2:].abs().max()) < CORRELATION_BOUND


def test_device_draws_have_the_requested_distribution() -> None:
    n, std = 200_001, 2.0
    sample = SecureGaussian().gaussian_on(n, std, CPU).double()

    assert abs(float(sample.mean())) < 6 * std / math.sqrt(n)
    assert abs(float(sample.std()) / std - 1.0) < 6 / math.sqrt(2 * n)
    kurtosis = float(((sample / sample.std()) ** 4).mean())
    assert abs(kurtosis - 3.0) < 6 * math.sqrt(24 / n)


def test_the_transform_checks_its_draws() -> None:
    words = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="need an even number >= 5"):
        gaussian_from_words([words], 5, 1.0)
    with pytest.raises(ValueError, match="need an even number"):
        gaussian_from_words([torch.zeros(5, dtype=torch.int64)], 5, 1.0)
    with pytest.raises(ValueError, match="no draws"):
        gaussian_from_words([], 2, 1.0)
    with pytest.raises(ValueError, match="noise std = -1"):
        SecureGaussian().gaussian_on(3, -1.0, CPU)
    assert SecureGaussian().gaussian_on(0, 1.0, CPU).shape == (0,)
    assert SUMMED_DRAWS == 4


@needs_cuda
def test_noise_for_a_cuda_tensor_is_made_there_and_matches_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    cpu_path, device_path = _twins(monkeypatch)

    want = cpu_path.gaussian(100_001, 1.5, CPU)
    got = device_path.gaussian(100_001, 1.5, cuda)

    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=2e-7, atol=1e-7)  # float64 libm differences, then one rounding


@needs_cuda
def test_add_gaussian_on_a_cuda_vector_noises_it_in_place() -> None:
    vector = torch.zeros(50_000, device="cuda")
    add_gaussian_(vector, 0.5, SecureGaussian())

    assert vector.device.type == "cuda"
    assert abs(float(vector.std()) - 0.5) < 0.02
