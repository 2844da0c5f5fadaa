"""Synthetic(α, β): generated per client from the seed, memory O(cohort)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedtrain.data.synthetic import CLASSES, DIMENSION, MAX_RECORDS, SyntheticData

CPU = torch.device("cpu")


def test_clients_are_regenerated_identically_from_the_seed() -> None:
    a = SyntheticData(1000, 1.0, 1.0, 0.2, seed=3, device=CPU)
    b = SyntheticData(1000, 1.0, 1.0, 0.2, seed=3, device=CPU)

    xa, ya = a.load("17")
    xb, yb = b.load("17")

    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (a.size("17"), DIMENSION)
    assert ya.dtype == torch.int64 and int(ya.max()) < CLASSES


def test_seed_and_client_change_the_data() -> None:
    a = SyntheticData(10, 1.0, 1.0, 0.2, seed=3, device=CPU)
    b = SyntheticData(10, 1.0, 1.0, 0.2, seed=4, device=CPU)

    assert not torch.equal(a.load("1")[0][:5], b.load("1")[0][:5])
    assert not torch.equal(a.load("1")[0][:5], a.load("2")[0][:5])


def test_sizes_follow_the_lognormal_with_cap() -> None:
    data = SyntheticData(20_000, 0.5, 0.5, 0.2, seed=0, device=CPU)

    totals = np.array([data.size(str(k)) for k in range(0, 20_000, 7)])

    assert totals.min() >= 40 and totals.max() <= MAX_RECORDS
    assert 70 < np.median(totals) < 100  # 0.8 · (e⁴ + 50) ≈ 84


def test_beta_controls_how_much_clients_disagree() -> None:
    def label_spread(beta: float) -> float:
        data = SyntheticData(50, 0.0, beta, 0.2, seed=0, device=CPU)
        shares = [torch.bincount(data.load(str(k))[1], minlength=CLASSES).float() for k in range(50)]
        return float(torch.stack([s / s.sum() for s in shares]).std(dim=0).mean())

    assert label_spread(3.0) > label_spread(0.0)


@pytest.mark.parametrize("iid", [False, True], ids=["non-iid", "iid"])
def test_no_test_record_is_a_client_record(iid: bool) -> None:
    x, y = SyntheticData(300, 1.0, 1.0, 0.2, seed=0, device=CPU, iid=iid).test_set()
    every_record = SyntheticData(300, 1.0, 1.0, 1e-9, seed=0, device=CPU, iid=iid)  # load() returns all records
    client_rows = {row.tobytes() for k in every_record.ids for row in every_record.load(k)[0].numpy()}

    assert len(x) == len(y) > 1000 and x.shape[1] == DIMENSION
    assert not any(row.tobytes() in client_rows for row in x.numpy())


def test_test_set_does_not_depend_on_the_number_of_clients() -> None:
    few = SyntheticData(3, 1.0, 1.0, 0.2, seed=5, device=CPU).test_set()
    many = SyntheticData(100_000, 1.0, 1.0, 0.2, seed=5, device=CPU).test_set()

    assert torch.equal(few[0], many[0]) and torch.equal(few[1], many[1])


def test_test_set_is_generated_from_the_seed() -> None:
    a = SyntheticData(10, 1.0, 1.0, 0.2, seed=5, device=CPU).test_set()
    b = SyntheticData(10, 1.0, 1.0, 0.2, seed=5, device=CPU).test_set()
    other = SyntheticData(10, 1.0, 1.0, 0.2, seed=6, device=CPU).test_set()

    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][:5], other[0][:5])


def test_iid_test_records_are_labelled_by_the_shared_model() -> None:
    data = SyntheticData(10, 1.0, 1.0, 0.2, seed=2, device=CPU, iid=True)
    weights, bias = data._shared_model

    x, y = data.test_set()

    assert np.array_equal(np.argmax(x.numpy().astype(np.float64) @ weights + bias, axis=1), y.numpy())
    assert x.abs().mean() < 1.0  # v = 0: features centred, as every IID client's


def test_negative_heterogeneity_is_an_error() -> None:
    with pytest.raises(ValueError, match="synthetic_alpha = -1"):
        SyntheticData(10, -1.0, 0.0, 0.2, seed=0, device=CPU)


def test_100k_clients_run_in_bounded_memory() -> None:
    code = (
        "import resource; from fedtrain import config; from fedtrain.simulation import simulate\n"
        "cfg = config.load(None, ['data.dataset=synthetic', 'data.num_clients=100000',"
        " 'strategy.clients_per_round=100', 'run.rounds=2', 'client.lr=0.05'])\n"
        "r = simulate(cfg)\n"
        "print(len(r.records), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)

    assert proc.returncode == 0, proc.stderr
    rounds, peak_kib = map(int, proc.stdout.split())
    assert rounds == 2
    assert peak_kib < 4 * 1024 * 1024
    print(f"100k synthetic clients, 2 rounds: peak RSS {peak_kib / 1024:.0f} MiB")
