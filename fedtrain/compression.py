"""Compressed vectors on the wire: one codec per method, error feedback, and
the downlink's broadcast state.

Each codec (:data:`CODECS`, keyed by :class:`~fedtrain.config.Compression`)
is a pair of pure functions: ``encode(vector, state) -> Compressed`` and
``decode(compressed, numel) -> vector``. A :class:`Compressed` value holds
only plain tensors and integers, what a transport sends as raw little-endian
bytes (:func:`to_wire` / :func:`from_wire`); its :attr:`Compressed.nbytes`
is exactly what it occupies there.

- ``fp16`` / ``bf16``: a cast (an fp16 value above 65504 becomes ±inf, and
  the coordinator refuses the update as not finite).
- ``int8`` / ``int4``: blocks of ``compression.block`` coordinates, each with
  a float32 scale ``max|x| / L`` (``L`` = 127 or 7) and codes rounded
  stochastically, ``floor(x / scale + u)`` with ``u ~ U[0, 1)``, which is
  unbiased (QSGD, Alistarh et al. 2017), so the aggregate stays unbiased. The
  rounding coins are experiment randomness (a seeded generator from the run
  seed, round and client: :func:`rounding_generator`), not a secret.
- ``topk``: the ``fraction · numel`` largest coordinates by magnitude, as
  int32 indices and float32 values.
- ``randk``: that many coordinates drawn from the round's shared seed
  (:func:`randk_seed`, ``SeedSequence([seed, round, RANDK_TAG])``), so every
  client keeps the same ones and only the values travel. Values are sent
  **unscaled** (not multiplied by ``1 / fraction``): the scaled estimator is
  unbiased but multiplies the variance by ``1 / fraction``, and error
  feedback, on by default for ``randk``, needs a contraction (Stich et al.
  2018 analyse the unscaled rand-k); without error feedback randk shrinks the
  update to ``fraction`` of it on average.

Error feedback (Stich et al. 2018; Karimireddy et al. 2019): what a client
did not send (``v − decode(encode(v))``) is added to its next update. It is
client state, a :class:`ResidualStore` keyed by client id (memory up to a
budget, the rest spilled to disk). Under a clip (user-level or distributed
DP) the value sent is scaled so that its *decoded* norm stays within the clip
(:func:`bound_norm`), the residual included: the coordinator's norm check
runs on the decoded update and a compressed update cannot exceed the clip.

The downlink: a simulation models one broadcast copy that every client
shares (:class:`Downlink`); a deployment keeps each client's own copy on the
coordinator (:class:`ClientCopies`), sends each client a delta against it,
and names copies by :func:`copy_digest` so that both ends provably hold the
same bits. Either way the coordinator aggregates into its own model.

The quantisers run in numpy around torch's rounding coins (numpy's
overhead per operation is the smaller one on model-sized vectors): the same
IEEE float32 operations, so the codes and scales are bit for bit what the
torch formulation gives.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, cast, runtime_checkable

import numpy as np
import torch

from fedtrain.config import Compression, CompressionConfig
from fedtrain.types import AggregateUpdate, ClientUpdate

RANDK_TAG = 0x52414E44
"""Mixed into the randk seed (``SeedSequence([seed, round, RANDK_TAG])``) so
that the coordinates are a stream of their own."""

ROUNDING_TAG = 0x524F554E
"""Mixed into the stochastic-rounding seed of a client's round."""

DOWNLINK_CLIENT = "\x00downlink"
"""The rounding stream of the coordinator's broadcast (no client has this id)."""

HEADER_BYTES = 45
"""The fixed header of a :class:`Compressed` value on the wire: method (u8),
numel (u64), block (u32), seed (u64) and the byte lengths of ``values``,
``scales`` and ``indices`` (u64 each): 1 + 8 + 4 + 8 + 3 · 8 = 45."""

MAX_NUMEL = 1 << 40
"""The largest vector :func:`from_wire` accepts (a 4 TiB float32 model)."""

_LEVELS = {Compression.INT8: 127, Compression.INT4: 7}
_METHOD_CODES = {m: i for i, m in enumerate(Compression)}
_CODE_METHODS = {i: m for m, i in _METHOD_CODES.items()}
_WIRE_KEYS = frozenset({"method", "numel", "block", "seed", "values", "scales", "indices"})
_EMPTY_F32 = torch.empty(0, dtype=torch.float32)
_EMPTY_I32 = torch.empty(0, dtype=torch.int32)


