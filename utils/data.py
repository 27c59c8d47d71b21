"""Datasets as tensors on the device: MNIST, Fashion-MNIST and CIFAR-10.

    from utils.data import load_dataset
    ds = load_dataset("mnist", root=None, device="cuda")   # root: argument > $BIODL_DATA > ./data
    ds.X_train.shape, ds.y_train.dtype, ds.classes           # (60000, 1, 28, 28) float32 in [0, 1], int64

Files are read in torchvision's root layout (`MNIST/raw`, `FashionMNIST/raw`, `cifar-10-batches-py`) by this
module's own readers, which check every file's content; missing files are downloaded through torchvision's dataset
classes (which verify the archives' checksums). A root that already holds the data is only ever read.
"""
import gzip
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DATASETS = ("mnist", "fashion", "cifar10")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
SOURCES = {  # where a user can fetch the files by hand
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (or torchvision.datasets.MNIST(root, download=True))",
    "fashion": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
               "(or torchvision.datasets.FashionMNIST(root, download=True))",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked "
               "(or torchvision.datasets.CIFAR10(root, download=True))",
}


class Dataset(NamedTuple):
    X_train: torch.Tensor  # N x C x H x W, float32
    y_train: torch.Tensor  # N, int64
    X_test: torch.Tensor
    y_test: torch.Tensor
    classes: list
    name: str = "custom"  # "mnist", "fashion", "cifar10" from load_dataset: names run folders and study rows


class DataError(RuntimeError):
    """A dataset file is missing, truncated or corrupt; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def data_root(root=None):
    """The data root: the argument, else $BIODL_DATA, else ./data. An empty root (argument) is a DataError, never
    taken as the current folder."""
    if root is not None and not str(root).strip():
        raise DataError("the data root is empty (--data-root \"\" / root=\"\"); give the folder that holds the "
                        "datasets, or leave it out to use $BIODL_DATA, else ./data")
    return Path(root if root is not None else os.environ.get("BIODL_DATA") or "data").expanduser()


def get_device(device=None):
    """`device` as a torch.device; None means the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but torch sees no CUDA GPU; "
                         "pass device='cpu' (or None to pick automatically)")
    return device


def stratified_indices(y, n, seed=0):
    """Sorted indices of `n` examples of labels `y` (array-like), as class-balanced as the counts allow.

    Classes take turns (round r takes the r-th example of every class, in a random order fixed by `seed`), so the
    same y, n and seed always give the same subset and a smaller n gives a subset of a larger one (nested: the
    logger's validation subsets at different max_valid overlap; a larger training subset extends a smaller one).
    """
    y = np.asarray(y)
    perm = np.random.default_rng(seed).permutation(len(y))
    yp = y[perm]
    rank = np.empty(len(y), dtype=np.int64)  # rank of each example within its class in the permuted order
    for c in np.unique(yp):
        where = np.flatnonzero(yp == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((np.arange(len(y)), rank))  # by round, then by position in the permutation
    return np.sort(perm[order[:n]])


def stratified_subset(X, y, n, seed=0):
    """`n` examples of (X, y) chosen by `stratified_indices` (class-balanced, nested in n), in their original
    order; same device as X."""
    if n >= len(y):
        return X, y
    idx = torch.as_tensor(stratified_indices(y.cpu().numpy(), int(n), seed), device=X.device)
    return X[idx], y[idx.to(y.device)]


# ----------------------------------------------------------------------------------------------------------------
# readers: raw file formats, each checked by content. Kept rather than torchvision's MNIST / CIFAR10 classes, which
# read only uncompressed idx files and fail on a bad one with a bare assert or view error (MNIST), or refuse the whole
# folder after md5-hashing every batch on each load without naming the file (CIFAR10); neither checks labels or
# class counts. These name the bad file, accept .gz, and check shapes, headers, labels and counts.


def _read_bytes(path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # a truncated .gz ends in EOFError
        raise DataError(f"cannot read {path}: {e}. Delete it and load again to re-download it.") from None


def read_idx(path, expected_shape):
    """An idx file (MNIST format) as a uint8 array of `expected_shape` (N first), checked against its header."""
    raw = _read_bytes(path)
    ndim = len(expected_shape)
    fix = "the file is truncated or corrupt; delete it and load again to re-download it"
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"{path} is not a {ndim}-d uint8 idx file ({fix})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if shape != tuple(expected_shape):
        raise DataError(f"{path} holds an array of shape {shape}, expected {tuple(expected_shape)} ({fix})")
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path} has {len(body)} data bytes, expected {int(np.prod(shape))} ({fix})")
    return np.frombuffer(bytearray(body), dtype=np.uint8).reshape(shape)  # bytearray: writable for torch


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds NumPy arrays and plain containers only: a crafted pickle cannot call anything else."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_cifar_batch(path, n_expected):
    """One CIFAR-10 python pickle batch -> (uint8 N x 3 x 32 x 32, int64 N), checked by content, not by md5. Any
    failure to read or unpickle it (truncated, crafted, foreign) is a DataError naming the file."""
    fix = "the file is truncated or corrupt; delete the folder and load again to re-download it"
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="latin1").load()
        data, labels = np.asarray(d["data"]), np.asarray(d["labels"], dtype=np.int64)
    except Exception as e:  # a crafted pickle can raise almost anything (OverflowError, MemoryError, ...)
        raise DataError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {str(e)[:200]} ({fix})") from None
    if data.dtype != np.uint8 or data.shape != (n_expected, 3072) or labels.shape != (n_expected,):
        raise DataError(f"{path}: data {data.dtype} {data.shape}, labels {labels.shape}; expected uint8 "
                        f"({n_expected}, 3072) and ({n_expected},) ({fix})")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels outside 0..9 ({fix})")
    return data.reshape(n_expected, 3, 32, 32), labels


