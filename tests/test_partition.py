"""Invariants and error cases of :func:`fedtrain.data.partition`."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtrain.config import Partition
from fedtrain.data import partition
from fedtrain.data.partition import _stable_hash

ALL = list(Partition)
DIGITS_LIKE = np.repeat(np.arange(10), 100)  # 1,000 records, 100 per class


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    counts = np.bincount(np.concatenate(parts), minlength=n) if parts else np.zeros(n)
    assert len(counts) == n
    assert (counts == 1).all()
    for p in parts:
        assert p.dtype == np.int64
        assert (np.diff(p) > 0).all()


@pytest.mark.parametrize("kind", ALL)
def test_every_record_lands_on_exactly_one_client(kind: Partition) -> None:
    labels = _labels()

    parts = partition(kind, labels, 20, np.random.default_rng(1))

    assert len(parts) == 20
    _assert_exact_cover(parts, len(labels))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("kind", ALL)
def test_same_seed_gives_same_split(kind: Partition) -> None:
    labels = _labels()

    a = partition(kind, labels, 7, np.random.default_rng(42))
    b = partition(kind, labels, 7, np.random.default_rng(42))

    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", [Partition.IID, Partition.DIRICHLET, Partition.SHARDS])
def test_different_seed_gives_different_split(kind: Partition) -> None:
    labels = _labels()

    a = partition(kind, labels, 7, np.random.default_rng(1))
    b = partition(kind, labels, 7, np.random.default_rng(2))

    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ALL)
def test_global_numpy_rng_is_untouched(kind: Partition) -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)

    partition(kind, _labels(), 5, np.random.default_rng(0))

    assert np.random.random() == expected


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(ALL),
    n=st.integers(1, 300),
    num_clients=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0.05, 100.0),
)
def test_exact_cover_for_any_size_with_empty_allowed(
    kind: Partition, n: int, num_clients: int, seed: int, alpha: float
) -> None:
    labels = _labels(n, classes=5, seed=seed)
    shards = 1 if n < 2 * num_clients else 2
    if kind is Partition.SHARDS and n < num_clients:
        return  # fewer records than shards is an error, tested below

    parts = partition(kind, labels, num_clients, np.random.default_rng(seed),
                      alpha=alpha, shards_per_client=shards, allow_empty=True)

    assert len(parts) == num_clients
    _assert_exact_cover(parts, n)


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in partition(Partition.IID, _labels(1003), 10, np.random.default_rng(0))]

    assert max(sizes) - min(sizes) <= 1


def _mean_labels_per_client(parts: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean([len(np.unique(labels[p])) for p in parts]))


def _mean_tv_distance(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance of each client's label histogram to the global one."""
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum()
                          for p in parts]))


def test_dirichlet_small_alpha_skews_labels_far_more_than_iid() -> None:
    labels = DIGITS_LIKE

    skewed = partition(Partition.DIRICHLET, labels, 10, np.random.default_rng(0), alpha=0.1)
    iid = partition(Partition.IID, labels, 10, np.random.default_rng(0))

    assert _mean_tv_distance(skewed, labels) > 0.5
    assert _mean_tv_distance(iid, labels) < 0.15
    assert _mean_labels_per_client(skewed, labels) < _mean_labels_per_client(iid, labels)


def test_dirichlet_large_alpha_is_close_to_iid() -> None:
    parts = partition(Partition.DIRICHLET, DIGITS_LIKE, 10, np.random.default_rng(0), alpha=1000.0)

    assert _mean_tv_distance(parts, DIGITS_LIKE) < 0.15


def test_dirichlet_gives_up_with_a_clear_error_when_clients_stay_empty() -> None:
    labels = np.zeros(30, dtype=np.int64)  # one class, 30 records, 25 clients: near-certain empties

    with pytest.raises(ValueError, match=r"data\.alpha = 0\.01.*data\.num_clients = 25"):
        partition(Partition.DIRICHLET, labels, 25, np.random.default_rng(0), alpha=0.01)


