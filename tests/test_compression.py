"""The codecs, the wire form and its checks, error feedback's store, and the
``[compression]`` table."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrain import config as cfg
from fedtrain.compression import (
    CODECS, HEADER_BYTES, CompressedUpdate, CompressionPlan, Compressed, EncodeState, ResidualStore, Uplink,
    bound_norm, decode, decoded_update, encode, from_wire, kept, randk_indices, randk_seed, rounding_generator,
    to_wire, uncompressed_nbytes,
)
from fedtrain.config import Compression, CompressionConfig, ConfigError
from fedtrain.types import ClientUpdate

N = 1000


def _state(fraction: float = 0.05, block: int = 64, rnd: int = 1) -> EncodeState:
    return EncodeState(torch.Generator().manual_seed(7), fraction, block, randk_seed(0, rnd))


@pytest.mark.parametrize("method", list(Compression))
def test_round_trip_through_the_wire_and_exact_size(method: Compression) -> None:
    v = torch.randn(N)
    c = encode(v, method, _state())
    wire = to_wire(c)
    tensor_bytes = sum(len(b) for b in wire.values() if isinstance(b, bytes))
    assert c.nbytes == HEADER_BYTES + tensor_bytes
    back = from_wire(wire, N)
    assert torch.equal(decode(back, N), decode(c, N))


def test_sizes_per_method() -> None:
    v = torch.randn(N)
    sizes = {m: encode(v, m, _state(0.01, 250)).nbytes - HEADER_BYTES for m in Compression}
    assert sizes[Compression.NONE] == 4 * N == uncompressed_nbytes(N) - HEADER_BYTES
    assert sizes[Compression.FP16] == sizes[Compression.BF16] == 2 * N
    assert sizes[Compression.INT8] == N + 4 * 4
    assert sizes[Compression.INT4] == N // 2 + 4 * 4
    assert sizes[Compression.TOPK] == 8 * kept(N, 0.01)
    assert sizes[Compression.RANDK] == 4 * kept(N, 0.01)


@pytest.mark.parametrize("method", [Compression.INT8, Compression.INT4])
def test_stochastic_rounding_is_unbiased(method: Compression) -> None:
    v = torch.randn(200)
    trials = 3000
    mean = sum(decode(encode(v, method, EncodeState(torch.Generator().manual_seed(s), block=50)), 200)
               for s in range(trials)) / trials
    step = v.abs().max() / (127 if method is Compression.INT8 else 7)
    assert float((mean - v).abs().max()) < 4 * float(step) / math.sqrt(trials) * 2
    nearest = decode(encode(v, method, EncodeState(torch.Generator().manual_seed(0), block=50)), 200)
    assert float((nearest - v).abs().max()) <= float(step) * 1.0001


def test_topk_keeps_the_largest_and_randk_is_shared() -> None:
    v = torch.randn(N)
    d = decode(encode(v, Compression.TOPK, _state(0.02)), N)
    k = kept(N, 0.02)
    assert int((d != 0).sum()) == k
    assert float(d.abs().max()) == float(v.abs().max())
    assert float(v[d == 0].abs().max()) <= float(v[d != 0].abs().min())
    a = encode(torch.randn(N), Compression.RANDK, _state(0.02, rnd=3))
    b = encode(torch.randn(N), Compression.RANDK, _state(0.02, rnd=3))
    other = encode(torch.randn(N), Compression.RANDK, _state(0.02, rnd=4))
    assert torch.equal(decode(a, N) != 0, decode(b, N) != 0)
    assert not torch.equal(decode(a, N) != 0, decode(other, N) != 0)
    assert randk_indices(a.seed, N, k).numel() == k


def test_rounding_coins_depend_on_seed_round_and_client() -> None:
    draws = {(s, r, c): float(torch.rand(1, generator=rounding_generator(s, r, c)))
             for s in (0, 1) for r in (1, 2) for c in ("a", "b")}
    assert len(set(draws.values())) == len(draws)
    assert float(torch.rand(1, generator=rounding_generator(0, 1, "a"))) == draws[(0, 1, "a")]


def _good_wire(method: Compression) -> dict[str, bytes | int]:
    return to_wire(encode(torch.randn(N), method, _state()))


@pytest.mark.parametrize(("method", "key", "value", "message"), [
    (Compression.INT8, "values", b"\x00" * (N - 1), "values for"),
    (Compression.INT8, "scales", b"\x00" * 3, "scale bytes"),
    (Compression.INT8, "block", 0, "block"),
    (Compression.INT8, "block", True, "expected an integer"),
    (Compression.INT4, "values", b"\x00" * 10, "values for"),
    (Compression.TOPK, "indices", b"\x00" * 7, "values for"),
    (Compression.TOPK, "indices", b"\xff" * (4 * kept(N, 0.05)), "strictly increasing"),
    (Compression.NONE, "values", b"\x00" * (4 * N + 2), "whole number"),
    (Compression.NONE, "numel", N + 1, "the model has"),
    (Compression.NONE, "method", 99, "method"),
    (Compression.NONE, "seed", 5, "only randk"),
    (Compression.FP16, "values", "text", "expected bytes"),
    (Compression.RANDK, "values", b"", "values for"),
    (Compression.RANDK, "values", b"\x00" * (4 * (N + 1)), "values for"),
])
def test_hostile_wire_fields_are_refused(method: Compression, key: str, value: object, message: str) -> None:
    fields: dict[str, object] = dict(_good_wire(method))
    fields[key] = value
    with pytest.raises(ValueError, match=message):
        from_wire(fields, N)


def test_wire_refuses_missing_or_extra_keys_and_bad_codes() -> None:
    fields = dict(_good_wire(Compression.INT8))
    with pytest.raises(ValueError, match="expected exactly"):
        from_wire({**fields, "extra": 1}, N)
    with pytest.raises(ValueError, match="expected exactly"):
        from_wire({k: v for k, v in fields.items() if k != "seed"}, N)
    int4 = dict(_good_wire(Compression.INT4))
    int4["values"] = b"\x00" * len(int4["values"])  # code 0 - 8 = -8: outside ±7
    with pytest.raises(ValueError, match="outside"):
        from_wire(int4, N)


def test_bound_norm_keeps_the_decoded_update_within_the_clip() -> None:
    v = torch.randn(N)
    v *= 1.0 / float(v.norm())
    for method in (Compression.INT8, Compression.INT4, Compression.FP16, Compression.BF16):
        c, sent = bound_norm(encode(v * 1.5, method, _state()), 1.0)
        assert float(decode(c, N).norm()) <= 1.0
        assert torch.equal(sent, decode(c, N))


def test_error_feedback_carries_what_was_not_sent() -> None:
    uplink = Uplink(CompressionConfig(up=Compression.TOPK, fraction=0.1), 0, ResidualStore(1 << 20))
    v = torch.randn(N)
    sent = decode(uplink.encode_("a", 1, v, 0.0), N)
    residual = uplink.store.get("a")
    assert torch.allclose(sent + residual, v)
    second = decode(uplink.encode_("a", 2, torch.zeros(N), 0.0), N)
    assert torch.equal(second != 0, decode(encode(residual, Compression.TOPK, _state(0.1)), N) != 0)
    assert uplink.store.get("b") is None
    off = Uplink(CompressionConfig(up=Compression.TOPK, fraction=0.1, error_feedback=cfg.ErrorFeedback.OFF), 0, None)
    assert off.store is None


def test_residual_store_spills_to_disk_and_reads_back(tmp_path) -> None:
    store = ResidualStore(3 * 4 * 100, tmp_path)
    tensors = {str(i): torch.randn(100) for i in range(10)}
    for cid, t in tensors.items():
        store.put_(cid, t)
    assert len(store) == 10 and store.spilled == 7 and len(list(tmp_path.glob("*.pt"))) == 7
    assert torch.equal(store.get("0"), tensors["0"])
    state = store.state_dict()
    assert set(state) == set(tensors) and all(torch.equal(state[k], tensors[k]) for k in tensors)
    fresh = ResidualStore(0, tmp_path / "other")
    fresh.load_state_dict_(state)
    assert torch.equal(fresh.get("9"), tensors["9"])


def test_decoded_update_refuses_a_payload_the_run_does_not_send() -> None:
    plan = CompressionPlan(CompressionConfig(up=Compression.RANDK, fraction=0.1), 0)
    good = plan.uplink.encode_("a", 5, torch.randn(N), 0.0)

    def update(c: Compressed) -> CompressedUpdate:
        return CompressedUpdate(client_id="a", vector=torch.empty(0), num_examples=3, payload=c)

    assert isinstance(decoded_update(update(good), N, 5, plan), ClientUpdate)
    with pytest.raises(ValueError, match="not this round"):
        decoded_update(update(good), N, 6, plan)
    with pytest.raises(ValueError, match="the run sends"):
        decoded_update(update(encode(torch.randn(N), Compression.TOPK, _state())), N, 5, plan)
    with pytest.raises(ValueError, match="compression.up = 'none'"):
        decoded_update(update(good), N, 5, None)


def test_every_method_has_a_codec() -> None:
    assert set(CODECS) == set(Compression)


def _load(**compression: object) -> cfg.Config:
    return cfg.from_dict({"compression": compression, "secure": {}})


def test_config_table_and_checks() -> None:
    c = _load(up="topk", fraction=0.05).compression
    assert c.up is Compression.TOPK and c.feedback
    assert not _load(up="int8").compression.feedback
    assert _load(up="int8", error_feedback=True).compression.feedback
    assert not _load(up="topk", error_feedback=False).compression.feedback
    assert cfg.load().compression == CompressionConfig()
    with pytest.raises(ConfigError, match="compression.error_feedback"):
        _load(error_feedback=True)
    with pytest.raises(ConfigError, match="compression.fraction"):
        _load(up="int8", fraction=0.1)
    with pytest.raises(ConfigError, match="compression.block"):
        _load(up="topk", block=64)
    with pytest.raises(ConfigError, match="allowed values"):
        _load(up="zip")


@pytest.mark.parametrize(("up", "message"), [
    ("topk", "use compression.up = 'randk'"),
    ("int8", "would round twice|round twice"),
    ("int4", "secure.bits"),
    ("fp16", "secure.bits"),
])
def test_secure_aggregation_refuses_codecs_that_do_not_fit(up: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg.from_dict({"compression": {"up": up}, "secure": {"aggregation": True}})
    cfg.from_dict({"compression": {"up": "randk"}, "secure": {"aggregation": True}})


def _torch_quantised(v: torch.Tensor, levels: int, block: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The quantiser as first written, in torch: the reference the numpy
    codec must match bit for bit (the golden digests rest on it)."""
    n = v.numel()
    nb = -(-n // block)
    x = torch.nn.functional.pad(v.float(), (0, nb * block - n)).view(nb, block)
    scales = x.abs().amax(dim=1) / levels
    y = x / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    y.add_(torch.rand(y.shape, generator=generator)).floor_().clamp_(-levels, levels)
    codes = y.flatten()[:n].to(torch.int8)
    decoded = codes.to(torch.float32) * torch.repeat_interleave(scales, block)[:n]
    return codes, scales, decoded


@pytest.mark.parametrize("method", [Compression.INT8, Compression.INT4])
@pytest.mark.parametrize("n, block", [(1000, 64), (1024, 256), (9610, 256), (7, 4), (1, 256), (513, 512)])
def test_quantisers_compute_what_the_torch_formulation_computes(method: Compression, n: int, block: int) -> None:
    levels = 127 if method is Compression.INT8 else 7
    v = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
    v[: min(n, block)] = 0.0  # a block of zeros keeps scale 0
    c = encode(v, method, EncodeState(torch.Generator().manual_seed(3), 0.01, block))
    codes, scales, decoded = _torch_quantised(v, levels, block, torch.Generator().manual_seed(3))
    assert torch.equal(c.scales, scales)
    if method is Compression.INT4:
        pairs = torch.stack([c.values & 15, c.values >> 4], dim=1).flatten()[:n]
        assert torch.equal(pairs.to(torch.int8) - 8, codes)
    else:
        assert torch.equal(c.values, codes)
    assert torch.equal(decode(c, n), decoded)
    assert torch.equal(decode(from_wire(to_wire(c), n), n), decoded)


def test_client_copies_send_whole_then_deltas_and_forget() -> None:
    from fedtrain.compression import ClientCopies, ModelMessage, applied, copy_digest

    config = cfg.load(None, ["compression.down=int8", "compression.residual_memory_mb=0"]).compression
    copies = ClientCopies.of(config, 0)
    assert copies is not None and ClientCopies.of(cfg.load(None, []).compression, 0) is None
    params = torch.randn(N, generator=torch.Generator().manual_seed(1))
    first = copies.message_("a", 1, params)
    assert isinstance(first, ModelMessage) and first.delta is None and torch.equal(first.full, params)
    assert first.nbytes == uncompressed_nbytes(N) and first.digest == copy_digest(params)
    moved = params + 0.01
    second = copies.message_("a", 2, moved)
    assert second.delta is not None and second.base == first.digest
    assert second.nbytes == HEADER_BYTES + N + 4 * -(-N // 256)
    held = applied(params, second.delta)
    assert second.digest == copy_digest(held) and torch.equal(copies.store.get("a"), held)
    assert copies.store.spilled == 1, "copies beyond compression.residual_memory_mb live on disk"
    other = copies.message_("b", 2, moved)
    assert other.delta is None, "a client without a copy gets the whole model"
    copies.forget_("a")
    assert "a" not in copies and copies.message_("a", 3, moved).delta is None


def test_residual_store_discards_in_memory_and_on_disk(tmp_path) -> None:
    store = ResidualStore(0, tmp_path)
    store.put_("a", torch.ones(4))
    store.put_("b", torch.ones(4))
    assert store.spilled == 2 and len(list(tmp_path.glob("*.pt"))) == 2
    store.discard_("a")
    assert store.get("a") is None and len(list(tmp_path.glob("*.pt"))) == 1
    big = ResidualStore(1 << 20)
    big.put_("c", torch.ones(4))
    big.discard_("c")
    assert len(big) == 0 and big.get("c") is None