# ----------------------------------------------------------------------------------------------------------------
# per-dataset loading: find the files, download when missing


def _find(folder, name):
    for p in (folder / name, folder / (name + ".gz")):
        if p.exists():
            return p
    return None


def _download(name, root):
    import torchvision.datasets as tvd
    cls = {"mnist": tvd.MNIST, "fashion": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _missing_error(name, folder, missing, cause):
    gz = " (each may also be gzipped, NAME.gz)" if name != "cifar10" else ""
    return DataError(
        f"{name}: files missing in {folder}: {', '.join(missing)}{gz}. The download failed ({cause}). "
        f"Get the files from {SOURCES[name]} and place them there, or point the data root at a folder that holds "
        f"them (--data-root PATH on the command line, load_dataset(..., root=PATH), or the environment variable "
        f"BIODL_DATA).")


def _check_root(root, explicit):
    """A data root that was asked for (argument or $BIODL_DATA) must exist: a mistyped path is never created."""
    if explicit and not root.is_dir():
        raise DataError(f"the data root {root} does not exist (given by --data-root / root=, else $BIODL_DATA); "
                        f"point it at the folder that holds the datasets, or create the folder first to download "
                        f"them there")


def _load_idx_dataset(name, root, download):
    folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    names = [f for pair in IDX_FILES.values() for f in pair]
    missing = [f for f in names if _find(folder, f) is None]
    if missing:
        cause = "download=False"
        if download:
            try:
                _download(name, root)
                missing = [f for f in names if _find(folder, f) is None]
                cause = "torchvision did not place them"
            except Exception as e:  # network down, checksum mismatch, ...
                cause = f"{type(e).__name__}: {e}"
        if missing:
            raise _missing_error(name, folder, missing, cause)
    arrays = {}
    for split, n in (("train", 60000), ("test", 10000)):
        img, lab = IDX_FILES[split]
        X = read_idx(_find(folder, img), (n, 28, 28))
        y = read_idx(_find(folder, lab), (n,))
        if y.max() > 9:
            raise DataError(f"{_find(folder, lab)}: labels outside 0..9 (corrupt file; delete it and load again)")
        arrays[split] = (X[:, None], y.astype(np.int64))
    classes = [str(i) for i in range(10)] if name == "mnist" else list(FASHION_CLASSES)
    return arrays, classes


def _load_cifar10(root, download):
    folder = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (folder / f).exists()]
    if missing:
        cause = "download=False"
        if download:
            try:
                _download("cifar10", root)
                missing = [f for f in CIFAR10_FILES if not (folder / f).exists()]
                cause = "torchvision did not place them"
            except Exception as e:
                cause = f"{type(e).__name__}: {e}"
        if missing:
            raise _missing_error("cifar10", folder, missing, cause)
    parts = [read_cifar_batch(folder / f, 10000) for f in CIFAR10_FILES]
    X_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    for split, y, per_class in (("train", y_train, 5000), ("test", parts[5][1], 1000)):
        counts = np.bincount(y, minlength=10)
        if (counts != per_class).any():
            raise DataError(f"CIFAR-10 {split} split in {folder} has class counts {counts.tolist()}, expected "
                            f"{per_class} each (corrupt or foreign files; delete the folder and load again)")
    return {"train": (X_train, y_train), "test": parts[5]}, list(CIFAR10_CLASSES)


def load_dataset(name, root=None, device=None, normalize=False, download=True):
    """The official train and test splits of `name` ("mnist", "fashion" or "cifar10") as tensors on `device`.

    Images are float32 N x C x H x W in [0, 1] (with normalize=True: per-channel zero mean, unit variance, using the
    training split's statistics); labels int64. `root`: argument, else $BIODL_DATA, else ./data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    explicit = root is not None or bool(os.environ.get("BIODL_DATA"))
    root, device = data_root(root), get_device(device)
    _check_root(root, explicit)
    arrays, classes = _load_cifar10(root, download) if name == "cifar10" else _load_idx_dataset(name, root, download)
    out = []
    for split in ("train", "test"):
        X, y = arrays[split]
        X = torch.from_numpy(np.ascontiguousarray(X)).to(device).float().div_(255.0)
        out += [X, torch.from_numpy(y).to(device)]
    ds = Dataset(*out, classes, name)
    return standardized(ds) if normalize else ds


def standardized(ds):
    """`ds` with every input channel at zero mean and unit variance, by the training split's statistics."""
    mean = ds.X_train.mean(dim=(0, 2, 3), keepdim=True)
    std = ds.X_train.std(dim=(0, 2, 3), keepdim=True)
    return ds._replace(X_train=(ds.X_train - mean) / std, X_test=(ds.X_test - mean) / std)
