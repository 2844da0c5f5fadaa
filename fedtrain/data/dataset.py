"""Datasets as in-memory tensors, loaded by name from a small registry.

Built-in names are ``digits`` (the copy bundled with scikit-learn, no files), ``mnist`` and
``cifar10`` (read from ``data.root`` in the on-disk layout that torchvision's
``datasets.MNIST`` / ``datasets.CIFAR10`` leave after a download). Any other
name is a ``'package.module:function'`` or ``'path/to/file.py:function'`` that
returns a :class:`Dataset`.

The MNIST and CIFAR-10 readers are our own few lines of numpy rather than
torchvision: the formats are tiny and fixed, and torchvision would pull a
CUDA build of torch. Nothing is ever downloaded at run time: a federated run
must be reproducible offline and must not reach the network unannounced.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fedtrain.config import DataConfig
from fedtrain.errors import DataError, MissingFileError


@dataclass(frozen=True)
class Dataset:
    """Training and test split of one dataset, whole, before partitioning.

    ``x_*`` are tensors of shape ``(N, *input_shape)`` and ``y_*`` one target
    per record, of the dtypes and shapes the run's task needs (for
    classification ``float32`` inputs and ``int64`` labels in
    ``[0, num_classes)``; for a language model int64 token ids and ``num_classes``
    the vocabulary size; for regression ``float32`` targets and
    ``num_classes`` the number of outputs). ``keys`` holds one key per
    training record for ``range`` / ``hash`` partitioning (a user id, a
    timestamp, ...); ``None`` means the record index serves as its key.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    keys: np.ndarray | None = None


Loader = Callable[[DataConfig, int], Dataset]


def _from_numpy(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
    )