@dataclass(frozen=True)
class Compressed:
    """One compressed vector of ``numel`` float32 values.

    ``values``: the payload (float32 for ``none`` / ``topk`` / ``randk``,
    float16 / bfloat16 for the casts, int8 codes for ``int8``, uint8 bytes of
    two 4-bit codes each, low nibble first, ``code + 8``, for ``int4``).
    ``scales``: float32, one per block (``int8`` / ``int4``), else empty.
    ``indices``: int32, strictly increasing (``topk``), else empty.
    ``block``: coordinates per scale (``int8`` / ``int4``), else 0.
    ``seed``: the round's coordinate seed (``randk``), else 0.
    """

    method: Compression
    numel: int
    values: torch.Tensor
    scales: torch.Tensor = _EMPTY_F32
    indices: torch.Tensor = _EMPTY_I32
    block: int = 0
    seed: int = 0

    @property
    def nbytes(self) -> int:
        """The bytes it occupies on the wire: :data:`HEADER_BYTES` plus the
        raw bytes of its three tensors."""
        return HEADER_BYTES + sum(t.numel() * t.element_size() for t in (self.values, self.scales, self.indices))


def uncompressed_nbytes(numel: int) -> int:
    """What an uncompressed float32 vector of ``numel`` values costs: the
    ``none`` codec's :attr:`Compressed.nbytes`."""
    return HEADER_BYTES + 4 * numel


@dataclass(frozen=True)
class EncodeState:
    """What an encoder needs besides the vector: the rounding coins, the
    share of coordinates kept, the block size and the round's randk seed."""

    generator: torch.Generator | None = None
    fraction: float = 1.0
    block: int = 256
    seed: int = 0


class Codec:
    """One method's pair of pure functions."""

    def __init__(
        self,
        encode: Callable[[torch.Tensor, EncodeState], Compressed],
        decode: Callable[[Compressed, int], torch.Tensor],
    ) -> None:
        self.encode = encode
        self.decode = decode


def kept(numel: int, fraction: float) -> int:
    """Coordinates ``topk`` / ``randk`` keep: ``round(fraction · numel)``, at least 1."""
    return max(1, min(numel, round(fraction * numel))) if numel else 0


