"""Splitting the training records among simulated clients.

Each partitioner maps the training labels (and optionally one key per record)
to one sorted ``int64`` index array per client. All of them put every record
on exactly one client and draw only from the seeded ``rng`` they are given, so
a seed reproduces the split; ``range``, ``hash`` and ``natural`` draw nothing
at all and depend only on the keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedtrain.config import ConfigError, Partition

_MAX_DIRICHLET_DRAWS = 1000
_FIX = "lower data.num_clients or set data.allow_empty = true"


@dataclass(frozen=True)
class _Options:
    alpha: float
    shards_per_client: int
    keys: np.ndarray
    allow_empty: bool


def _iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opt: _Options
) -> list[np.ndarray]:
    """A random permutation cut into near-equal parts: the IID baseline."""
    return np.array_split(rng.permutation(len(labels)), num_clients)


def _dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opt: _Options
) -> list[np.ndarray]:
    """Label skew: for each class, the shares of the clients are drawn from
    ``Dir(alpha)`` and the class's records are dealt out in those shares
    (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification"; Yurochkin et al. 2019). Small
    ``alpha`` gives each client few classes, large ``alpha`` tends to IID.

    Unless empty clients are allowed, the whole split is drawn again until
    every client has a record (a bounded number of times)."""
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_clients, opt.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        result = [np.concatenate(p) for p in parts]
        if opt.allow_empty or all(len(p) for p in result):
            return result
    raise ValueError(
        f"data.alpha = {opt.alpha} with data.num_clients = {num_clients}: after {_MAX_DIRICHLET_DRAWS} "
        f"Dirichlet draws some client still got no records; raise data.alpha, {_FIX}"
    )


def _shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opt: _Options
) -> list[np.ndarray]:
    """Pathological non-IID of McMahan et al. 2017 ("Communication-Efficient
    Learning of Deep Networks from Decentralized Data"): sort by label, cut into
    ``num_clients * shards_per_client`` near-equal shards and give each client
    ``shards_per_client`` of them at random, so a client sees few labels."""
    num_shards = num_clients * opt.shards_per_client
    if len(labels) < num_shards:
        raise ValueError(
            f"data.shards_per_client = {opt.shards_per_client} with data.num_clients = {num_clients} "
            f"needs {num_shards} shards but there are only {len(labels)} training records; "
            "lower data.shards_per_client or data.num_clients"
        )
    shuffled = rng.permutation(len(labels))  # random order within each label
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards).reshape(num_clients, opt.shards_per_client)
    return [np.concatenate([shards[s] for s in mine]) for mine in owner]


def _range(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opt: _Options
) -> list[np.ndarray]:
    """Contiguous key ranges of near-equal size (e.g. records by time or by id
    range, as a horizontally sharded database would hold them). Cuts fall only
    between different keys, at the key boundary nearest the equal-size cut, so
    records sharing a key stay on one client."""
    order = np.argsort(opt.keys, kind="stable")
    ordered = opt.keys[order]
    n = len(order)
    boundaries = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, [n]))
    targets = np.arange(1, num_clients) * n / num_clients
    right = np.clip(np.searchsorted(boundaries, targets), 0, len(boundaries) - 1)
    left = np.maximum(right - 1, 0)
    pick_left = (targets - boundaries[left]) <= (boundaries[right] - targets)
    cuts = np.where(pick_left, boundaries[left], boundaries[right])
    return np.split(order, cuts)


def _stable_hash(key: object) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` is
    salted per process for str/bytes)."""
    data = key if isinstance(key, bytes) else str(key).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _hash(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opt: _Options
) -> list[np.ndarray]:
    """Client = stable hash of the key mod ``num_clients``: records sharing a
    key (a user, a device) always land together, whatever the seed."""
    unique, inverse = np.unique(opt.keys, return_inverse=True)
    plain = (k.item() if isinstance(k, np.generic) else k for k in unique)  # np.int64(5) -> 5 -> "5"
    buckets = np.array([_stable_hash(k) % num_clients for k in plain], dtype=np.int64)
    client_of = buckets[inverse.reshape(-1)]
    return [np.flatnonzero(client_of == c) for c in range(num_clients)]


def _natural(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opt: _Options
) -> list[np.ndarray]:
    """The data set's own clients: one per distinct key (a Shakespeare role,
    a user), in sorted key order, so client ``i`` is the ``i``-th smallest key
    whatever the seed or the order of the records (the federated data sets of
    LEAF, Caldas et al. 2018, are split so). Nothing is drawn, and the
    number of clients comes from the data: ``data.num_clients`` must equal
    the number of distinct keys, or the split is refused with that number."""
    unique, inverse = np.unique(opt.keys, return_inverse=True)
    if len(unique) != num_clients:
        plain = [k.item() if isinstance(k, np.generic) else k for k in unique]
        shown = ", ".join(repr(k) for k in plain[:3]) + (f", ..., {plain[-1]!r}" if len(plain) > 3 else "")
        raise ConfigError(
            f"data.num_clients = {num_clients} with data.partition = 'natural': the data set's keys name "
            f"{len(unique)} clients ({shown}); set data.num_clients = {len(unique)}"
        )
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1])


