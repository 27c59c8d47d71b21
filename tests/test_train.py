import numpy as np
import pytest
import torch

from utils.errors import TrainingDiverged
from utils.train import cross_validate, load_checkpoint, main, make_classifier, save_checkpoint, train_logged


@pytest.mark.parametrize("kind, hp", [("mlp", dict(hidden_sizes=(32,))),
                                      ("cnn", dict(channels=(4,), kernel_sizes=(3,)))])
def test_learns_separable_problem(blobs, kind, hp):
    X, y = blobs
    clf = make_classifier(kind, lr=1e-2, batch_size=50, max_epochs=8, device="cpu", **hp)
    clf.fit(X[:400], y[:400])
    assert clf.score(X[400:], y[400:]) > 0.9  # chance is 0.1
    proba = clf.predict_proba(X[400:])
    assert proba.shape == (200, 10) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_score_accepts_label_tensors(blobs):
    X, y = blobs
    clf = make_classifier("mlp", hidden_sizes=(16,), lr=1e-2, max_epochs=2, device="cpu").fit(X[:400], y[:400])
    by_hand = float((clf.predict(X[400:]) == y[400:].numpy()).mean())
    assert clf.score(X[400:], y[400:]) == pytest.approx(by_hand)  # a tensor (on any device) scores like numpy
    assert clf.score(X[400:], y[400:].numpy()) == pytest.approx(by_hand)


def test_cosine_schedule_anneals_lr_to_zero(blobs):
    X, y = blobs
    clf = make_classifier("mlp", hidden_sizes=(16,), lr=1e-2, max_epochs=4, lr_schedule="cosine", device="cpu")
    clf.fit(X[:200], y[:200])
    lrs = [g["lr"] for g in clf.optimizer_.param_groups]
    assert lrs == [pytest.approx(0.0, abs=1e-12)]  # stepped once per epoch: cos(pi) after max_epochs
    with pytest.raises(ValueError, match="lr_schedule"):
        make_classifier("mlp", lr_schedule="step")


def test_cross_validate_one_score_per_fold(blobs):
    X, y = blobs
    scores = cross_validate(make_classifier("mlp", hidden_sizes=(16,), lr=1e-2, max_epochs=2, device="cpu"),
                            X, y, folds=3)
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 1)).all()


def test_same_seed_same_weights_and_scores(blobs):
    X, y = blobs
    runs = []
    for seed in (3, 3, 4):
        clf = make_classifier("cnn", channels=(4,), kernel_sizes=(3,), max_epochs=2, seed=seed, device="cpu")
        clf.fit(X, y)
        runs.append((clf.module_.classifier.weight.detach().clone(), clf.predict_proba(X)))
    assert torch.equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_batches_are_device_slices_of_a_permutation(blobs):
    X, y = blobs
    clf = make_classifier("mlp", hidden_sizes=(8,), batch_size=64, max_epochs=1, device="cpu")
    clf.fit(X[:100], y[:100])
    seen = []
    for Xb, yb in clf.get_iterator(clf.get_dataset(X, y), training=True):
        assert isinstance(Xb, torch.Tensor) and Xb.device == X.device
        seen.append(yb)
    assert [len(b) for b in seen] == [64] * 9 + [24]
    assert sorted(torch.cat(seen).tolist()) == sorted(y.tolist())  # every example exactly once


def test_divergence_raises(blobs):
    X, y = blobs
    X = X.clone()
    X[5] = float("nan")
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        make_classifier("mlp", hidden_sizes=(8,), max_epochs=1, device="cpu").fit(X, y)


def test_bad_kind_and_hyperparameter():
    with pytest.raises(ValueError, match="mlp, cnn, compartmental"):
        make_classifier("rnn")
    with pytest.raises(ValueError, match="hidden_size"):
        make_classifier("mlp", hidden_size=3)


def test_checkpoint_round_trip(blobs, tmp_path):
    X, y = blobs
    clf = make_classifier("cnn", channels=(4,), kernel_sizes=(3,), max_epochs=1, device="cpu")
    clf.fit(X, y)
    save_checkpoint(clf, "tiny", directory=tmp_path, config={"dataset": "blobs"})
    again = load_checkpoint("tiny", directory=tmp_path)
    assert np.array_equal(clf.predict_proba(X), again.predict_proba(X))
    assert '"dataset": "blobs"' in (tmp_path / "tiny.json").read_text()
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_checkpoint("other", directory=tmp_path)


def test_command_line_dry_run(mnist_root, capsys):
    acc = main(["--model", "mlp", "--dataset", "mnist", "--dry-run", "--data-root", str(mnist_root),
                "--device", "cpu"])
    assert 0 <= acc <= 1 and "test accuracy" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")  # tiny data: validation dominates
def test_train_logged_saves_run_with_configuration(blobs, tmp_path):
    from utils.logger import load_run
    X, y = blobs
    clf, log = train_logged("mlp", X[:500], y[:500], X[500:], y[500:], run_dir=tmp_path / "run",
                            config={"dataset": "blobs", "seed": 1}, hidden_sizes=(16,), lr=1e-2, max_epochs=2,
                            seed=1, device="cpu", records_per_epoch=4)
    config, df = load_run(tmp_path / "run")
    assert config["model"] == "mlp" and config["dataset"] == "blobs" and config["n_train"] == 500
    assert config["hyperparameters"]["module__hidden_sizes"] == [16] and config["hyperparameters"]["lr"] == 0.01
    assert df["record"].nunique() == 1 + 2 * 4  # the initial state + 4 records per epoch


def test_command_line_compartmental_dry_run(mnist_root, capsys):
    acc = main(["--model", "compartmental", "--dataset", "mnist", "--dry-run", "--data-root", str(mnist_root),
                "--device", "cpu", "--batch-size", "100"])
    assert 0 <= acc <= 1 and "test accuracy" in capsys.readouterr().out