def randk_seed(seed: int, rnd: int) -> int:
    """The round's coordinate seed, the same for every client (63 bits)."""
    state = np.random.SeedSequence([seed, rnd, RANDK_TAG]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


@functools.lru_cache(maxsize=4)
def randk_indices(seed: int, numel: int, k: int) -> torch.Tensor:
    """The ``k`` coordinates of ``randk`` under ``seed``, sorted (int64); not
    secret: anyone with the seed computes them."""
    chosen = np.random.default_rng(seed).choice(numel, size=k, replace=False)
    chosen.sort()
    return torch.from_numpy(chosen.astype(np.int64))


def secure_coordinates(method: Compression, fraction: float, seed: int, rnd: int, numel: int) -> torch.Tensor | None:
    """The coordinates a secure round sums under ``compression.up = 'randk'``:
    the round's kept ones (:func:`randk_indices`), which every client keeps,
    so SecAgg+ runs on their ``k`` values alone; None for any other method
    (the whole vector is summed)."""
    if method is not Compression.RANDK:
        return None
    return randk_indices(randk_seed(seed, rnd), numel, kept(numel, fraction))


def rounding_generator(seed: int, rnd: int, client_id: str) -> torch.Generator:
    """The stochastic-rounding coins of one client's update in one round."""
    name = int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "little")
    state = np.random.SeedSequence([seed, rnd, name, ROUNDING_TAG]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _check(c: Compressed, numel: int, method: Compression) -> None:
    if c.method is not method:
        raise ValueError(f"compressed with {c.method.value!r}, decoded as {method.value!r}")
    if c.numel != numel:
        raise ValueError(f"compressed vector of {c.numel} values, the model has {numel}")


def _expect(t: torch.Tensor, name: str, dtype: torch.dtype, length: int) -> None:
    if t.dtype != dtype or t.shape != (length,):
        raise ValueError(f"{name} is {t.dtype} of shape {tuple(t.shape)}, expected {dtype} of shape ({length},)")


def _plain_encode(v: torch.Tensor, state: EncodeState) -> Compressed:
    return Compressed(Compression.NONE, v.numel(), v.detach().to(torch.float32, copy=True).cpu())


def _plain_decode(c: Compressed, numel: int) -> torch.Tensor:
    _check(c, numel, Compression.NONE)
    _expect(c.values, "values", torch.float32, numel)
    return c.values.clone()


def _cast(method: Compression, dtype: torch.dtype) -> Codec:
    def encode(v: torch.Tensor, state: EncodeState) -> Compressed:
        return Compressed(method, v.numel(), v.detach().cpu().to(dtype))

    def decode(c: Compressed, numel: int) -> torch.Tensor:
        _check(c, numel, method)
        _expect(c.values, "values", dtype, numel)
        return c.values.to(torch.float32)

    return Codec(encode, decode)


def _blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _quantiser(method: Compression) -> Codec:
    levels = _LEVELS[method]

    def encode(v: torch.Tensor, state: EncodeState) -> Compressed:
        if state.generator is None:
            raise ValueError(f"compression {method.value!r} rounds stochastically: pass a generator")
        n, block = v.numel(), state.block
        nb = _blocks(n, block)
        flat = v.detach().cpu().float().numpy()
        x = (flat if nb * block == n else np.pad(flat, (0, nb * block - n))).reshape(nb, block)
        scales = np.abs(x).max(axis=1) / np.float32(levels)
        y = x / np.where(scales > 0, scales, np.float32(1))[:, None]
        y += torch.rand((nb, block), generator=state.generator).numpy()
        codes = np.clip(np.floor(y, out=y), -levels, levels, out=y).reshape(-1)[:n].astype(np.int8)
        if method is Compression.INT4:
            nibbles = (codes + np.int8(8)).view(np.uint8)
            if n % 2:
                nibbles = np.append(nibbles, np.uint8(8))
            values = nibbles[0::2] | (nibbles[1::2] << np.uint8(4))
        else:
            values = codes
        return Compressed(method, n, torch.from_numpy(values), torch.from_numpy(scales), block=block)

    def decode(c: Compressed, numel: int) -> torch.Tensor:
        _check(c, numel, method)
        if c.block < 1:
            raise ValueError(f"block = {c.block}, expected >= 1")
        nb = _blocks(numel, c.block)
        _expect(c.scales, "scales", torch.float32, nb)
        if method is Compression.INT4:
            _expect(c.values, "values", torch.uint8, -(-numel // 2))
            packed = c.values.numpy()
            stored = np.stack([packed & np.uint8(15), packed >> np.uint8(4)], axis=1).reshape(-1)[:numel]
            if stored.size and stored.min() == 0:
                raise ValueError(f"a {method.value} code outside ±{levels}")
            codes = stored.astype(np.float32) - np.float32(8)
        else:
            _expect(c.values, "values", torch.int8, numel)
            stored = c.values.numpy()
            if stored.size and stored.min() < -levels:
                raise ValueError(f"a {method.value} code outside ±{levels}")
            codes = stored.astype(np.float32)
        padded = nb * c.block
        if padded != numel:
            codes = np.pad(codes, (0, padded - numel))
        out = codes.reshape(nb, c.block)
        out *= c.scales.numpy()[:, None]
        return torch.from_numpy(out.reshape(-1)[:numel])

    return Codec(encode, decode)


def _sparse_decode(c: Compressed, numel: int, indices: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(numel, dtype=torch.float32)
    out[indices] = c.values
    return out


def _topk_encode(v: torch.Tensor, state: EncodeState) -> Compressed:
    n = v.numel()
    if n >= 1 << 31:
        raise ValueError(f"topk indices are int32: a vector of {n} values is too long")
    flat = v.detach().cpu().float()
    idx = flat.abs().topk(kept(n, state.fraction), sorted=False).indices.sort().values
    return Compressed(Compression.TOPK, n, flat[idx].clone(), indices=idx.to(torch.int32))


def _topk_decode(c: Compressed, numel: int) -> torch.Tensor:
    _check(c, numel, Compression.TOPK)
    k = c.indices.numel()
    _expect(c.indices, "indices", torch.int32, k)
    _expect(c.values, "values", torch.float32, k)
    if k > numel:
        raise ValueError(f"{k} indices for a vector of {numel} values")
    idx = c.indices.to(torch.int64)
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
        raise ValueError(f"topk indices must be strictly increasing within 0 … {numel - 1}")
    return _sparse_decode(c, numel, idx)


def _randk_encode(v: torch.Tensor, state: EncodeState) -> Compressed:
    n = v.numel()
    idx = randk_indices(state.seed, n, kept(n, state.fraction))
    return Compressed(Compression.RANDK, n, v.detach().cpu().float()[idx].clone(), seed=state.seed)


def _randk_decode(c: Compressed, numel: int) -> torch.Tensor:
    _check(c, numel, Compression.RANDK)
    k = c.values.numel()
    _expect(c.values, "values", torch.float32, k)
    if k > numel:
        raise ValueError(f"{k} randk values for a vector of {numel} values")
    return _sparse_decode(c, numel, randk_indices(c.seed, numel, k))


CODECS: Mapping[Compression, Codec] = {
    Compression.NONE: Codec(_plain_encode, _plain_decode),
    Compression.FP16: _cast(Compression.FP16, torch.float16),
    Compression.BF16: _cast(Compression.BF16, torch.bfloat16),
    Compression.INT8: _quantiser(Compression.INT8),
    Compression.INT4: _quantiser(Compression.INT4),
    Compression.TOPK: Codec(_topk_encode, _topk_decode),
    Compression.RANDK: Codec(_randk_encode, _randk_decode),
}
"""The codec of every method."""


def encode(vector: torch.Tensor, method: Compression, state: EncodeState) -> Compressed:
    """``vector`` compressed with ``method``."""
    return CODECS[method].encode(vector, state)


def decode(compressed: Compressed, numel: int) -> torch.Tensor:
    """The float32 vector of ``numel`` values ``compressed`` stands for; a
    payload that does not fit ``numel`` or its method raises ``ValueError``."""
    return CODECS[compressed.method].decode(compressed, numel)


def _scaled(c: Compressed, factor: float) -> Compressed:
    if c.method in _LEVELS:
        return replace(c, scales=c.scales * factor)
    return replace(c, values=(c.values.to(torch.float32) * factor).to(c.values.dtype))


def bound_norm(c: Compressed, clip: float) -> tuple[Compressed, torch.Tensor]:
    """``c`` scaled down until its decoded norm is within ``clip``, and that
    decoded vector. Stochastic rounding can lift a clipped update above the
    clip, and error feedback adds a residual; the coordinator refuses a
    decoded update above the clip, so the client bounds what it sends."""
    decoded = decode(c, c.numel)
    margin = 1e-6
    for _ in range(32):
        norm = float(torch.linalg.vector_norm(decoded))
        if not norm > clip:
            return c, decoded
        c = _scaled(c, clip / norm * (1.0 - margin))
        decoded = decode(c, c.numel)
        margin *= 4
    raise ValueError(f"could not bound the compressed update's norm to the clip {clip}")


class ResidualStore:
    """Error-feedback residuals by client id, only for clients that have one:
    up to ``memory_bytes`` in memory (the most recently used), the rest
    spilled to ``folder`` (a temporary folder when None), so a population of
    100k clients costs disk, not memory."""

    def __init__(self, memory_bytes: int, folder: Path | None = None) -> None:
        self.memory_bytes = memory_bytes
        self._folder = folder
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._held = 0
        self._spilled: dict[str, Path] = {}

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    @property
    def spilled(self) -> int:
        """How many residuals are on disk."""
        return len(self._spilled)

    def _dir(self) -> Path:
        if self._folder is None:
            self._temp = tempfile.TemporaryDirectory(prefix="fedtrain-residuals-")
            self._folder = Path(self._temp.name)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def get(self, client_id: str) -> torch.Tensor | None:
        """The client's residual, or None when it has none."""
        if client_id in self._memory:
            self._memory.move_to_end(client_id)
            return self._memory[client_id]
        path = self._spilled.pop(client_id, None)
        if path is None:
            return None
        residual = torch.load(path, weights_only=True)
        path.unlink()
        self.put_(client_id, residual)
        return residual

    def put_(self, client_id: str, residual: torch.Tensor) -> None:
        """Keep ``residual`` as the client's, spilling the least recently used beyond the budget."""
        old = self._memory.pop(client_id, None)
        if old is not None:
            self._held -= old.numel() * old.element_size()
        stale = self._spilled.pop(client_id, None)
        if stale is not None:
            stale.unlink(missing_ok=True)
        self._memory[client_id] = residual
        self._held += residual.numel() * residual.element_size()
        while self._held > self.memory_bytes and self._memory:
            cid, tensor = self._memory.popitem(last=False)
            self._held -= tensor.numel() * tensor.element_size()
            path = self._dir() / (hashlib.sha256(cid.encode()).hexdigest()[:40] + ".pt")
            torch.save(tensor, path)
            self._spilled[cid] = path

    def discard_(self, client_id: str) -> None:
        """Forget the client's tensor, in memory or on disk."""
        held = self._memory.pop(client_id, None)
        if held is not None:
            self._held -= held.numel() * held.element_size()
        path = self._spilled.pop(client_id, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every residual by client id (spilled ones read back), for a checkpoint."""
        state = {cid: torch.load(path, weights_only=True) for cid, path in self._spilled.items()}
        state.update(self._memory)
        return state

    def load_state_dict_(self, state: Mapping[str, torch.Tensor]) -> None:
        for path in self._spilled.values():
            path.unlink(missing_ok=True)
        self._memory.clear()
        self._spilled.clear()
        self._held = 0
        for cid, residual in state.items():
            self.put_(str(cid), residual)


@dataclass(kw_only=True, frozen=True)
class CompressedUpdate(ClientUpdate):
    """A client's update as it crossed the wire: ``payload`` is what was sent
    and ``vector`` is empty; the coordinator decodes it at intake
    (:func:`decoded_update`) before any check or aggregation."""

    payload: Compressed


def _state(method: Compression, seed: int, rnd: int, stream: str, fraction: float, block: int) -> EncodeState:
    """What ``method`` needs to encode client ``stream``'s vector in round
    ``rnd``: rounding coins for the quantisers, the round's coordinate seed
    for ``randk``, nothing else (each is drawn only where it is used)."""
    return EncodeState(
        rounding_generator(seed, rnd, stream) if method in _LEVELS else None, fraction, block,
        randk_seed(seed, rnd) if method is Compression.RANDK else 0,
    )


class Uplink:
    """The client side of ``compression.up``: error feedback and encoding.

    One instance serves every client of a simulation (residuals keyed by
    client id) or the one client of a warm ``fedtrain client`` process."""

    def __init__(self, config: CompressionConfig, seed: int, store: ResidualStore | None) -> None:
        if config.feedback and store is None:
            raise ValueError("error feedback needs a residual store")
        self.method = config.up
        self.fraction = config.fraction
        self.block = config.block
        self.seed = seed
        self.store = store if config.feedback else None

    def encode_(self, client_id: str, rnd: int, vector: torch.Tensor, clip: float) -> Compressed:
        """``vector`` (plus the client's residual) compressed, bounded to
        ``clip`` when it is positive; the client's residual becomes what
        was not sent."""
        v = vector.detach().to(device="cpu", dtype=torch.float32)
        residual = self.store.get(client_id) if self.store is not None else None
        if residual is not None:
            v = v + residual
        c = encode(v, self.method, _state(self.method, self.seed, rnd, client_id, self.fraction, self.block))
        if clip > 0:
            c, sent = bound_norm(c, clip)
            if self.store is not None:
                self.store.put_(client_id, v - sent)
        elif self.store is not None:
            self.store.put_(client_id, v - decode(c, c.numel))
        return c

    def compress_(self, rnd: int, update: ClientUpdate, clip: float, dense: bool = False) -> ClientUpdate:
        """The update as its client sends it: a :class:`CompressedUpdate`, or
        with ``dense`` (``randk`` under secure aggregation, which masks the
        whole vector) the decoded vector written back into ``update.vector``."""
        c = self.encode_(update.client_id, rnd, update.vector, clip)
        if dense:
            update.vector.copy_(decode(c, c.numel))
            return update
        return CompressedUpdate(
            client_id=update.client_id, vector=_EMPTY_F32, num_examples=update.num_examples, kind=update.kind,
            metrics=update.metrics, contributors=update.contributors, payload=c,
        )

    def secure_coordinates(self, rnd: int, numel: int) -> torch.Tensor | None:
        """The coordinates this client masks in secure round ``rnd`` (:func:`secure_coordinates`)."""
        return secure_coordinates(self.method, self.fraction, self.seed, rnd, numel)

    def refusal(self, c: Compressed, rnd: int, numel: int) -> str | None:
        """Why the coordinator refuses payload ``c`` in round ``rnd``: not
        the configured method, or randk coordinates not the round's."""
        if c.method is not self.method:
            return f"compressed with {c.method.value!r}, the run sends {self.method.value!r}"
        if c.method is Compression.RANDK:
            if c.seed != randk_seed(self.seed, rnd):
                return "randk coordinates are not this round's"
            if c.values.numel() != kept(numel, self.fraction):
                return f"{c.values.numel()} randk values, the round keeps {kept(numel, self.fraction)}"
        return None


class Downlink:
    """The coordinator side of ``compression.down``: the clients' copy of the
    model, one broadcast state for all.

    Round 1 (and the first round after a resume without the state) sends the
    model uncompressed; every later round sends ``params − copy`` compressed
    once, and clients train from ``copy + decode(delta)``, which becomes the
    new copy. What a delta leaves out is still in the next round's delta,
    so the broadcast state is its own error feedback (``error_feedback``
    concerns the uplink only). Modelled: one copy that every client shares,
    as when every client took part in every earlier round; not modelled: a
    client that missed rounds (a deployment keeps each client's copy,
    :class:`ClientCopies`)."""

    def __init__(self, config: CompressionConfig, seed: int) -> None:
        self.method = config.down
        self.fraction = config.fraction
        self.block = config.block
        self.seed = seed
        self.copy: torch.Tensor | None = None

    def broadcast_(self, rnd: int, params: torch.Tensor) -> tuple[torch.Tensor, int]:
        """What the clients train from this round, and the bytes each received."""
        if self.copy is None or self.copy.shape != params.shape:
            self.copy = params.detach().clone()
            return self.copy, uncompressed_nbytes(params.numel())
        c = encode(params - self.copy, self.method,
                   _state(self.method, self.seed, rnd, DOWNLINK_CLIENT, self.fraction, self.block))
        self.copy = self.copy + decode(c, c.numel).to(self.copy.device)
        return self.copy, c.nbytes


DIGEST_CHARS = 32
"""Hex digits of a copy's :func:`copy_digest` (128 bits of SHA-256)."""


def copy_digest(vector: torch.Tensor) -> str:
    """The name of a client's copy of the global model: SHA-256 of its
    float32 little-endian bytes, as :data:`DIGEST_CHARS` hex digits. Both ends
    of a deployed downlink compute it, so a delta is applied only to the copy
    it was made against, and the result is checked to be the same bits on
    the client as on the coordinator."""
    raw = np.ascontiguousarray(vector.detach().cpu().numpy(), dtype="<f4").tobytes()
    return hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class ModelMessage:
    """The global model as one client of a deployment is sent it under
    ``compression.down``: ``full`` (float32, when the coordinator holds no
    copy it can vouch for) or ``delta`` against the client's copy named
    ``base``; ``digest`` names the copy the client holds afterwards (the
    model it trains from)."""

    digest: str
    full: torch.Tensor | None = None
    delta: Compressed | None = None
    base: str = ""

    @property
    def nbytes(self) -> int:
        """What the model costs on the wire, counted as the simulation counts
        it (:attr:`Compressed.nbytes`, or an uncompressed vector)."""
        if self.delta is not None:
            return self.delta.nbytes
        return uncompressed_nbytes(0 if self.full is None else self.full.numel())


def applied(copy: torch.Tensor, delta: Compressed) -> torch.Tensor:
    """The copy after ``delta``: ``copy + decode(delta)`` in float32 on the
    CPU, the same bits on the coordinator and on the client."""
    return copy.detach().cpu().to(torch.float32) + decode(delta, copy.numel())


class ClientCopies:
    """The coordinator's side of ``compression.down`` in a deployment: the
    copy of the global model each client holds, exactly as that client
    decoded it, and the message that brings it up to date.

    A client whose copy is known gets ``params − copy`` compressed (with its
    own rounding stream); the coordinator decodes what it sent and keeps the
    sum as the client's new copy, as the client does. A client without a
    known copy (its first round, a client that failed a round or greeted the
    coordinator again, which may have restarted, or any client after the
    coordinator resumed: copies are not checkpointed) gets the whole model
    as float32. Copies live in a :class:`ResidualStore` (memory up to a
    budget, the rest spilled to disk). What a delta leaves out stays in the
    difference and is sent in a later round, as with the simulation's
    :class:`Downlink`."""

    def __init__(self, config: CompressionConfig, seed: int, store: ResidualStore) -> None:
        self.method = config.down
        self.fraction = config.fraction
        self.block = config.block
        self.seed = seed
        self.store = store
        self._digests: dict[str, str] = {}

    @classmethod
    def of(cls, config: CompressionConfig, seed: int, folder: Path | None = None) -> ClientCopies | None:
        """The copies of a deployment with ``compression.down``, or None
        without; up to ``compression.residual_memory_mb`` in memory, the rest
        in ``folder`` (a temporary folder when None)."""
        if config.down is Compression.NONE:
            return None
        return cls(config, seed, ResidualStore(config.residual_memory_mb << 20, folder))

    def message_(self, client_id: str, rnd: int, params: torch.Tensor) -> ModelMessage:
        """What client ``client_id`` is sent in round ``rnd``; its copy
        becomes what it will decode."""
        target = params.detach().cpu().to(torch.float32)
        base = self._digests.get(client_id)
        copy = self.store.get(client_id) if base is not None else None
        if copy is None or copy.shape != target.shape:
            full = target.clone()
            self._keep_(client_id, full)
            return ModelMessage(self._digests[client_id], full=full)
        c = encode(target - copy, self.method,
                   _state(self.method, self.seed, rnd, DOWNLINK_CLIENT + client_id, self.fraction, self.block))
        self._keep_(client_id, applied(copy, c))
        return ModelMessage(self._digests[client_id], delta=c, base=base or "")

    def _keep_(self, client_id: str, copy: torch.Tensor) -> None:
        self.store.put_(client_id, copy)
        self._digests[client_id] = copy_digest(copy)

    def forget_(self, client_id: str) -> None:
        """The coordinator can no longer vouch for the client's copy: its next model is sent whole."""
        self._digests.pop(client_id, None)
        self.store.discard_(client_id)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._digests


@runtime_checkable
class ModelSender(Protocol):
    """An executor that sends each client the model itself and counts what
    that cost: a deployment's transport, which under ``compression.down``
    sends each client a delta against its own copy (:class:`ClientCopies`).
    The engine hands it the global model unchanged and takes
    ``model_bytes`` as the round's ``bytes_down``."""

    model_bytes: int
    """What the current (or last) round's models cost on the wire, summed
    over the clients they were sent to (:attr:`ModelMessage.nbytes`)."""


class CompressionPlan:
    """A run's compression: the uplink (None for ``up = 'none'``) and the
    downlink (None for ``down = 'none'``), and their state for checkpoints."""

    def __init__(self, config: CompressionConfig, seed: int, folder: Path | None = None) -> None:
        store = ResidualStore(config.residual_memory_mb << 20, folder) if config.feedback else None
        self.uplink = Uplink(config, seed, store) if config.up is not Compression.NONE else None
        self.downlink = Downlink(config, seed) if config.down is not Compression.NONE else None

    @classmethod
    def of(cls, config: CompressionConfig, seed: int, folder: Path | None = None) -> CompressionPlan | None:
        """The plan, or None when nothing is compressed."""
        if config.up is Compression.NONE and config.down is Compression.NONE:
            return None
        return cls(config, seed, folder)

    def state_dict(self) -> dict[str, Any]:
        """Error-feedback residuals and the broadcast copy."""
        state: dict[str, Any] = {}
        if self.uplink is not None and self.uplink.store is not None:
            state["residuals"] = self.uplink.store.state_dict()
        if self.downlink is not None and self.downlink.copy is not None:
            state["broadcast"] = self.downlink.copy.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.uplink is not None and self.uplink.store is not None:
            self.uplink.store.load_state_dict_(state.get("residuals", {}))
        if self.downlink is not None:
            copy = state.get("broadcast")
            self.downlink.copy = None if copy is None else copy.clone()

    def refusal(self, c: Compressed, rnd: int, numel: int) -> str | None:
        """Why payload ``c`` is refused in round ``rnd`` (None when it may be decoded)."""
        if self.uplink is None:
            return "a compressed update, but compression.up = 'none'"
        return self.uplink.refusal(c, rnd, numel)


def decoded_update(
    update: CompressedUpdate, numel: int, rnd: int, plan: CompressionPlan | None, out: torch.Tensor | None = None
) -> ClientUpdate:
    """The plain update ``update`` stands for, its vector decoded (into
    ``out`` when given); ``ValueError`` names why a payload is refused."""
    why = "a compressed update, but compression.up = 'none'" if plan is None else plan.refusal(
        update.payload, rnd, numel
    )
    if why is not None:
        raise ValueError(why)
    vector = decode(update.payload, numel)
    if out is not None:
        vector = out.copy_(vector)
    return ClientUpdate(
        update.client_id, vector, update.num_examples, update.kind, update.metrics, update.contributors
    )


@dataclass(frozen=True, kw_only=True)
class CompactSecureAggregate(AggregateUpdate):
    """A secure round's aggregate when SecAgg+ summed only the round's
    ``randk`` coordinates (:func:`secure_coordinates`): ``vector`` is the
    whole model's layout (zero off those coordinates), and
    ``masked_nbytes`` what each contributor's masked input of ``k`` values
    and its weight cost on the wire, in ring elements."""

    masked_nbytes: int


def wire_nbytes(update: ClientUpdate, numel: int) -> int:
    """The uplink bytes behind ``update``: its payload's, or an uncompressed
    vector per client it stands for (a secure aggregate: each contributor's
    masked vector, counted as float32, the size of the default 32-bit ring;
    a compact one: its contributors' masked inputs as sent; key agreement
    and share messages are not counted)."""
    if isinstance(update, CompressedUpdate):
        return update.payload.nbytes
    if isinstance(update, CompactSecureAggregate):
        return update.masked_nbytes * update.contributors
    return uncompressed_nbytes(numel) * update.contributors


def _le(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array).astype(dtype, copy=False).tobytes()


def to_wire(c: Compressed) -> dict[str, bytes | int]:
    """``c`` as the fields a transport sends: integers and raw little-endian bytes."""
    values = c.values.detach().cpu().contiguous()
    if values.dtype == torch.bfloat16:
        raw = _le(values.view(torch.int16).numpy(), "<i2")
    else:
        raw = _le(values.numpy(), values.numpy().dtype.newbyteorder("<").str)
    return {
        "method": _METHOD_CODES[c.method],
        "numel": c.numel,
        "block": c.block,
        "seed": c.seed,
        "values": raw,
        "scales": _le(c.scales.detach().cpu().numpy(), "<f4"),
        "indices": _le(c.indices.detach().cpu().numpy(), "<i4"),
    }


_VALUE_DTYPES: Mapping[Compression, tuple[str, torch.dtype | None]] = {
    Compression.NONE: ("<f4", None),
    Compression.FP16: ("<f2", None),
    Compression.BF16: ("<i2", torch.bfloat16),
    Compression.INT8: ("i1", None),
    Compression.INT4: ("u1", None),
    Compression.TOPK: ("<f4", None),
    Compression.RANDK: ("<f4", None),
}


def _tensor(raw: bytes, dtype: str, view: torch.dtype | None = None) -> torch.Tensor:
    array = np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="), copy=True)
    t = torch.from_numpy(array)
    return t.view(view) if view is not None else t


def _int_field(fields: Mapping[str, object], key: str, low: int, high: int) -> int:
    value = fields[key]
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"compressed field {key!r} = {value!r}: expected an integer in {low} … {high}")
    return value


def from_wire(fields: Mapping[str, object], numel: int) -> Compressed:
    """The :class:`Compressed` value of a transport's ``fields`` for a model
    of ``numel`` values, every field checked: the keys, the method, the
    counts the method and ``numel`` imply against the byte lengths (a
    declared size is never trusted), and the payload's own structure
    (:func:`decode` runs on it). ``ValueError`` names what is wrong."""
    if not isinstance(fields, Mapping) or set(fields) != _WIRE_KEYS:
        got = sorted(fields) if isinstance(fields, Mapping) else type(fields).__name__
        raise ValueError(f"compressed fields {got}: expected exactly {sorted(_WIRE_KEYS)}")
    for key in ("values", "scales", "indices"):
        if type(fields[key]) is not bytes:
            raise ValueError(f"compressed field {key!r} is a {type(fields[key]).__name__}, expected bytes")
    method = _CODE_METHODS[_int_field(fields, "method", 0, len(_CODE_METHODS) - 1)]
    declared = _int_field(fields, "numel", 0, MAX_NUMEL)
    if declared != numel:
        raise ValueError(f"compressed vector of {declared} values, the model has {numel}")
    block = _int_field(fields, "block", 0, 1 << 20)
    seed = _int_field(fields, "seed", 0, (1 << 63) - 1)
    values, scales, indices = (cast(bytes, fields[k]) for k in ("values", "scales", "indices"))
    dtype, view = _VALUE_DTYPES[method]
    itemsize = np.dtype(dtype).itemsize
    if len(values) % itemsize:
        raise ValueError(f"{len(values)} value bytes: not a whole number of {itemsize}-byte values")
    count = len(values) // itemsize
    quantised = method in _LEVELS
    expected_count = {
        Compression.INT4: -(-numel // 2),
        Compression.TOPK: len(indices) // 4,
    }.get(method, count if method is Compression.RANDK else numel)
    if count != expected_count or (method in (Compression.TOPK, Compression.RANDK) and not 0 < count <= numel):
        raise ValueError(f"{count} values for a {method.value} vector of {numel}: expected {expected_count}")
    if (block >= 1) != quantised:
        raise ValueError(f"block = {block}: expected >= 1 for int8 / int4 and 0 otherwise")
    want_scales = 4 * _blocks(numel, block) if quantised else 0
    if len(scales) != want_scales:
        raise ValueError(f"{len(scales)} scale bytes, expected {want_scales}")
    want_indices = 4 * count if method is Compression.TOPK else 0
    if len(indices) != want_indices:
        raise ValueError(f"{len(indices)} index bytes, expected {want_indices}")
    if seed and method is not Compression.RANDK:
        raise ValueError(f"seed = {seed}: only randk carries one")
    c = Compressed(
        method, numel, _tensor(values, dtype, view), _tensor(scales, "<f4"), _tensor(indices, "<i4"), block, seed
    )
    decode(c, numel)
    return c

