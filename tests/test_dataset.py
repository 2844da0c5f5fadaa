"""Loading datasets: digits, the MNIST / CIFAR-10 readers on tiny files in the
exact torchvision layout, custom dataset functions, and the errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrain.config import DataConfig
from fedtrain.data import Dataset, load_dataset
from fedtrain.data.dataset import read_digits, stratified_split


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """An unsigned-byte IDX file as in LeCun's MNIST distribution."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def _make_mnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> dict[str, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        _write_idx(raw / name, array, gz=gz)
    return arrays


def _make_cifar(root: Path, per_batch: int = 3) -> dict[str, dict[bytes, object]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        # protocol 2 and the pre-numpy-2 module name, as in the real files
        payload = pickle.dumps(batch, protocol=2)
        legacy = payload.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert legacy != payload
        (folder / name).write_bytes(legacy)
        batches[name] = batch
    return batches


def test_digits_loads_with_the_right_shapes_and_dtypes() -> None:
    ds = load_dataset(DataConfig(dataset="digits", test_fraction=0.2), seed=0)

    assert isinstance(ds, Dataset)
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (64,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == pytest.approx(0.2 * 1797, abs=1)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert ds.keys is None


def test_digits_test_split_is_stratified_and_seeded() -> None:
    a = load_dataset(DataConfig(dataset="digits", test_fraction=0.25), seed=3)
    b = load_dataset(DataConfig(dataset="digits", test_fraction=0.25), seed=3)
    c = load_dataset(DataConfig(dataset="digits", test_fraction=0.25), seed=4)

    train_share = np.bincount(a.y_train.numpy(), minlength=10) / len(a.y_train)
    test_share = np.bincount(a.y_test.numpy(), minlength=10) / len(a.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_test, c.x_test)


def test_digits_are_scikit_learns_with_its_split() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = read_digits()
    bunch = load_digits()

    np.testing.assert_array_equal(x, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)
    assert x.dtype == bunch.data.dtype and y.dtype == bunch.target.dtype
    for seed, fraction in [(0, 0.2), (3, 0.25), (4, 0.25), (7, 0.013), (11, 0.77)]:
        ds = load_dataset(DataConfig(dataset="digits", test_fraction=fraction), seed=seed)
        x_tr, x_te, y_tr, y_te = train_test_split(
            bunch.data.astype(np.float32) / 16.0, bunch.target, test_size=fraction, stratify=bunch.target,
            random_state=seed,
        )
        assert np.array_equal(ds.x_train.numpy(), x_tr) and np.array_equal(ds.x_test.numpy(), x_te)
        assert np.array_equal(ds.y_train.numpy(), y_tr) and np.array_equal(ds.y_test.numpy(), y_te)


def test_stratified_split_draws_as_scikit_learn_on_ragged_classes() -> None:
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(1)
    for seed in range(12):
        y = rng.permutation(np.repeat(np.arange(5), rng.integers(2, 30, 5)))
        for fraction in (0.3, 0.5):
            want = train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)
            got = stratified_split(y, fraction, seed)
            assert all(np.array_equal(w, g) for w, g in zip(want, got))


def test_stratified_split_refuses_what_cannot_be_stratified() -> None:
    with pytest.raises(ValueError, match=r"test_fraction = 0.01 of 50 records: 49 training and 1 test"):
        stratified_split(np.arange(50) % 5, 0.01, 0)
    with pytest.raises(ValueError, match=r"classes \[2\] have a single record"):
        stratified_split(np.array([0, 0, 1, 1, 2, 0, 1]), 0.5, 0)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_parses_the_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    arrays = _make_mnist(tmp_path, gz=gz)

    ds = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)), seed=0)

    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32
    expected = arrays["train-images-idx3-ubyte"][:, None].astype(np.float32) / 255
    np.testing.assert_allclose(ds.x_train.numpy(), expected)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_bad_magic_is_rejected(tmp_path: Path) -> None:
    _make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)

    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)), seed=0)


def test_cifar10_reader_parses_the_torchvision_layout(tmp_path: Path) -> None:
    batches = _make_cifar(tmp_path)

    ds = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0)

    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(ds.x_train[0].numpy(), first)
    assert ds.y_train.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_reader_refuses_pickles_that_would_run_code(tmp_path: Path) -> None:
    _make_cifar(tmp_path)

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_root_names_data_root_the_path_and_no_download(
    tmp_path: Path, name: str, folder: str
) -> None:
    root = tmp_path / "nowhere"

    with pytest.raises(FileNotFoundError) as info:
        load_dataset(DataConfig(dataset=name, root=str(root)), seed=0)

    message = str(info.value)
    assert "data.root" in message and str(root / folder) in message
    assert "nothing is downloaded at run time" in message


def test_empty_root_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.root = ''.*nothing is downloaded"):
        load_dataset(DataConfig(dataset="mnist", root=""), seed=0)


def test_missing_file_inside_root_names_it(tmp_path: Path) -> None:
    _make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()

    with pytest.raises(FileNotFoundError, match=r"data_batch_4.*nothing is downloaded"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0)


CUSTOM = '''
import numpy as np
import torch
from fedtrain.data import Dataset

def make(seed):
    g = torch.Generator().manual_seed(seed)
    return Dataset(
        name="toy",
        x_train=torch.rand(30, 4, generator=g),
        y_train=torch.arange(30) % 3,
        x_test=torch.rand(6, 4, generator=g),
        y_test=torch.arange(6) % 3,
        num_classes=3,
        input_shape=(4,),
        keys=np.array([f"user{i % 5}" for i in range(30)]),
    )

def not_a_dataset(seed):
    return {"x": 1}

def bad_labels(seed):
    ds = make(seed)
    return Dataset(ds.name, ds.x_train, ds.y_train + 1, ds.x_test, ds.y_test, 3, (4,))

def bad_lengths(seed):
    ds = make(seed)
    return Dataset(ds.name, ds.x_train, ds.y_train[:-1], ds.x_test, ds.y_test, 3, (4,))

def bad_keys(seed):
    ds = make(seed)
    return Dataset(ds.name, ds.x_train, ds.y_train, ds.x_test, ds.y_test, 3, (4,), keys=np.arange(3))
'''


@pytest.fixture()
def custom_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_data.py"
    path.write_text(CUSTOM)
    return path


def test_custom_file_function_is_called_with_the_seed(custom_file: Path) -> None:
    cfg = DataConfig(dataset=f"{custom_file}:make")

    a, b = load_dataset(cfg, seed=7), load_dataset(cfg, seed=7)

    assert a.name == "toy" and a.input_shape == (4,) and a.keys is not None and len(a.keys) == 30
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, load_dataset(cfg, seed=8).x_train)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("not_a_dataset", r"returned dict, expected a fedtrain\.data\.Dataset"),
        ("bad_labels", r"outside \[0, num_classes = 3\)"),
        ("bad_lengths", r"len\(x_train\) = 30 but len\(y_train\) = 29"),
        ("bad_keys", r"keys has shape \(3,\)"),
    ],
)
def test_custom_function_returning_a_bad_dataset_names_data_dataset(
    custom_file: Path, function: str, message: str
) -> None:
    with pytest.raises(ValueError, match=r"data\.dataset = .*" + message):
        load_dataset(DataConfig(dataset=f"{custom_file}:{function}"), seed=0)


def test_custom_function_that_does_not_exist_names_data_dataset(custom_file: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.dataset = .*has no dataset function 'nope'"):
        load_dataset(DataConfig(dataset=f"{custom_file}:nope"), seed=0)