Partitioner = Callable[[np.ndarray, int, np.random.Generator, _Options], list[np.ndarray]]

PARTITIONERS: dict[Partition, Partitioner] = {
    Partition.IID: _iid,
    Partition.DIRICHLET: _dirichlet,
    Partition.SHARDS: _shards,
    Partition.RANGE: _range,
    Partition.HASH: _hash,
    Partition.NATURAL: _natural,
}
"""One partitioner per :class:`~fedtrain.config.Partition` value."""


def partition(
    kind: Partition,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    keys: np.ndarray | None = None,
    allow_empty: bool = False,
) -> list[np.ndarray]:
    """Split record indices ``0..len(labels)-1`` among ``num_clients`` clients.

    Returns one sorted ``int64`` index array per client; every index is on
    exactly one client. ``keys`` (one per record, for ``range`` / ``hash`` /
    ``natural``) defaults to the record index. Unless ``allow_empty``, a
    client without records is an error that names the config keys to change.
    """
    kind = Partition(kind)
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels has shape {labels.shape}, expected one label per record")
    if num_clients < 1:
        raise ValueError(f"data.num_clients = {num_clients}: must be >= 1")
    if alpha <= 0:
        raise ValueError(f"data.alpha = {alpha}: must be > 0")
    if shards_per_client < 1:
        raise ValueError(f"data.shards_per_client = {shards_per_client}: must be >= 1")
    if keys is None:
        keys = np.arange(n)
    keys = np.asarray(keys)
    if keys.shape != (n,):
        raise ValueError(f"keys has shape {keys.shape}, expected one key per record ({n},)")
    if num_clients > n and not allow_empty and kind is not Partition.NATURAL:  # natural: its own check
        raise ValueError(
            f"data.num_clients = {num_clients} with data.partition = {kind.value!r}: there are only "
            f"{n} training records, so some client would get none; {_FIX}"
        )
    opt = _Options(alpha=alpha, shards_per_client=shards_per_client, keys=keys, allow_empty=allow_empty)
    parts = [np.sort(p).astype(np.int64) for p in PARTITIONERS[kind](labels, num_clients, rng, opt)]
    if not allow_empty:
        for client, p in enumerate(parts):
            if len(p) == 0:
                keyed = kind in (Partition.RANGE, Partition.HASH)
                hint = " (or use a data.key with more distinct values)" if keyed else ""
                raise ValueError(
                    f"data.num_clients = {num_clients} with data.partition = {kind.value!r}: "
                    f"client {client} got no records; {_FIX}{hint}"
                )
    return parts


TARGET_BINS = 10
"""Quantile bins a continuous (regression) target is cut into, so that the
label-based partitioners (``dirichlet``, ``shards``) can skew it: each bin
plays a class. Ten, as many as the digits' classes, so that a
``data.alpha`` gives about as much skew as on a 10-class data set, while a
bin of diabetes' 353 training records still holds ~35 of them."""

_LABEL_PARTITIONS = (Partition.DIRICHLET, Partition.SHARDS)


def partition_labels(y: np.ndarray, kind: Partition) -> np.ndarray:
    """The one label per record that :func:`partition` splits by, from the
    training targets ``y``.

    Integer targets of shape ``(N,)`` (class labels) are returned as they are,
    so classification splits are unchanged. A real-valued ``(N,)`` target
    (regression) is cut into :data:`TARGET_BINS` quantile bins of the training
    targets (fewer when many values tie) and each record labelled with its
    bin, ``0`` for the lowest: ``dirichlet`` / ``shards`` then give a client
    mostly low or mostly high targets, the regression analogue of label skew.
    Targets of any other shape (a language model's ``(N, T)`` next tokens,
    several regression outputs) have no one label per record: ``dirichlet`` and
    ``shards`` are refused with a :class:`~fedtrain.config.ConfigError`, and the
    other partitioners, which use only the record count and keys, get a
    placeholder label ``0`` for every record."""
    y = np.asarray(y)
    kind = Partition(kind)
    if y.ndim != 1:
        if kind in _LABEL_PARTITIONS:
            allowed = ", ".join(repr(p.value) for p in Partition if p not in _LABEL_PARTITIONS)
            raise ConfigError(
                f"data.partition = {kind.value!r} splits by one label per record, but the training targets "
                f"have shape {y.shape}; for targets that are not 1-D, allowed: {allowed}"
            )
        return np.zeros(len(y), dtype=np.int64)
    if not np.issubdtype(y.dtype, np.floating):
        return y
    if not np.isfinite(y).all():
        raise ValueError(
            f"data.partition = {kind.value!r}: the training targets hold {int((~np.isfinite(y)).sum())} "
            "non-finite values (NaN or inf), which cannot be binned; clean the data set"
        )
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    inner = np.unique(np.quantile(y, np.linspace(0.0, 1.0, TARGET_BINS + 1)[1:-1]))
    return np.searchsorted(inner, y, side="right").astype(np.int64)
