"""utils.logger: record frequency, weight dynamics by hand, both attachment paths, save/load round trip, overhead.

Small synthetic data only: the whole file runs in a few seconds on one CPU core.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from skorch import NeuralNetClassifier

from utils.logger import LoggerOverheadWarning, TrainingLogger
from utils.runs import angles, concat_runs, curves, load_run, weights

torch.set_num_threads(1)
# toy fits are so short that validation dominates them; the warning is tested on its own below
pytestmark = pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")


def toy_data(n=200, d=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 3, 4, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (X.flatten(1) @ w).argmax(1)
    return X, y


class Tiny(torch.nn.Module):
    def __init__(self, d=12, hidden=8, classes=3, dropout=0.0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def skorch_net(logger=None, batch_size=20, max_epochs=2, **kw):
    torch.manual_seed(0)
    return NeuralNetClassifier(Tiny, criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.1,
                               batch_size=batch_size, max_epochs=max_epochs, train_split=None, verbose=0,
                               callbacks=[("logger", logger)] if logger is not None else None, **kw)


class FakeCompartmental:
    """Follows CompartmentalClassifier's hook protocol: hook(clf, info) after each batch (or after each batch
    crossing a multiple of hook_every examples) with that batch's loss, accuracy and angles, once with
    examples_seen=0 before the first batch."""

    def __init__(self, hook=None, hook_every=None, batch_size=20, max_epochs=2, bp_angle=True):
        self.hook, self.hook_every, self.batch_size, self.max_epochs, self.bp_angle = \
            hook, hook_every, batch_size, max_epochs, bp_angle
        self.W = {"W1": torch.ones(4, 12), "W2": torch.ones(3, 4), "Y1": torch.ones(4, 3)}
        self.proba_calls = []

    def named_weights(self):
        return dict(self.W)

    def predict_proba(self, X):
        self.proba_calls.append(len(X))
        p = np.full((len(X), 3), 0.1)
        p[:, 0] = 0.8
        return p

    def fit(self, X, y):
        n = len(X)
        self.hook(self, {"epoch": 0, "examples_seen": 0, "n_train": n, "train_loss": float("nan"),
                         "train_acc": float("nan")})
        seen, step = 0, 0
        for epoch in range(self.max_epochs):
            for i in range(0, n, self.batch_size):
                b = min(self.batch_size, n - i)
                step += 1
                self.W = {k: v + 0.01 * step for k, v in self.W.items()}
                before, seen = seen, seen + b
                k = self.hook_every
                if k is None or seen // k > before // k:
                    # batch loss = step number: makes window means checkable
                    info = {"epoch": epoch, "examples_seen": seen, "n_train": n, "train_loss": 1.0 * step,
                            "train_acc": 0.5}
                    if self.bp_angle:
                        info["bp_angle"] = {"hidden1": 40.0 + step, "hidden2": 60.0}
                    self.hook(self, info)
        return self


# ----------------------------------------------------------------------------------------------------------------
# frequency


def test_skorch_records_at_configured_frequency():
    X, y = toy_data(200)
    log = TrainingLogger(X[:50], y[:50], records_per_epoch=5)
    skorch_net(log, batch_size=20, max_epochs=2).fit(X, y)
    c = curves(log.to_frame())
    assert c["examples_seen"].tolist() == [0, 40, 80, 120, 160, 200, 240, 280, 320, 360, 400]
    assert c["epoch"].tolist() == [0] + [0] * 5 + [1] * 5
    assert c["record"].tolist() == list(range(11))
    # first row: before training, initial state
    assert math.isnan(c["train_loss"].iloc[0]) and not math.isnan(c["valid_loss"].iloc[0])
    assert c[["train_loss", "train_acc", "valid_loss", "valid_acc"]].iloc[1:].notna().all().all()
    assert (c["wall_time"].diff().iloc[1:] >= 0).all()
    # one row per record x weight matrix (two Linear weights; biases are not matrices)
    df = log.to_frame()
    assert len(df) == 11 * 2 and set(df["layer"]) == {"net.1.weight", "net.4.weight"}


def test_skorch_marks_when_batches_do_not_divide_the_epoch():
    X, y = toy_data(200)
    log = TrainingLogger(records_per_epoch=4)  # marks at 50, 100, 150, 200; batches end at 30, 60, ..., 180, 200
    skorch_net(log, batch_size=30, max_epochs=1).fit(X, y)
    assert curves(log)["examples_seen"].tolist() == [0, 60, 120, 150, 200]
    assert curves(log)["valid_acc"].isna().all()  # no validation data given


def test_default_frequency_is_ten_per_epoch():
    X, y = toy_data(200)
    log = TrainingLogger()
    skorch_net(log, batch_size=10, max_epochs=1).fit(X, y)
    assert len(curves(log)) == 11


def test_training_metrics_are_means_over_the_window():
    X, y = toy_data(200)
    log = TrainingLogger(records_per_epoch=2)

    class Recorder(TrainingLogger.__mro__[1]):  # a plain skorch Callback remembering every batch loss
        def initialize(self):
            self.losses_ = []
            return self

        def on_batch_end(self, net, batch=None, training=None, loss=None, **kw):
            if training:
                self.losses_.append(loss.item())

    rec = Recorder()
    torch.manual_seed(0)
    NeuralNetClassifier(Tiny, criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.1,
                        batch_size=20, max_epochs=1, train_split=None, verbose=0,
                        callbacks=[("rec", rec), ("logger", log)]).fit(X, y)
    c = curves(log)
    assert c["train_loss"].iloc[1] == pytest.approx(np.mean(rec.losses_[:5]), rel=1e-5)
    assert c["train_loss"].iloc[2] == pytest.approx(np.mean(rec.losses_[5:]), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# weight dynamics


def test_relative_change_on_weights_set_by_hand():
    class Hand:
        W = None

        def named_weights(self):
            return {"W1": self.W}

        def predict_proba(self, X):
            return np.full((len(X), 2), 0.5)

    clf = Hand()
    log = TrainingLogger(records_per_epoch=1)
    clf.W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log(clf, {"epoch": 0, "examples_seen": 0, "n_train": 10})
    clf.W = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    log(clf, {"epoch": 0, "examples_seen": 10, "n_train": 10, "train_loss": 0.5, "train_acc": 0.25})
    clf.W = torch.tensor([[3.0, 0.0], [0.0, 5.0]])  # no change
    log(clf, {"epoch": 1, "examples_seen": 20, "n_train": 10, "train_loss": 0.5, "train_acc": 0.25})
    w = weights(log.to_frame())
    assert w["norm"].tolist() == pytest.approx([math.sqrt(2), math.sqrt(34), math.sqrt(34)])
    assert math.isnan(w["change_norm"].iloc[0]) and math.isnan(w["rel_change"].iloc[0])
    assert w["change_norm"].iloc[1] == pytest.approx(math.sqrt(20))
    assert w["rel_change"].iloc[1] == pytest.approx(math.sqrt(20) / math.sqrt(34))
    assert w["rel_change"].iloc[2] == 0.0


def test_snapshot_is_a_copy_not_a_view():
    """In-place updates (optimizer.step) must not alter the stored previous weights."""
    W = torch.ones(3, 3)

    class InPlace:
        def named_weights(self):
            return {"W1": W}

        def predict_proba(self, X):
            return np.full((len(X), 2), 0.5)

    log = TrainingLogger(records_per_epoch=1)
    log(InPlace(), {"epoch": 0, "examples_seen": 0, "n_train": 5})
    W.add_(1.0)  # every entry 1 -> 2
    log(InPlace(), {"epoch": 0, "examples_seen": 5, "n_train": 5, "train_loss": 1.0, "train_acc": 0.0})
    w = weights(log)
    assert w["change_norm"].iloc[1] == pytest.approx(3.0)      # ||ones(3,3)||
    assert w["rel_change"].iloc[1] == pytest.approx(3.0 / 6.0)  # / ||2 * ones(3,3)||


def test_skorch_weight_norms_match_the_module():
    X, y = toy_data(100)
    log = TrainingLogger(records_per_epoch=2)
    net = skorch_net(log, max_epochs=1).fit(X, y)
    last = weights(log)
    last = last[last["record"] == last["record"].max()].set_index("layer")
    for name, p in net.module_.named_parameters():
        if p.ndim >= 2:
            assert last.loc[name, "norm"] == pytest.approx(p.detach().norm().item(), rel=1e-6)
    w = weights(log).dropna(subset=["rel_change"])
    assert np.allclose(w["rel_change"], w["change_norm"] / w["norm"])
    assert (w["rel_change"] > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# validation


def test_validation_on_a_fixed_subset_and_train_mode_restored():
    X, y = toy_data(300)
    log = TrainingLogger(X, y, records_per_epoch=1, max_valid=64)
    net = skorch_net(log, max_epochs=1)
    net.set_params(module__dropout=0.5)
    net.fit(X[:100], y[:100])
    Xv, yv = log.valid_
    assert len(Xv) == 64 and len(yv) == 64
    counts = np.bincount(yv.numpy(), minlength=3)
    assert counts.max() - counts.min() <= 1  # class-balanced (each class has far more than 22 examples)
    # the subset is fixed: a second logger picks the same examples
    log2 = TrainingLogger(X, y, max_valid=64)
    assert torch.equal(log2._valid_subset()[1], yv)
    # valid metrics equal skorch's own predict_proba on that subset (dropout off)
    proba = net.predict_proba(Xv)
    assert curves(log)["valid_acc"].iloc[-1] == pytest.approx((proba.argmax(1) == yv.numpy()).mean())
    assert curves(log)["valid_loss"].iloc[-1] == pytest.approx(
        -np.log(proba[np.arange(64), yv.numpy()]).mean(), rel=1e-5)
    net.module_.train()
    log._skorch_proba(net, Xv)
    assert net.module_.training  # the logger restores the mode it found
    net.module_.eval()
    log._skorch_proba(net, Xv)
    assert not net.module_.training


def test_validation_subset_is_data_stratified_indices_and_nested():
    from utils.data import stratified_indices
    X, y = toy_data(300)
    assert TrainingLogger().max_valid == 300
    small, large = TrainingLogger(X, y, max_valid=30), TrainingLogger(X, y, max_valid=90)
    idx = stratified_indices(y.numpy(), 30)
    assert torch.equal(small._valid_subset()[0], X[idx])
    rows = {tuple(x.flatten().tolist()) for x in large._valid_subset()[0]}
    assert all(tuple(x.flatten().tolist()) in rows for x in small._valid_subset()[0])  # nested in max_valid


def test_validation_arguments_checked():
    X, y = toy_data(20)
    with pytest.raises(ValueError):
        TrainingLogger(X, None)
    with pytest.raises(ValueError):
        TrainingLogger(records_per_epoch=0)


# ----------------------------------------------------------------------------------------------------------------
# compartmental hook path


def test_compartmental_hook_records_and_angles():
    X, y = toy_data(200)
    log = TrainingLogger(X[:30], y[:30], records_per_epoch=5, name="comp")
    clf = FakeCompartmental(hook=log, batch_size=20, max_epochs=2).fit(X, y)
    c = curves(log)
    assert c["examples_seen"].tolist() == [0, 40, 80, 120, 160, 200, 240, 280, 320, 360, 400]
    assert c["epoch"].tolist() == [0] + [0] * 5 + [1] * 5
    # train loss: the batch losses were 1, 2 (first window of two batches) -> weighted mean 1.5
    assert c["train_loss"].iloc[1] == pytest.approx(1.5)
    assert c["train_acc"].iloc[1:].tolist() == pytest.approx([0.5] * 10)
    assert c["valid_acc"].iloc[1] == pytest.approx((y[:30] == 0).float().mean().item())
    assert c["valid_loss"].iloc[1] == pytest.approx(-np.mean(np.log(np.where(y[:30].numpy() == 0, 0.8, 0.1))))
    assert set(clf.proba_calls) == {30}
    a = angles(log)
    assert set(a["layer"]) == {"hidden1", "hidden2"}
    # mean over the hook calls of the window: steps 1, 2 -> hidden1 = 41.5
    first = a[a["record"] == 1].set_index("layer")["bp_angle"]
    assert first["hidden1"] == pytest.approx(41.5) and first["hidden2"] == pytest.approx(60.0)
    w = weights(log)
    assert set(w["layer"]) == {"W1", "W2", "Y1"}
    # W1 entries go 1 -> 1 + 0.01 + 0.02 after the first window: change norm = 0.03 * sqrt(48)
    row = w[(w["record"] == 1) & (w["layer"] == "W1")].iloc[0]
    assert row["change_norm"] == pytest.approx(0.03 * math.sqrt(48), rel=1e-5)
    assert row["rel_change"] == pytest.approx(0.03 / 1.03, rel=1e-5)


def test_compartmental_hook_every():
    X, y = toy_data(200)
    log = TrainingLogger(records_per_epoch=2)
    FakeCompartmental(hook=log, hook_every=50, batch_size=20, max_epochs=1, bp_angle=False).fit(X, y)
    # hook calls after the batches crossing 50, 100, 150, 200 examples: 60, 100, 160, 200 -> marks 100, 200
    assert curves(log)["examples_seen"].tolist() == [0, 100, 200]
    assert angles(log).empty
    # the first window spans the calls at 60 and 100 (batches 3 and 5): each call's batch stands for the examples
    # since the previous call, 60 and 40
    assert curves(log)["train_loss"].iloc[1] == pytest.approx((3 * 60 + 5 * 40) / 100)


@pytest.mark.parametrize("n, batch_size, records_per_epoch, epochs", [
    (200, 20, 5, 2),    # marks on batch ends
    (200, 30, 4, 1),    # marks between batch ends; a short last batch
    (100, 7, 3, 2),     # marks at fractional example counts, epochs ending mid-batch-grid
    (90, 25, 10, 1),    # more marks than batches: one record per batch however many marks it passes
])
def test_callback_and_hook_paths_record_at_the_same_points(n, batch_size, records_per_epoch, epochs):
    X, y = toy_data(n)
    by_callback, by_hook = TrainingLogger(records_per_epoch=records_per_epoch), \
        TrainingLogger(records_per_epoch=records_per_epoch)
    skorch_net(by_callback, batch_size=batch_size, max_epochs=epochs).fit(X, y)
    FakeCompartmental(hook=by_hook, batch_size=batch_size, max_epochs=epochs, bp_angle=False).fit(X, y)
    seen = curves(by_callback)["examples_seen"].tolist()
    assert curves(by_hook)["examples_seen"].tolist() == seen
    assert curves(by_hook)["epoch"].tolist() == curves(by_callback)["epoch"].tolist()
    assert seen[-1] == n * epochs and len(seen) == 1 + epochs * min(records_per_epoch, -(-n // batch_size))


def test_callback_and_real_compartmental_hook_record_at_the_same_points():
    comp = pytest.importorskip("utils.compartmental")
    X, y = toy_data(100)
    by_callback, by_hook = TrainingLogger(records_per_epoch=3), TrainingLogger(records_per_epoch=3)
    skorch_net(by_callback, batch_size=15, max_epochs=2).fit(X, y)
    comp.CompartmentalClassifier(n_hidden=(6,), batch_size=15, max_epochs=2, l_f_phase=10, l_t_phase=10,
                                 l_f_phase_test=15, integration_time=5, seed=0, hook=by_hook).fit(X.sigmoid(), y)
    assert curves(by_hook)["examples_seen"].tolist() == curves(by_callback)["examples_seen"].tolist() == \
        [0, 45, 75, 100, 145, 175, 200]


def test_refit_restarts_and_continued_fit_continues():
    X, y = toy_data(100)
    log = TrainingLogger(records_per_epoch=1)
    clf = FakeCompartmental(hook=log, batch_size=50, max_epochs=1, bp_angle=False)
    clf.fit(X, y)
    assert curves(log)["examples_seen"].tolist() == [0, 100]
    clf.fit(X, y)  # same weights as the last record: continues (partial_fit-like)
    assert curves(log)["examples_seen"].tolist() == [0, 100, 200]
    clf.W = {k: torch.zeros_like(v) for k, v in clf.W.items()}  # re-initialized: a new log
    clf.fit(X, y)
    assert curves(log)["examples_seen"].tolist() == [0, 100]

    # skorch: fit re-initializes (callbacks too) -> new log; partial_fit continues
    log = TrainingLogger(records_per_epoch=1)
    net = skorch_net(log, batch_size=50, max_epochs=1).fit(X, y)
    net.partial_fit(X, y)
    assert curves(log)["examples_seen"].tolist() == [0, 100, 200]
    assert curves(log)["epoch"].tolist() == [0, 0, 1]
    net.fit(X, y)
    assert curves(log)["examples_seen"].tolist() == [0, 100]


# ----------------------------------------------------------------------------------------------------------------
# files


def test_save_load_round_trip(tmp_path):
    X, y = toy_data(100)
    log = TrainingLogger(X[:20], y[:20], records_per_epoch=2, name="mlp-toy-s0")
    skorch_net(log, max_epochs=1).fit(X, y)
    config = {"model": "mlp", "dataset": "toy", "seed": np.int64(0), "hidden_sizes": (8,), "lr": np.float32(0.1),
              "device": torch.device("cpu"), "optimizer": torch.optim.SGD}
    run = log.save(tmp_path / "runs" / "a", config)
    assert (run / "config.json").exists() and (run / "records.csv").exists()
    cfg, df = load_run(run)
    assert cfg["model"] == "mlp" and cfg["seed"] == 0 and cfg["hidden_sizes"] == [8]
    assert cfg["lr"] == pytest.approx(0.1) and cfg["run"] == "mlp-toy-s0"
    assert cfg["optimizer"] == "torch.optim.sgd.SGD"
    for lib in ("torch", "skorch", "scikit-learn", "numpy", "python", "device"):
        assert cfg["versions"][lib]
    assert cfg["logger"]["records_per_epoch"] == 2 and cfg["logger"]["n_valid"] == 20
    json.loads((run / "config.json").read_text())  # plain JSON
    pd.testing.assert_frame_equal(df, log.to_frame(), check_dtype=False)


def test_round_trip_with_angles_and_concat(tmp_path):
    X, y = toy_data(100)
    a = TrainingLogger(records_per_epoch=2)
    FakeCompartmental(hook=a, batch_size=25, max_epochs=1).fit(X, y)
    a.save(tmp_path / "comp", {"kind": "compartmental", "dataset": "toy", "seed": 1})
    b = TrainingLogger(X[:20], y[:20], records_per_epoch=2)
    skorch_net(b, max_epochs=1).fit(X, y)
    b.save(tmp_path / "mlp", {"model": "mlp", "dataset": "toy", "seed": 0})
    _, df = load_run(tmp_path / "comp")
    pd.testing.assert_frame_equal(df.assign(run="x"), a.to_frame().assign(run="x"), check_dtype=False)
    assert df["run"].iloc[0] == "comp"  # unnamed logger: the run folder names the run
    table = concat_runs(tmp_path)  # a parent folder of runs
    assert list(table.columns[:4]) == ["run", "model", "dataset", "seed"]
    assert len(table) == len(a.to_frame()) + len(b.to_frame())
    assert set(table["model"]) == {"compartmental", "mlp"}  # "kind" stands in for a missing "model"
    assert set(table["run"]) == {"comp", "mlp"}
    assert len(curves(table)) == 3 + 3
    assert concat_runs([tmp_path / "mlp"])["seed"].unique().tolist() == [0]
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------------------
# estimator plumbing and overhead


def test_clone_and_params():
    from sklearn.base import clone
    X, y = toy_data(50)
    log = TrainingLogger(X, y, records_per_epoch=3, max_valid=10, name="n")
    assert log.get_params() == {"X_valid": X, "y_valid": y, "records_per_epoch": 3, "max_valid": 10, "name": "n"}
    net = clone(skorch_net(log, max_epochs=1))
    net.fit(X, y)
    assert log.records_ == []  # the clone logged into its own copy
    logged = dict(net.callbacks_)["logger"]
    assert logged is not log and len(logged.records_) == 4


def test_overhead_is_measured_and_small():
    """The logger times itself (logger_time column); loose bound, no cross-run timing that could flake."""
    X, y = toy_data(2000)
    log = TrainingLogger(X[:500], y[:500])
    skorch_net(log, batch_size=50, max_epochs=2).fit(X, y)
    c = curves(log)
    last = c.iloc[-1]
    assert last["logger_time"] > 0 and last["wall_time"] >= last["logger_time"]
    assert last["train_time"] == pytest.approx(last["wall_time"] - last["logger_time"])
    assert last["logger_time"] / last["wall_time"] < 0.5  # benchmarks/bench_logger.py measures the real ratio


def test_overhead_warning():
    class Slow(FakeCompartmental):
        def predict_proba(self, X):   # 6 validations of 0.25 s: above OVERHEAD_MIN_SECONDS and the fraction
            import time
            time.sleep(0.25)
            return super().predict_proba(X)

    X, y = toy_data(100)
    log = TrainingLogger(X[:10], y[:10], records_per_epoch=5)
    with pytest.warns(LoggerOverheadWarning, match="lower max_valid or records_per_epoch") as caught:
        Slow(hook=log, batch_size=10, max_epochs=1, bp_angle=False).fit(X, y)
    assert len([w for w in caught if w.category is LoggerOverheadWarning]) == 1  # once per log


def test_one_time_cost_of_the_first_validation_does_not_warn():
    """A first predict_proba that compiles (torch.compile, seconds) is no logging overhead; later slow ones are."""
    import time
    import warnings

    class CompilesOnce(FakeCompartmental):
        @property
        def W(self):
            return self._W

        @W.setter
        def W(self, value):  # a training step takes 150 ms
            time.sleep(0.15)
            self._W = value

        def predict_proba(self, X):
            if not getattr(self, "compiled_", False):
                self.compiled_ = True
                time.sleep(1.5)  # as long as the whole training and above OVERHEAD_MIN_SECONDS: without the
            return super().predict_proba(X)   # warm-up rule this would warn

    X, y = toy_data(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoggerOverheadWarning)
        log = TrainingLogger(X[:10], y[:10], records_per_epoch=5)
        CompilesOnce(hook=log, batch_size=10, max_epochs=1, bp_angle=False).fit(X, y)
    assert log.logger_time_ > 1.5 and log.warmup_time_ >= 1.5


def test_with_make_classifier():
    train = pytest.importorskip("utils.train")
    X, y = toy_data(120)
    log = TrainingLogger(X[:40], y[:40], records_per_epoch=3)
    clf = train.make_classifier("mlp", logger=log, hidden_sizes=(6,), max_epochs=1, batch_size=20, device="cpu")
    clf.fit(X, y)
    assert curves(log)["examples_seen"].tolist() == [0, 40, 80, 120]
    assert set(weights(log)["layer"]) == {n for n, p in clf.module_.named_parameters() if p.ndim >= 2}


def test_with_compartmental_classifier():
    """The real compartmental network (tiny, short phases) through its hook, with the backprop-angle diagnostic."""
    comp = pytest.importorskip("utils.compartmental")
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(3, 1, 6, 6, generator=g)
    y = torch.arange(240) % 3
    X = (centers[y] + 0.1 * torch.randn(240, 1, 6, 6, generator=g)).clamp(0, 1)
    log = TrainingLogger(X[:60], y[:60], records_per_epoch=4, name="comp")
    clf = comp.CompartmentalClassifier(n_hidden=(16,), batch_size=20, max_epochs=2, l_f_phase=20, l_t_phase=20,
                                       l_f_phase_test=30, integration_time=10, record_backprop_angle=True,
                                       seed=0, hook=log)
    clf.fit(X[60:], y[60:])
    c = curves(log)
    # 180 examples per epoch, marks at 45, 90, 135, 180: the batches (20 examples) reaching them end at 60, 100, ...
    assert c["examples_seen"].tolist() == [0, 60, 100, 140, 180, 240, 280, 320, 360]
    assert c[["train_loss", "train_acc", "valid_loss", "valid_acc"]].iloc[1:].notna().all().all()
    assert set(weights(log)["layer"]) == {"W1", "W2", "Y1"}
    a = angles(log)
    assert set(a["layer"]) == {"hidden1"} and a["bp_angle"].between(0, 180).all() and len(a) == 8
    last = weights(log)
    last = last[last["record"] == last["record"].max()].set_index("layer")
    assert last.loc["W1", "norm"] == pytest.approx(clf.named_weights()["W1"].norm().item(), rel=1e-5)
    clf.partial_fit(X[60:], y[60:])  # continues the log
    assert curves(log)["examples_seen"].iloc[-1] == 540
    clf.fit(X[60:], y[60:])  # re-initializes: a new log
    assert curves(log)["examples_seen"].tolist()[-1] == 360 and len(curves(log)) == 9