@pytest.mark.parametrize(("num_clients", "shards_per_client"), [(20, 1), (20, 2), (25, 2), (10, 4)])
def test_shards_give_each_client_at_most_shards_per_client_labels(
    num_clients: int, shards_per_client: int
) -> None:
    labels = DIGITS_LIKE  # 100 per class; every shard size here divides 100, so no shard straddles labels

    parts = partition(Partition.SHARDS, labels, num_clients, np.random.default_rng(0),
                      shards_per_client=shards_per_client)

    assert all(len(np.unique(labels[p])) <= shards_per_client for p in parts)
    assert [len(p) for p in parts] == [len(labels) // num_clients] * num_clients
    _assert_exact_cover(parts, len(labels))


def test_shards_fewer_records_than_shards_names_shards_per_client() -> None:
    with pytest.raises(ValueError, match=r"data\.shards_per_client = 3"):
        partition(Partition.SHARDS, np.arange(10) % 2, 5, np.random.default_rng(0), shards_per_client=3)


def test_range_gives_contiguous_key_ranges() -> None:
    keys = np.random.default_rng(0).permutation(1000) * 3  # distinct keys, shuffled

    parts = partition(Partition.RANGE, _labels(), 8, np.random.default_rng(0), keys=keys)

    ranges = [(keys[p].min(), keys[p].max()) for p in parts]
    assert all(hi < lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
    assert [len(p) for p in parts] == [125] * 8


def test_range_without_keys_uses_record_index() -> None:
    parts = partition(Partition.RANGE, _labels(100), 4, np.random.default_rng(0))

    assert [p.tolist() for p in parts] == [list(range(i, i + 25)) for i in range(0, 100, 25)]


def test_range_keeps_equal_keys_together_and_cuts_near_equal_size() -> None:
    keys = np.repeat(np.arange(20), 5)[::-1].copy()  # 20 keys of 5 records each

    parts = partition(Partition.RANGE, _labels(100), 3, np.random.default_rng(0), keys=keys)

    owners = {k: {i for i, p in enumerate(parts) if k in keys[p]} for k in range(20)}
    assert all(len(o) == 1 for o in owners.values())
    assert sorted(len(p) for p in parts) == [30, 35, 35]


def test_range_with_too_few_distinct_keys_names_keys_to_change() -> None:
    keys = np.array([0] * 50 + [1] * 50)

    with pytest.raises(ValueError, match=r"data\.num_clients = 3 with data\.partition = 'range'.*"
                                         r"data\.allow_empty = true"):
        partition(Partition.RANGE, _labels(100), 3, np.random.default_rng(0), keys=keys)


def test_hash_groups_records_sharing_a_key_regardless_of_seed() -> None:
    keys = np.array([f"user{i % 37}" for i in range(1000)])

    a = partition(Partition.HASH, _labels(), 8, np.random.default_rng(0), keys=keys)
    b = partition(Partition.HASH, _labels(), 8, np.random.default_rng(99), keys=keys)

    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for p in a:
        others = np.setdiff1d(np.arange(1000), p)
        assert not set(keys[p]) & set(keys[others])


def test_hash_is_blake2b_of_the_key_text_not_pythons_salted_hash() -> None:
    keys = np.array([10, 11, 12, 13, 14, 15, 16, 17])

    parts = partition(Partition.HASH, np.zeros(8, dtype=np.int64), 3, np.random.default_rng(0),
                      keys=keys, allow_empty=True)

    for client, p in enumerate(parts):
        assert all(_stable_hash(str(int(k))) % 3 == client for k in keys[p])
    assert _stable_hash("abc") == _stable_hash(b"abc") == int.from_bytes(
        hashlib.blake2b(b"abc", digest_size=8).digest(), "little")


def test_hash_empty_client_names_the_keys_to_change() -> None:
    keys = np.array(["a"] * 10)  # one key: every record on one client

    with pytest.raises(ValueError, match=r"data\.num_clients = 4 with data\.partition = 'hash': client \d+ "
                                         r"got no records; lower data\.num_clients or set data\.allow_empty"):
        partition(Partition.HASH, np.zeros(10, dtype=np.int64), 4, np.random.default_rng(0), keys=keys)


@pytest.mark.parametrize("kind", ALL)
def test_more_clients_than_records_is_a_clear_error(kind: Partition) -> None:
    with pytest.raises(ValueError, match=r"data\.num_clients = 50 .*only 10 training records"):
        partition(kind, np.arange(10) % 3, 50, np.random.default_rng(0))


@pytest.mark.parametrize("kind", [Partition.IID, Partition.DIRICHLET, Partition.RANGE, Partition.HASH])
def test_more_clients_than_records_with_allow_empty_yields_empty_clients(kind: Partition) -> None:
    parts = partition(kind, np.arange(10) % 3, 50, np.random.default_rng(0), allow_empty=True)

    assert len(parts) == 50
    _assert_exact_cover(parts, 10)
    assert any(len(p) == 0 for p in parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, r"data\.num_clients = 0"),
        ({"alpha": 0.0}, r"data\.alpha = 0\.0"),
        ({"shards_per_client": 0}, r"data\.shards_per_client = 0"),
        ({"keys": np.arange(5)}, r"one key per record"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict, message: str) -> None:
    args = {"num_clients": 4, **kwargs}
    num_clients = args.pop("num_clients")

    with pytest.raises(ValueError, match=message):
        partition(Partition.IID, _labels(100), num_clients, np.random.default_rng(0), **args)


def test_kind_may_be_given_as_its_string_value() -> None:
    parts = partition("iid", _labels(100), 4, np.random.default_rng(0))  # type: ignore[arg-type]

    _assert_exact_cover(parts, 100)
