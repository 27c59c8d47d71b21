import os
import stat

import numpy as np
import pytest
import torch

from tests.conftest import make_idx_root, write_idx
from utils.data import DATASETS, DataError, load_dataset, stratified_indices, stratified_subset


def test_mnist_layout_loads_as_tensors(mnist_root):
    ds = load_dataset("mnist", root=mnist_root, device="cpu", download=False)
    assert ds.X_train.shape == (60000, 1, 28, 28) and ds.X_test.shape == (10000, 1, 28, 28)
    assert ds.X_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0.0 <= ds.X_train.min() and ds.X_train.max() <= 1.0
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.y_test[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_fashion_class_names(tmp_path):
    make_idx_root(tmp_path, "FashionMNIST")
    ds = load_dataset("fashion", root=tmp_path, download=False, device="cpu")
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_cifar_pickles_accepted_by_content(cifar_root):
    ds = load_dataset("cifar10", root=cifar_root, device="cpu", download=False)
    assert ds.X_train.shape == (50000, 3, 32, 32) and ds.X_test.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.y_train).tolist() == [5000] * 10
    assert ds.classes[0] == "airplane"


def test_root_from_environment_and_read_only_root_is_not_written(mnist_root, monkeypatch):
    before = sorted(p.relative_to(mnist_root) for p in mnist_root.rglob("*"))
    os.chmod(mnist_root / "MNIST" / "raw", stat.S_IRUSR | stat.S_IXUSR)  # read-only folder
    try:
        monkeypatch.setenv("BIODL_DATA", str(mnist_root))
        ds = load_dataset("mnist", device="cpu")  # download=True: must not try, the files are there
        assert len(ds.y_train) == 60000
    finally:
        os.chmod(mnist_root / "MNIST" / "raw", stat.S_IRWXU)
    assert sorted(p.relative_to(mnist_root) for p in mnist_root.rglob("*")) == before


def test_offline_root_needs_no_network(mnist_root, monkeypatch):
    import torchvision.datasets as tvd
    def no_network(*a, **k):
        raise AssertionError("tried to download although the files are there")
    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    assert len(load_dataset("mnist", root=mnist_root, device="cpu").y_test) == 10000


def test_normalize_uses_training_statistics(mnist_root):
    ds = load_dataset("mnist", root=mnist_root, device="cpu", normalize=True, download=False)
    assert abs(float(ds.X_train.mean())) < 1e-3 and abs(float(ds.X_train.std()) - 1) < 1e-3


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(e.value)


def test_missing_files_name_folder_and_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg and "BIODL_DATA" in msg


def test_failed_download_gives_clear_error(tmp_path, monkeypatch):
    import utils.data as data
    def offline(name, root):
        raise OSError("Temporary failure in name resolution")
    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataError, match="cifar-10-batches-py.*data_batch_1.*name resolution.*cs.toronto"):
        load_dataset("cifar10", root=tmp_path)


def test_truncated_idx_file_is_named(tmp_path):
    make_idx_root(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*data bytes"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_wrong_shape_idx_file_is_named(tmp_path):
    make_idx_root(tmp_path)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", [1, 2, 3])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*shape"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_corrupt_cifar_pickle_is_named(tmp_path, cifar_root):
    import shutil
    shutil.copytree(cifar_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar_wrong_class_counts_rejected(tmp_path):
    import pickle
    import numpy as np
    from tests.conftest import make_cifar_root
    make_cifar_root(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(path.read_bytes())
    d["labels"] = [0] * 10000
    path.write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match="class counts"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_stratified_subset_is_balanced():
    X = torch.arange(1000.0)[:, None]
    y = torch.arange(1000) % 10
    Xs, ys = stratified_subset(X, y, 100, seed=1)
    assert len(ys) == 100 and torch.bincount(ys).tolist() == [10] * 10
    assert torch.equal(y[Xs[:, 0].long()], ys)
    assert torch.all(Xs[1:, 0] > Xs[:-1, 0])  # in the original order
    Xl, _ = stratified_subset(X, y, 300, seed=1)
    assert set(Xs[:, 0].tolist()) <= set(Xl[:, 0].tolist())  # a larger subset extends a smaller one
    assert stratified_subset(X, y, 2000)[0] is X


def test_stratified_indices_balanced_nested_and_fixed():
    y = np.array([0] * 50 + [1] * 30 + [2] * 5)
    idx = stratified_indices(y, 21)
    assert len(idx) == 21 and len(set(idx)) == 21 and np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx]).tolist() == [8, 8, 5]  # class 2 has only 5: the others share the rest
    for n in (1, 3, 10, 20):
        assert set(stratified_indices(y, n)) <= set(idx)  # nested: every smaller subset is inside
    assert np.array_equal(stratified_indices(y, 21), idx)  # fixed by the seed
    assert not np.array_equal(stratified_indices(y, 21, seed=1), idx)


def test_missing_data_root_is_refused_not_created(tmp_path, monkeypatch):
    typo = tmp_path / "datasest"
    with pytest.raises(DataError, match="data root .*datasest does not exist.*--data-root"):
        load_dataset("mnist", root=typo)
    monkeypatch.setenv("BIODL_DATA", str(typo))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10")
    assert not typo.exists()


def test_missing_files_error_names_the_command_line_option_and_gz(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fashion", root=tmp_path, download=False)
    msg = str(e.value)
    assert "--data-root" in msg and "NAME.gz" in msg


@pytest.mark.parametrize("payload, cause", [
    (b"\x80\x04\x8e" + (2 ** 62).to_bytes(8, "little"), "MemoryError"),      # claims 4 EiB of bytes
    (b"\x80\x04\x8e" + (2 ** 63 + 5).to_bytes(8, "little"), "OverflowError"),  # beyond any size
    (b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.", "os.system"),   # would run a command
    (b"\x80\x02K\x05.", "TypeError"),                                          # a number, no dict
], ids=["huge", "overflow", "code", "no-dict"])
def test_crafted_cifar_pickle_is_named_not_raised_or_run(tmp_path, payload, cause):
    from utils.data import read_cifar_batch
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=f"data_batch_1.*{cause}.*delete the folder"):
        read_cifar_batch(path, 10000)


def test_empty_data_root_is_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)   # were "" taken as the current folder, a download would land here, not in the tree
    with pytest.raises(DataError, match="data root is empty"):
        load_dataset("mnist", root="")
    from utils.train import main
    with pytest.raises(SystemExit) as e:
        main(["--model", "mlp", "--data-root", "", "--dry-run", "--device", "cpu"])
    assert "data root is empty" in str(e.value.code) and "Traceback" not in capsys.readouterr().err
