"""Invariants and error cases of :func:`fedtrain.data.partition`."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtrain.config import ConfigError, Partition
from fedtrain.data import partition
from fedtrain.data.partition import _stable_hash

ALL = [p for p in Partition if p is not Partition.NATURAL]
"""The partitioners that split into any data.num_clients; ``natural`` takes
its number from the keys and is tested on its own at the end."""
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


# --- natural: one client per key ------------------------------------------------------------------------------


def test_natural_gives_one_client_per_key_in_sorted_key_order() -> None:
    rng = np.random.default_rng(0)
    keys = rng.permutation(np.array([f"play/ROLE{i % 7}" for i in range(300)]))

    parts = partition(Partition.NATURAL, _labels(300), 7, rng, keys=keys)

    assert [sorted(set(keys[p].tolist())) for p in parts] == [[f"play/ROLE{i}"] for i in range(7)]
    _assert_exact_cover(parts, 300)


def test_natural_draws_nothing_and_ignores_the_seed() -> None:
    keys = np.array(["b", "a", "c", "a", "b"])
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state

    a = partition(Partition.NATURAL, np.zeros(5), 3, rng, keys=keys)
    b = partition(Partition.NATURAL, np.zeros(5), 3, np.random.default_rng(99), keys=keys)

    assert rng.bit_generator.state == before
    assert [p.tolist() for p in a] == [p.tolist() for p in b] == [[1, 3], [0, 4], [2]]


def test_natural_takes_targets_of_any_shape_by_their_keys() -> None:
    from fedtrain.data.partition import partition_labels

    targets = np.zeros((6, 80), dtype=np.int64)  # a language model's next characters
    keys = np.array(["x", "y"] * 3)

    parts = partition(Partition.NATURAL, partition_labels(targets, Partition.NATURAL), 2,
                      np.random.default_rng(0), keys=keys)

    assert [p.tolist() for p in parts] == [[0, 2, 4], [1, 3, 5]]


def test_natural_with_another_number_of_clients_names_the_keys_and_the_fix() -> None:
    keys = np.array(["hamlet/HAM", "hamlet/HOR", "lear/LEAR", "lear/FOOL", "hamlet/HAM"])

    with pytest.raises(ConfigError, match=r"data\.num_clients = 20 with data\.partition = 'natural': the data "
                                          r"set's keys name 4 clients \('hamlet/HAM', 'hamlet/HOR', 'lear/FOOL', "
                                          r"\.\.\., 'lear/LEAR'\); set data\.num_clients = 4"):
        partition(Partition.NATURAL, np.zeros(5), 20, np.random.default_rng(0), keys=keys)


def test_natural_without_keys_is_one_client_per_record() -> None:
    parts = partition(Partition.NATURAL, np.zeros(4), 4, np.random.default_rng(0))

    assert [p.tolist() for p in parts] == [[0], [1], [2], [3]]


def _keyed_dataset(keys: list[str] | None):  # type: ignore[no-untyped-def]
    import torch

    from fedtrain.data import Dataset

    n = 6 if keys is None else len(keys)
    x = torch.arange(n * 4, dtype=torch.int64).reshape(n, 4)
    return Dataset("keyed", x, x + 1, x[:2], x[:2] + 1, 100, (4,), None if keys is None else np.array(keys))


def test_the_run_takes_natural_clients_from_the_data_sets_keys() -> None:
    from fedtrain import config
    from fedtrain.run import client_partitions

    cfg = config.load(None, ["data.partition=natural", "data.num_clients=3", "strategy.clients_per_round=2"])
    data = _keyed_dataset(["lear/FOOL", "hamlet/HAM", "lear/FOOL", "hamlet/HOR", "hamlet/HAM"])

    parts = client_partitions(cfg, data)  # data.key is 'index' by default: natural uses the keys all the same

    assert {cid: p.tolist() for cid, p in parts.items()} == {"0": [1, 4], "1": [3], "2": [0, 2]}


@pytest.mark.parametrize(
    ("keys", "num_clients", "message"),
    [
        (None, 3, r"data\.partition = 'natural': dataset 'keyed' has no key column"),
        (["a", "b", "a"], 3, r"data\.num_clients = 3 .*keys name 2 clients \('a', 'b'\); set data\.num_clients = 2"),
    ],
)
def test_the_run_refuses_natural_clients_it_cannot_make(
    keys: list[str] | None, num_clients: int, message: str
) -> None:
    from fedtrain import config
    from fedtrain.run import client_partitions

    cfg = config.load(None, ["data.partition=natural", f"data.num_clients={num_clients}",
                             "strategy.clients_per_round=2"])

    with pytest.raises(ConfigError, match=message):
        client_partitions(cfg, _keyed_dataset(keys))
