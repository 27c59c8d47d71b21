"""Shared fixtures: small dataset roots written in the real file formats, so the real loading code runs."""
import os
import pickle
import signal
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # the suite shares 2 cores with whatever else runs; single-threaded is steadier


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def make_idx_root(root, folder="MNIST", n_train=60000, n_test=10000, seed=0):
    """A torchvision-layout root holding idx files of the official sizes (random pixels, labels 0..9)."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def make_cifar_root(root, seed=0):
    """A cifar-10-batches-py folder with the official sizes and class counts (random pixels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8), "labels": list(np.arange(10000) % 10),
             "filenames": [f"{name}_{i:04d}.png" for i in range(10000)]}  # placeholder names, as hand-placed copies
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    return make_idx_root(tmp_path_factory.mktemp("mnist_root"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    return make_cifar_root(tmp_path_factory.mktemp("cifar_root"))


@pytest.fixture
def blobs():
    """A small separable 10-class problem shaped like images: 600 x 1 x 8 x 8, float32, int64 labels."""
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(10, 1, 8, 8, generator=g)
    y = torch.arange(600) % 10
    X = (centers[y] + 0.15 * torch.randn(600, 1, 8, 8, generator=g)).clamp(0, 1)
    return X, y


def sigkill_when(proc, ready, what, timeout=240, poll=0.01):
    """SIGKILL the subprocess `proc` as soon as ready() is true (a study mid-run); fail the test saying `what` did
    not happen when it does not come within `timeout` seconds (a loaded machine starts python slowly)."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(poll)
        else:
            pytest.fail(f"{what} in {timeout} s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:  # the test failed before its kill
            proc.kill()
        proc.wait(timeout=30)