def _load_digits(cfg: DataConfig, seed: int) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 records, 10 classes), pixels scaled
    from 0..16 to [0, 1], shape ``(64,)``. The test split is a stratified
    ``data.test_fraction`` of the records, drawn with ``seed``, so every class
    keeps its share in both splits."""
    x, y = read_digits()
    x = x.astype(np.float32) / 16.0
    y = y.astype(np.int64)
    train, test = stratified_split(y, cfg.test_fraction, seed)
    return _from_numpy("digits", x[train], y[train], x[test], y[test], 10)


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The pixels (float64, 0..16, shape ``(1797, 64)``) and labels of the digits,
    exactly as ``sklearn.datasets.load_digits()`` returns ``data`` and
    ``target``: read from the same file, scikit-learn's bundled
    ``datasets/data/digits.csv.gz``, in the same way. The file is found
    without importing scikit-learn, whose package import (scipy with it)
    costs more than a short run's training."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1], data[:, -1].astype(int, copy=False)
    raise MissingFileError(
        "data.dataset = 'digits' reads the copy of the digits that scikit-learn ships "
        f"(sklearn/datasets/data/digits.csv.gz); not found in {folders or 'any installed scikit-learn'}: "
        "install scikit-learn"
    )


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and test indices: ``ceil(test_fraction · len(y))`` test records,
    every class keeping its share (to within a record), drawn with ``seed``.

    The same indices in the same order as scikit-learn's ``train_test_split(...,
    test_size=test_fraction, stratify=y, random_state=seed)`` (its
    ``StratifiedShuffleSplit``, the same draws from a ``RandomState(seed)``),
    so the digits' splits are the ones runs have always used, without
    importing scikit-learn's model selection (and scipy)."""
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    where = f"data.test_fraction = {test_fraction!r} of {n} records"
    if n_train < 1 or n_test < 1:
        raise DataError(f"{where}: a split needs at least one training and one test record")
    if class_counts.min() < 2:
        raise DataError(f"{where}: classes {classes[class_counts < 2].tolist()} have a single record, "
                         "which cannot be stratified")
    if min(n_train, n_test) < len(classes):
        raise DataError(f"{where}: {n_train} training and {n_test} test records cannot both hold "
                         f"each of the {len(classes)} classes")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    in_train = _approximate_mode(class_counts, n_train, rng)
    in_test = _approximate_mode(class_counts - in_train, n_test, rng)
    train: list[np.integer] = []
    test: list[np.integer] = []
    for i in range(len(classes)):
        shuffled = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(shuffled[: in_train[i]])
        test.extend(shuffled[in_train[i] : in_train[i] + in_test[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``n_draws`` records each class gets: its floored share, then
    one more for the largest remainders, ties broken at random (scikit-learn's
    ``utils.extmath._approximate_mode``, draw for draw)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add = min(len(tied), need)
            floored[rng.choice(tied, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def _root(cfg: DataConfig, name: str, folder: str) -> Path:
    path = Path(cfg.root).expanduser() / folder
    if not cfg.root or not path.is_dir():
        raise MissingFileError(
            f"data.root = {cfg.root!r}: data.dataset = {name!r} looked for the folder {path} "
            f"(the layout torchvision's datasets leave after a download); nothing is downloaded "
            f"at run time: fetch the files once and set data.root to the folder that holds {folder!r}"
        )
    return path


def _find(cfg: DataConfig, folder: Path, filename: str) -> Path:
    for candidate in (folder / filename, folder / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    raise MissingFileError(
        f"data.root = {cfg.root!r}: missing {folder / filename} (or {filename}.gz); "
        "nothing is downloaded at run time"
    )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format): 2 zero bytes, a type byte (0x08 =
    unsigned byte), a dimension count, then big-endian uint32 sizes and the raw
    data. Gzipped files (``.gz``) are read transparently."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def _load_mnist(cfg: DataConfig, seed: int) -> Dataset:
    """MNIST from ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    (or ``.gz``), pixels /255, shape ``(1, 28, 28)``. The official 60k/10k
    split is used: ``data.test_fraction`` and ``seed`` are ignored."""
    raw = _root(cfg, "mnist", "MNIST/raw")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(cfg, raw, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(cfg, raw, f"{prefix}-labels-idx1-ubyte"))
        arrays[split] = (images[:, None].astype(np.float32) / 255.0, labels)
    return _from_numpy("mnist", *arrays["train"], *arrays["test"], 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data folder is not
    trusted code, and a general pickle can run anything on load."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2; a pure function
    }
    _NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        # numpy 2 renamed numpy.core to numpy._core; the real CIFAR files use the old name.
        old, new = ("numpy.core", "numpy._core") if self._NUMPY2 else ("numpy._core", "numpy.core")
        if module.startswith(old + "."):
            module = new + module[len(old):]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: a pickled dict with ``b"data"`` (uint8,
    ``(N, 3072)``, channel-major) and ``b"labels"`` (N ints)."""
    with path.open("rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def _load_cifar10(cfg: DataConfig, seed: int) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``,
    pixels /255 (no per-channel normalisation), shape ``(3, 32, 32)``. The
    official 50k/10k split is used: ``data.test_fraction`` and ``seed`` are
    ignored."""
    folder = _root(cfg, "cifar10", "cifar-10-batches-py")
    parts = [_read_cifar_batch(_find(cfg, folder, f"data_batch_{i}")) for i in range(1, 6)]
    x_te, y_te = _read_cifar_batch(_find(cfg, folder, "test_batch"))
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    return _from_numpy(
        "cifar10", x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te, 10
    )


DIABETES_FILES = ("diabetes_data_raw.csv.gz", "diabetes_target.csv.gz")
"""scikit-learn's bundled diabetes files (in ``sklearn/datasets/data``): the
10 unscaled features and the disease-progression target of 442 patients."""


def read_diabetes() -> tuple[np.ndarray, np.ndarray]:
    """The raw features (float64, shape ``(442, 10)``: age, sex, BMI, blood
    pressure and six serum measurements) and targets (float64, ``(442,)``, a
    measure of disease progression one year on, 25..346) of the diabetes
    data, exactly as ``sklearn.datasets.load_diabetes(scaled=False)`` returns
    ``data`` and ``target``: read from the same files in the same way. As for
    :func:`read_digits`, the files are found next to the installed
    scikit-learn without importing it (its import, scipy with it, costs more
    than a run on 442 records)."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        paths = [Path(folder, "datasets", "data", name) for name in DIABETES_FILES]
        if all(path.is_file() for path in paths):
            x, y = (np.loadtxt(path) for path in paths)  # whitespace-separated; numpy un-gzips .gz
            if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
                raise DataError(
                    f"data.dataset = 'diabetes': {paths[0]} holds shape {x.shape} and {paths[1]} {y.shape}, "
                    "expected (records, features) and (records,)"
                )
            return x, y
    raise MissingFileError(
        "data.dataset = 'diabetes' reads the copy of the diabetes data that scikit-learn ships "
        f"(sklearn/datasets/data/{' and '.join(DIABETES_FILES)}); not found in "
        f"{folders or 'any installed scikit-learn'}: install scikit-learn"
    )


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``train`` and ``test`` shifted and scaled by the training split's mean
    and standard deviation along axis 0 (a constant column keeps scale 1):
    only the training split's statistics, so that nothing of the test split
    leaks into what the model sees before it is evaluated."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _load_diabetes(cfg: DataConfig, seed: int) -> Dataset:
    """scikit-learn's diabetes regression data (442 patients, 10 features,
    one real-valued target; :func:`read_diabetes`) for ``task.name =
    'regression'``: ``float32`` x ``(N, 10)``, ``float32`` y ``(N,)``,
    ``num_classes = 1`` (one output). The test split is a random
    ``ceil(data.test_fraction · 442)`` records drawn with ``seed`` (a
    continuous target has no classes to stratify by).

    Features *and* target are standardised with the training split's mean
    and standard deviation (only the training split's, so nothing of the
    test split leaks into training). The raw target is about 152 ± 77: the
    squared errors and their gradients are then ~10⁴ times a unit-scale
    target's, and the default MLP diverges within five rounds at every
    ``client.lr`` from 0.01 up (measured; 0.001 converges, slowly). On the
    standardised target ``client.lr`` 0.01 to 0.08 converge; the default
    0.3, tuned for cross-entropy on digits, still diverges: it is above the
    ``2 / λ_max ≈ 0.09`` that the squared error of the default 128-wide MLP
    allows at initialisation (its hidden biases alone keep that below 0.3
    however the features are scaled), so run this data set with
    ``client.lr = 0.05``. ``r2`` is unchanged by an affine rescaling of the
    target, so the reported score is the raw data's; ``mse`` is in units of
    the training target's variance (multiply by about 77² for raw units)."""
    x, y = read_diabetes()
    n = len(y)
    n_test = math.ceil(cfg.test_fraction * n)
    if n_test < 1 or n_test >= n:
        raise DataError(
            f"data.test_fraction = {cfg.test_fraction!r} of {n} records: a split needs at least one "
            "training and one test record"
        )
    order = np.random.RandomState(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = _standardise(x[train], x[test])
    y_train, y_test = _standardise(y[train], y[test])

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return Dataset(
        name="diabetes",
        x_train=tensor(x_train),
        y_train=tensor(y_train),
        x_test=tensor(x_test),
        y_test=tensor(y_test),
        num_classes=1,
        input_shape=(x.shape[1],),
    )


LOADERS: dict[str, Loader] = {
    "digits": _load_digits,
    "diabetes": _load_diabetes,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
}
"""Built-in dataset loaders by ``data.dataset`` name."""


def _check(ds: Dataset, spec: str) -> Dataset:
    """Reject a dataset the engine would choke on later, naming ``data.dataset``:
    its shape and lengths here; the dtypes and target ranges its task needs
    are the task's check (:meth:`fedtrain.training.task.Task.check_data`)."""
    where = f"data.dataset = {spec!r}"
    if not isinstance(ds.num_classes, int) or ds.num_classes < 1:
        raise DataError(f"{where}: num_classes = {ds.num_classes!r}, expected an integer >= 1")
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        for name, value in ((f"x_{split}", x), (f"y_{split}", y)):
            if not isinstance(value, torch.Tensor) or value.dim() < 1:
                got = f"a {value.dim()}-D tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
                raise DataError(f"{where}: {name} must be a tensor with one row per record, got {got}")
        if len(x) != len(y):
            raise DataError(f"{where}: len(x_{split}) = {len(x)} but len(y_{split}) = {len(y)}")
        if not y.is_floating_point() and len(y) and (int(y.min()) < 0 or int(y.max()) >= ds.num_classes):
            raise DataError(
                f"{where}: y_{split} holds integer targets {int(y.min())}..{int(y.max())}, "
                f"outside [0, num_classes = {ds.num_classes})"
            )
        if tuple(x.shape[1:]) != tuple(ds.input_shape):
            raise DataError(
                f"{where}: x_{split} samples have shape {tuple(x.shape[1:])}, "
                f"input_shape says {ds.input_shape}"
            )
    if len(ds.x_train) == 0:
        raise DataError(f"{where}: the training split is empty")
    if ds.keys is not None and (np.ndim(ds.keys) != 1 or len(ds.keys) != len(ds.y_train)):
        raise DataError(
            f"{where}: keys has shape {np.shape(ds.keys)}, expected one key per training record "
            f"({len(ds.y_train)},)"
        )
    return ds


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset ``cfg.dataset`` names: a built-in from :data:`LOADERS`, or
    ``'module:function'`` / ``'file.py:function'`` called as ``function(seed)``,
    which must return a :class:`Dataset`. Either way the result is checked
    (dtypes, lengths, label range, keys) before the engine sees it."""
    if cfg.dataset == "shakespeare":  # LEAF's federated Shakespeare; the play parser is imported only when used
        from fedtrain.data.shakespeare import load_corpus

        c = load_corpus(cfg)  # the split is the text's own: no seed
        return _check(Dataset(
            "shakespeare", torch.from_numpy(c.x_train), torch.from_numpy(c.y_train), torch.from_numpy(c.x_test),
            torch.from_numpy(c.y_test), c.vocabulary.size, (c.seq_len,), c.train_keys,
        ), cfg.dataset)
    loader = LOADERS.get(cfg.dataset)
    if loader is not None:
        return _check(loader(cfg, seed), cfg.dataset)
    from fedtrain.strategy import load_object

    function = load_object(cfg.dataset, "dataset function", "data.dataset", call_with=("seed",))
    if not callable(function):
        raise DataError(f"data.dataset = {cfg.dataset!r}: {function!r} is not callable")
    ds = function(seed)
    if not isinstance(ds, Dataset):
        raise DataError(
            f"data.dataset = {cfg.dataset!r}: the function returned {type(ds).__name__}, "
            "expected a fedtrain.data.Dataset"
        )
    return _check(ds, cfg.dataset)
