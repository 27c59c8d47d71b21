import numpy as np
import pytest
import torch

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.classifiers import make_classifier
from utils.errors import TrainingDiverged
from utils.evaluation import cross_validate
from utils.train import EpochRun, LoggedRun, main, train_epochs, train_logged


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


def test_cosine_schedule_keeps_its_place_across_partial_fits(blobs):
    """The rules benchmark interleaves rules one epoch at a time (partial_fit); the schedule must not restart."""
    X, y = blobs

    def net():
        clf = make_classifier("mlp", hidden_sizes=(16,), lr=1e-2, max_epochs=3, lr_schedule="cosine", device="cpu")
        return clf.set_params(module__in_features=64)

    whole, stepped, lrs = net().fit(X[:200], y[:200]), net(), []
    for _ in range(3):
        stepped.partial_fit(X[:200], y[:200], epochs=1)
        lrs.append(stepped.optimizer_.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-2 * (1 + np.cos(np.pi * e / 3)) / 2 for e in (1, 2, 3)], abs=1e-12)
    for name, w in whole.module_.state_dict().items():
        assert torch.equal(w, stepped.module_.state_dict()[name]), name


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
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):  # Adam steps of 1e20 overflow
        make_classifier("mlp", hidden_sizes=(8,), lr=1e20, max_epochs=2, device="cpu").fit(X, y)


def test_nan_input_is_named_not_blamed_on_the_learning_rate(blobs):
    X, y = blobs
    X = X.clone()
    X[5, 0, 2, 3] = float("nan")
    X[9] = float("inf")
    clf = make_classifier("mlp", hidden_sizes=(8,), max_epochs=1, device="cpu")
    with pytest.raises(ValueError, match="NaN or infinite values in 2 of 600 examples.*index 5"):
        clf.fit(X, y)
    clf.fit(X[10:], y[10:])
    with pytest.raises(ValueError, match="NaN or infinite"):
        clf.predict(X[:10])


def test_bad_kind_and_hyperparameter():
    with pytest.raises(ValueError, match="mlp, cnn, compartmental"):
        make_classifier("rnn")
    with pytest.raises(ValueError, match="hidden_size"):
        make_classifier("mlp", hidden_size=3)


def _tiny_compartmental(**kw):
    """A small, fast segregated-dendrite network (short phases); rate mode in float64 unless kw say otherwise."""
    from utils.compartmental import CompartmentalClassifier
    hp = dict(n_hidden=(12,), batch_size=20, f_etas=(2.0, 0.4), l_f_phase=12, l_t_phase=12, l_f_phase_test=16,
              integration_time=6, use_spiking_feedforward=False, use_spiking_feedback=False, dtype="float64",
              seed=3, device="cpu")
    return CompartmentalClassifier(**{**hp, **kw})


@pytest.mark.parametrize("kind", ["cnn", "mlp-fa", "compartmental"])
def test_checkpoint_round_trip(blobs, tmp_path, kind):
    X, y = blobs
    if kind == "compartmental":
        clf = _tiny_compartmental(use_spiking_feedforward=True, use_spiking_feedback=True, dtype="float32")
        clf.fit(X[:200], y[:200])
    else:
        clf = make_classifier(kind, channels=(4,), kernel_sizes=(3,), max_epochs=1, device="cpu") if kind == "cnn" \
            else make_classifier(kind, hidden_sizes=(16,), max_epochs=1, device="cpu")
        clf.fit(X, y)
    save_checkpoint(clf, "tiny", directory=tmp_path, config={"dataset": "blobs"})
    saved = torch.load(tmp_path / "tiny.pt", weights_only=True)   # tensors and JSON text only, nothing pickled
    assert set(saved) == {"meta", "tensors"} and isinstance(saved["meta"], str)
    again = load_checkpoint("tiny", directory=tmp_path)
    assert type(again) is type(clf) and again is not clf
    if kind == "compartmental":   # its test phase draws spikes: the same weights and generator give the same draws
        assert all(torch.equal(a, b) for a, b in zip(clf.W_ + clf.Y_, again.W_ + again.Y_))
        assert np.array_equal(clf.decision_function(X[200:260]), again.decision_function(X[200:260]))
    else:
        assert np.array_equal(clf.predict_proba(X), again.predict_proba(X))
        assert again.get_params()["module__rule"] == clf.get_params()["module__rule"]
    assert '"dataset": "blobs"' in (tmp_path / "tiny.json").read_text()
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_checkpoint("other", directory=tmp_path)


def test_resume_after_one_of_two_epochs_equals_two_epochs_mlp(blobs, tmp_path):
    X, y = blobs
    hp = dict(hidden_sizes=(16,), lr=1e-2, batch_size=32, max_epochs=2, seed=4, device="cpu")
    args = (X[:500], y[:500], X[500:], y[500:])
    whole, rec = train_epochs(make_classifier("mlp", **hp), *args, EpochRun(2, out=tmp_path / "whole.json"))
    train_epochs(make_classifier("mlp", **hp), *args, EpochRun(1, out=tmp_path / "part.json"))   # "interrupted"
    resumed, rec2 = train_epochs(make_classifier("mlp", **hp), *args,
                                 EpochRun(2, out=tmp_path / "part.json", resume=True))
    plain = make_classifier("mlp", **hp).fit(X[:500], y[:500])   # one fit of two epochs: the same batches
    for other in (resumed, plain):
        state = other.module_.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in whole.module_.state_dict().items())
    assert [e["train_loss"] for e in rec2["epochs"]] == [e["train_loss"] for e in rec["epochs"]]
    assert rec2["finished"] and len(rec2["resumed"]) == 1 and rec2["test_accuracy"] == rec["test_accuracy"]


def test_resume_equals_uninterrupted_compartmental_rate_mode(blobs, tmp_path):
    from utils.checkpoint import read_checkpoint
    X, y = blobs
    args = (X[:200], y[:200], X[200:300], y[200:300])
    whole, _ = train_epochs(_tiny_compartmental(), *args, EpochRun(2, out=tmp_path / "whole.json"))
    train_epochs(_tiny_compartmental(), *args, EpochRun(1, out=tmp_path / "part.json"))
    middle, _ = read_checkpoint(tmp_path / "part.ckpt.pt")   # the state carried over to the next batch is saved
    assert middle.state_ is not None and middle.examples_seen_ == 200
    resumed, _ = train_epochs(_tiny_compartmental(), *args, EpochRun(2, out=tmp_path / "part.json", resume=True))
    assert resumed.examples_seen_ == whole.examples_seen_ == 400
    for a, b in zip(whole.W_ + whole.b_ + whole.Y_, resumed.W_ + resumed.b_ + resumed.Y_):
        assert torch.equal(a, b)
    assert np.array_equal(whole.decision_function(X[:50]), resumed.decision_function(X[:50]))


def test_cross_validate_equals_scikit_learns_cross_val_score(blobs):
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    X, y = blobs
    clf = make_classifier("mlp", hidden_sizes=(16,), lr=1e-2, max_epochs=2, seed=2, device="cpu")
    ours = cross_validate(clf, X.numpy(), y.numpy(), folds=3, seed=5)
    theirs = cross_val_score(clf, X.numpy(), y.numpy(), cv=StratifiedKFold(3, shuffle=True, random_state=5))
    assert np.array_equal(ours, theirs) and ours.min() > 0.5   # the same folds, clones and seeds: the same scores
    other = cross_val_score(clf, X.numpy(), y.numpy(), cv=StratifiedKFold(3, shuffle=True, random_state=6))
    assert not np.array_equal(ours, other)   # the comparison notices other folds


@pytest.mark.parametrize("model, extra", [("mlp", ["--n-hidden", "32"]), ("cnn", [])])
def test_command_line_trains_the_synthetic_problem(model, extra, tmp_path, capsys):
    import json
    out = tmp_path / "run.json"
    acc = main(["--model", model, "--dataset", "blobs", "--epochs", "2", "--test-every-epochs", "2", "--subset", "500",
                "--test-subset", "300", "--lr", "0.01", "--batch-size", "20", "--device", "cpu", "--out", str(out), *extra])
    assert acc >= 0.9   # chance: 0.1; both nets reach 1.0 on these well separated blobs
    record = json.loads(out.read_text())
    assert record["finished"] and record["config"]["model"] == model and record["versions"]["torch"]
    assert [e["epoch"] for e in record["epochs"]] == [1, 2] and "test_accuracy" not in record["epochs"][0]
    assert record["epochs"][1]["test_accuracy"] == acc and all(e["train_s"] > 0 for e in record["epochs"])
    ckpt = torch.load(out.with_suffix(".ckpt.pt"), weights_only=True)
    assert json.loads(ckpt["meta"])["extra"]["record"]["test_accuracy"] == acc
    assert "test accuracy" in capsys.readouterr().out
    main(["--model", model, "--dataset", "blobs", "--epochs", "3", "--test-every-epochs", "2", "--subset", "500",
          "--test-subset", "300", "--lr", "0.01", "--batch-size", "20", "--device", "cpu", "--out", str(out), "--resume", *extra])
    assert "resuming" in capsys.readouterr().out and len(json.loads(out.read_text())["epochs"]) == 3


def test_command_line_dry_run(mnist_root, capsys):
    acc = main(["--model", "mlp", "--dataset", "mnist", "--dry-run", "--data-root", str(mnist_root),
                "--device", "cpu"])
    assert 0 <= acc <= 1 and "test accuracy" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")  # tiny data: validation dominates
def test_train_logged_saves_run_with_configuration(blobs, tmp_path):
    from utils.runs import load_run
    X, y = blobs
    run = LoggedRun(run_dir=tmp_path / "run", config={"dataset": "blobs", "seed": 1}, records_per_epoch=4)
    clf, log = train_logged("mlp", X[:500], y[:500], X[500:], y[500:], run, hidden_sizes=(16,), lr=1e-2,
                            max_epochs=2, seed=1, device="cpu")
    config, df = load_run(tmp_path / "run")
    assert config["model"] == "mlp" and config["dataset"] == "blobs" and config["n_train"] == 500
    assert config["hyperparameters"]["module__hidden_sizes"] == [16] and config["hyperparameters"]["lr"] == 0.01
    assert df["record"].nunique() == 1 + 2 * 4  # the initial state + 4 records per epoch


def test_command_line_compartmental_run(tmp_path, capsys):
    import json
    out = tmp_path / "c.json"
    acc = main(["--model", "compartmental", "--dataset", "blobs", "--epochs", "1", "--subset", "100", "--test-subset",
                "50", "--n-hidden", "8", "--batch-size", "25", "--device", "cpu", "--out", str(out)])
    config = json.loads(out.read_text())["config"]
    assert 0 <= acc <= 1 and config["f_etas"] == [2 * 25 * 0.21, 2 * 0.21]   # the paper's rates, batch-scaled
    assert "test accuracy" in capsys.readouterr().out


def test_command_line_compartmental_rates_scale_by_the_batch_that_trains(tmp_path):
    import json
    out = tmp_path / "c.json"   # a nominal batch of 500 on 60 examples trains batches of 60
    main(["--model", "compartmental", "--dataset", "blobs", "--epochs", "1", "--subset", "60", "--test-subset", "20",
          "--n-hidden", "8", "--batch-size", "500", "--device", "cpu", "--quiet", "--out", str(out)])
    assert json.loads(out.read_text())["config"]["f_etas"] == pytest.approx([2 * 60 * 0.21, 2 * 0.21])


# ----------------------------------------------------------------------------------------------------------------
# bad input: clear errors, and what scikit-learn users pass is accepted


@pytest.mark.parametrize("argv, option", [(["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"),
                                          (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
                                          (["--batch-size", "0"], "--batch-size"),
                                          (["--batch-size", "-7"], "--batch-size"), (["--subset", "-5"], "--subset"),
                                          (["--epochs", "two"], "--epochs"), (["--seed", "-1"], "--seed")])
def test_command_line_rejects_bad_numbers_before_loading(argv, option, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # the data root does not exist: parsing must fail before loading
        main(argv + ["--data-root", str(tmp_path / "absent")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}:" in err and "Traceback" not in err


def test_command_line_lr_and_compartmental(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "compartmental", "--lr", "0.1"])
    assert e.value.code == 2 and "per-layer rates" in capsys.readouterr().err


def test_command_line_help_shows_every_option_with_its_default(capsys):
    from utils.train import parser
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python -m utils.train")
    assert "passes over the training data (default: 10)" in " ".join(out.split())
    assert "logs/full" in out
    for action in parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    for option in ("--model", "--epochs", "--lr", "--batch-size", "--seed"):
        line = " ".join(out.split()).split(option + " ", 2)[-1]
        assert "default: " in line.split(" --")[0], option


@pytest.mark.parametrize("hp, match", [(dict(lr=0), "lr=0"), (dict(lr=-1e-3), "lr=-0.001"),
                                       (dict(lr=float("nan")), "lr=nan"), (dict(batch_size=0), "batch_size=0"),
                                       (dict(batch_size=-7), "batch_size=-7"), (dict(batch_size=2.5), "batch_size"),
                                       (dict(max_epochs=0), "max_epochs=0"), (dict(max_epochs=-1), "max_epochs")])
def test_make_classifier_rejects_bad_hyperparameters(hp, match):
    for kind in ("mlp", "cnn"):
        with pytest.raises(ValueError, match=match):
            make_classifier(kind, **hp)
    if "lr" not in hp:  # the compartmental network has no lr; its batch size and epochs are checked the same way
        with pytest.raises(ValueError, match=match):
            make_classifier("compartmental", **hp)


def test_bad_hyperparameters_set_later_are_caught_at_fit(blobs):
    X, y = blobs
    clf = make_classifier("mlp", hidden_sizes=(8,), device="cpu").set_params(batch_size=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        clf.fit(X, y)
    with pytest.raises(ValueError, match="per-layer rates f_etas, no lr"):
        make_classifier("compartmental", lr=1e-3)


def test_accepts_numpy_float64_uint8_and_more_classes(blobs):
    X, y = blobs
    X8 = (X * 255).round().to(torch.uint8)
    y15 = (y + 5 * (torch.arange(len(y)) % 2)).numpy()  # labels 0..14
    hp = dict(hidden_sizes=(16,), lr=1e-2, max_epochs=2, device="cpu", seed=1)
    a = make_classifier("mlp", **hp).fit(X8.numpy(), y15)  # uint8 pixels: scaled to [0, 1]
    b = make_classifier("mlp", **hp).fit((X8.double() / 255).numpy(), y15.astype(np.float64))  # float64, float labels
    pa, pb = a.predict_proba(X8.numpy()), b.predict_proba(X8.float() / 255)
    assert pa.shape == (600, 15) and np.allclose(pa, pb, atol=1e-5)
    assert set(np.unique(a.predict(X8.numpy()))) <= set(range(15)) and 0 <= a.score(X8.numpy(), y15) <= 1
    cnn = make_classifier("cnn", channels=(4,), kernel_sizes=(3,), max_epochs=1, device="cpu")
    cnn.fit(X[:, 0].numpy(), y.numpy())  # N x H x W grey images get their channel axis
    assert cnn.predict(X[:5, 0]).shape == (5,)


@pytest.mark.parametrize("bad, match", [
    (lambda X, y: (X, np.array(["cat", "dog"] * 300)), "LabelEncoder"),
    (lambda X, y: (X, y - 1), "negative label -1"),
    (lambda X, y: (X, y + 0.5), "non-integer"),
    (lambda X, y: (X, y[:-1]), "one label per example"),
    (lambda X, y: (X, torch.zeros_like(y)), "at least two classes"),
    (lambda X, y: (X[0].flatten(), y), "one example per row"),
    (lambda X, y: (np.array([["a"] * 64] * 600), y), "expected numbers"),
    (lambda X, y: (X.flatten(1), y), "the CNN takes images"),
])
def test_bad_X_or_y_gives_a_clear_error(blobs, bad, match):
    Xb, yb = bad(*blobs)
    kind = "cnn" if match == "the CNN takes images" else "mlp"
    with pytest.raises(ValueError, match=match):
        make_classifier(kind, channels=(4,), kernel_sizes=(3,), max_epochs=1, device="cpu").fit(Xb, yb) \
            if kind == "cnn" else make_classifier(kind, hidden_sizes=(8,), max_epochs=1, device="cpu").fit(Xb, yb)


def test_predict_checks_the_fitted_input_shape(blobs):
    X, y = blobs
    mlp = make_classifier("mlp", hidden_sizes=(8,), max_epochs=1, device="cpu").fit(X, y)
    assert mlp.predict(X.flatten(1)).shape == (600,)  # the MLP flattens: same features, other layout
    with pytest.raises(ValueError, match=r"shape \(1, 4, 4\) but this network was fitted on \(1, 8, 8\)"):
        mlp.predict(X[:, :, :4, :4])
    cnn = make_classifier("cnn", channels=(4,), kernel_sizes=(3,), max_epochs=1, device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="fitted on"):
        cnn.predict(torch.zeros(3, 1, 16, 16))


def test_checkpoint_json_is_strict_json(blobs, tmp_path):
    import json
    X, y = blobs
    clf = make_classifier("mlp", hidden_sizes=(4,), max_epochs=1, device="cpu").fit(X, y)
    save_checkpoint(clf, "inf", directory=tmp_path, config={"best": float("inf"), "loss": float("nan")})

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    meta = json.loads((tmp_path / "inf.json").read_text(), parse_constant=refuse)
    assert meta["config"] == {"best": "inf", "loss": "nan"}


def test_redirected_command_line_output_is_plain(mnist_root, capsys):
    import ipykernel  # noqa: F401  as after the notebook tests: imported by nbclient, but no kernel runs here
    main(["--model", "mlp", "--dataset", "mnist", "--dry-run", "--data-root", str(mnist_root), "--device", "cpu"])
    out, err = capsys.readouterr()  # captured: not a terminal
    assert "train_loss" in out and "\x1b[" not in out + err and "\r" not in out + err


# ----------------------------------------------------------------------------------------------------------------
# runs that cannot fit are refused before training (issue 27: 6)


@pytest.fixture
def memory_of(monkeypatch):
    """Pretend the device has this many bytes free (utils.memory.available_bytes), whatever the machine has."""
    import utils.memory
    def set_free(n):
        monkeypatch.setattr(utils.memory, "available_bytes", lambda device=None: n)
    return set_free


def test_an_mlp_too_wide_is_refused_before_training_with_the_widest_that_fits(blobs, memory_of):
    import re
    from utils.errors import InsufficientMemory
    X, y = blobs
    memory_of(2 ** 31)
    clf = make_classifier("mlp", hidden_sizes=(2_000_000,), max_epochs=1, device="cpu")
    with pytest.raises(InsufficientMemory, match=r"an MLP with hidden_sizes \(2000000,\) .* at batch 100 needs about "
                                                 r".* GiB but 2.0 GiB is available on cpu; the largest that fits: "
                                                 r"--n-hidden \d+") as e:
        clf.fit(X, y)
    assert not clf.initialized_   # refused before the network was built
    widest = int(re.search(r"--n-hidden (\d+)", str(e.value)).group(1))
    arch = dict(in_features=64, n_classes=10, rule="backprop")
    assert clf._training_bytes({**arch, "hidden_sizes": (widest,)}, 100) <= 0.9 * 2 ** 31 < \
        clf._training_bytes({**arch, "hidden_sizes": (widest + 1,)}, 100)


def test_a_cnn_batch_too_large_is_refused_with_the_largest_batch_that_fits(blobs, memory_of):
    from utils.errors import InsufficientMemory
    X, y = blobs
    memory_of(2 ** 20)
    with pytest.raises(InsufficientMemory, match=r"a CNN with channels \(32, 64\) on inputs \(1, 8, 8\) at batch 600 "
                                                 r".*the largest that fits: --batch-size \d+ \(batch_size=\d+\)"):
        make_classifier("cnn", batch_size=20000, max_epochs=1, device="cpu").fit(X, y)   # 600 examples: batch 600


def test_the_footprint_counts_every_parameter_and_feedback_value():
    from utils.models import CNN, MLP
    for rule in ("backprop", "fa", "dfa", "sign"):
        for cls, args in ((MLP, (64, (30, 20), 10)), (CNN, ((3, 16, 16), (8, 16), (5, 3), 1, (2, 1), 10))):
            net = cls(*args, rule=rule)
            params, feedback, activations = cls.footprint(*args, rule=rule)
            assert params == sum(p.numel() for p in net.parameters()) and activations > 0
            weights = sum(b.numel() for n, b in net.named_buffers() if n.endswith("feedback"))
            assert weights <= feedback <= 1.1 * weights   # FA's count takes the biases too


def test_command_line_refuses_a_run_that_cannot_fit_in_one_line(memory_of, tmp_path, capsys):
    memory_of(2 ** 31)
    with pytest.raises(SystemExit) as e:
        main(["--model", "mlp", "--dataset", "blobs", "--n-hidden", "2000000", "--device", "cpu",
              "--out", str(tmp_path / "r.json")])
    assert str(e.value.code).startswith("error: training an MLP") and "--n-hidden" in str(e.value.code)
    assert "\n" not in str(e.value.code) and "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# the files of a run: damaged checkpoints, unwritable folders, two runs on one --out (issue 27: 12, 13, 14)

BLOBS_RUN = ["--model", "mlp", "--dataset", "blobs", "--n-hidden", "8", "--epochs", "1", "--subset", "100",
             "--test-subset", "50", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_resume_from_a_damaged_checkpoint_names_it_and_how_to_start_afresh(damage, tmp_path, capsys):
    out = tmp_path / "run.json"
    main(BLOBS_RUN + ["--out", str(out)])
    ckpt = out.with_suffix(".ckpt.pt")
    data = ckpt.read_bytes()
    ckpt.write_bytes({"garbage": b"not a checkpoint " * 50, "truncated": data[:len(data) // 2], "empty": b""}[damage])
    with pytest.raises(SystemExit) as e:
        main(BLOBS_RUN + ["--out", str(out), "--epochs", "2", "--resume"])
    message = str(e.value.code)
    assert message.startswith(f"error: --resume: {ckpt} cannot be read as a checkpoint") and "\n" not in message
    assert "delete it, or leave out --resume, to start afresh" in message and "weights_only" not in message
    assert ("empty" in message) == (damage == "empty") and "Traceback" not in capsys.readouterr().err


def test_loading_a_damaged_saved_model_names_the_file(tmp_path):
    from utils.checkpoint import CheckpointError
    (tmp_path / "m.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"m\.pt cannot be read as a checkpoint: it is truncated or corrupt"):
        load_checkpoint("m", directory=tmp_path)


@pytest.mark.parametrize("model, extra", [("mlp", ["--n-hidden", "8"]), ("cnn", []),
                                          ("compartmental", ["--n-hidden", "8"])])
def test_command_line_shows_a_progress_bar_per_epoch_unless_quiet(model, extra, monkeypatch, tmp_path, capsys):
    import utils.classifiers
    import utils.train
    for module in (utils.classifiers, utils.train):   # as at a terminal
        monkeypatch.setattr(module, "interactive", lambda: True)
    argv = ["--model", model, "--dataset", "blobs", "--epochs", "2", "--subset", "100", "--test-subset", "50",
            "--batch-size", "25", "--device", "cpu", "--out", str(tmp_path / "r.json"), *extra]
    main(argv)
    err = capsys.readouterr().err
    assert ("/4 [" in err and "it/s" in err) or "ex/s" in err   # tqdm's bar: of 4 batches (skorch) or of examples
    main(argv + ["--quiet", "--out", str(tmp_path / "q.json")])
    err = capsys.readouterr().err
    assert "it/s" not in err and "ex/s" not in err and "\r" not in err


def test_a_damaged_config_json_is_named(tmp_path):
    from utils.runs import load_run
    from utils.study_log import check_config
    (tmp_path / "config.json").write_text('{"model": "mlp",')
    (tmp_path / "records.csv").write_text("record\n0\n")
    for read in (lambda: check_config(tmp_path, {}), lambda: load_run(tmp_path)):
        with pytest.raises(ValueError, match=r"config\.json is damaged: no valid JSON at line 1 column 17"):
            read()


def test_command_line_refuses_an_out_it_cannot_write_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # --save writes into ./models
    (tmp_path / "file").write_text("not a folder")
    absent = ["--data-root", str(tmp_path / "absent")]   # loading would fail: the refusal must come first
    with pytest.raises(SystemExit) as e:
        main(BLOBS_RUN + ["--dataset", "mnist", "--out", str(tmp_path / "file" / "run.json"), *absent])
    assert str(e.value.code) == (f"error: --out: cannot write into {tmp_path / 'file'} ({tmp_path / 'file'} is a "
                                 f"file, not a folder); choose a folder this user can write")
    with pytest.raises(SystemExit) as e:
        main(BLOBS_RUN + ["--dataset", "mnist", "--save", "file/m", *absent])   # models/file/ ... is fine: a folder
    assert "data root" in str(e.value.code) and "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_command_line_refuses_a_read_only_out_before_training(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(SystemExit) as e:
        main(BLOBS_RUN + ["--out", str(tmp_path / "ro" / "run.json")])
    assert "cannot write into" in str(e.value.code) and "Permission denied" in str(e.value.code)


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE/x", "", "a/../../x"])
def test_save_names_stay_inside_models(name, tmp_path, capsys, monkeypatch):
    (tmp_path / "w" / "d").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "w" / "d")   # even a name that escaped models/ would stay in tmp_path
    name = name.replace("ABSOLUTE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(BLOBS_RUN + ["--out", str(tmp_path / "r.json"), "--save", name])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--save: checkpoint name" in err and "inside models/" in err
    assert not (tmp_path / "r.json").exists()   # refused before training
    from utils.checkpoint import save_checkpoint
    with pytest.raises(ValueError, match="must stay inside"):
        save_checkpoint(make_classifier("mlp"), name, directory=tmp_path / "models")


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, capsys):
    from utils.io import file_lock
    out = tmp_path / "run.json"
    with file_lock(tmp_path / "run.lock", RuntimeError):   # as a run in another process holds it
        with pytest.raises(SystemExit) as e:
            main(BLOBS_RUN + ["--out", str(out)])
    assert str(e.value.code).startswith(f"error: {out} is in use by another run (pid ")
    assert "use another --out" in str(e.value.code) and not out.exists()
    (tmp_path / "run.lock").write_text("pid 999999 on elsewhere, since 2026-01-01T00:00:00\n")   # its holder died
    assert 0 <= main(BLOBS_RUN + ["--out", str(out)]) <= 1 and out.exists()


def test_command_line_trains_and_records_the_whole_architecture(tmp_path):
    import json
    from utils.checkpoint import read_checkpoint
    out = tmp_path / "cnn.json"
    argv = ["--model", "cnn-sign", "--dataset", "blobs", "--channels", "4", "8", "--kernel-sizes", "3",
            "--lr-schedule", "cosine", "--normalize", "--subset", "100", "--test-subset", "50", "--batch-size", "25",
            "--lr", "0.01", "--device", "cpu", "--quiet", "--out", str(out)]
    main(argv + ["--epochs", "2"])
    config = json.loads(out.read_text())["config"]
    assert {k: config[k] for k in ("model", "rule", "channels", "kernel_sizes", "stride", "padding", "lr",
                                   "lr_schedule", "normalize")} == \
        dict(model="cnn", rule="sign", channels=[4, 8], kernel_sizes=[3, 3], stride=1, padding=1, lr=0.01,
             lr_schedule="cosine", normalize=True)
    clf, meta = read_checkpoint(out.with_suffix(".ckpt.pt"))
    assert clf.module_.rule == "sign" and clf.optimizer_.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
    main(argv + ["--epochs", "4", "--resume"])   # more epochs: the cosine now ends at the 4th
    clf, meta = read_checkpoint(out.with_suffix(".ckpt.pt"))
    assert len(meta["extra"]["record"]["epochs"]) == 4
    assert clf.optimizer_.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--model", "mlp-fa", "--rule", "dfa"], "give the rule once"),
    (["--model", "mlp", "--channels", "8"], "--channels applies to the cnn only"),
    (["--model", "compartmental", "--lr-schedule", "cosine"], "--lr-schedule applies to the mlp and the cnn"),
    (["--model", "compartmental", "--rule", "fa"], "--rule applies to the MLP and the CNN"),
    (["--model", "compartmental", "--normalize"], "--normalize applies to the mlp and the cnn"),
    (["--model", "cnn", "--channels", "8", "16", "--kernel-sizes", "3", "5", "7"], "one per block"),
])
def test_command_line_refuses_options_that_do_not_apply(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--dataset", "blobs"])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_readmes_cnn_rows_are_command_lines(dataset):
    """README's CNN rows are the accuracy benchmark's models: the command line must express each."""
    import benchmarks.bench_training as bench
    from utils.train import _model, _usage, parser
    want = bench.ACCURACY_MODELS["cnn"][dataset]
    argv = ["--model", "cnn", "--dataset", dataset, "--channels", *map(str, want["channels"]), "--kernel-sizes",
            "3", "--lr", str(want["lr"]), "--batch-size", str(want["batch_size"]), "--normalize",
            "--lr-schedule", want.get("lr_schedule") or "constant"]
    p = parser()
    args = p.parse_args(argv)
    batch_size, model = _model(p, args, *_usage(p, args))
    assert batch_size == want["batch_size"] and args.normalize   # the benchmark normalizes its inputs
    expected = {**{k: v for k, v in want.items() if k != "batch_size"}, "lr_schedule": want.get("lr_schedule")
                or "constant"}
    assert {k: model[k] for k in expected} == expected


def test_constant_is_a_schedule_name_as_on_the_command_lines():
    from utils.classifiers import LR_SCHEDULES
    assert LR_SCHEDULES == ("constant", "cosine")   # utils.train's and the rules benchmark's --lr-schedule
    clf = make_classifier("mlp", lr_schedule="constant")
    assert not any(name == "lr_schedule" for name, _ in clf.callbacks or [])


def test_make_classifier_takes_an_int_hidden_size_and_refuses_fractional_channels(blobs, tmp_path):
    X, y = blobs
    clf = make_classifier("mlp", hidden_sizes=10, max_epochs=1, device="cpu").fit(X, y)
    assert clf.module_.net[1].out_features == 10
    save_checkpoint(clf, "int", directory=tmp_path)
    assert load_checkpoint("int", directory=tmp_path).module_.net[1].out_features == 10
    with pytest.raises(ValueError, match=r"channels=\(2.5,\): 2.5 is not a whole number"):
        make_classifier("cnn", channels=(2.5,), kernel_sizes=3, max_epochs=1, device="cpu").fit(X, y)


def test_a_run_killed_while_holding_the_lock_does_not_block_the_next(tmp_path):
    import os
    import subprocess
    import sys
    out = tmp_path / "run.json"
    holder = subprocess.Popen(   # another process takes the run's lock, then is killed without a chance to clean up
        [sys.executable, "-c", "import sys, time\nfrom utils.io import file_lock\nwith file_lock(sys.argv[1], "
         "RuntimeError):\n    print('held', flush=True)\n    time.sleep(600)", str(tmp_path / "run.lock")],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as e:
            main(BLOBS_RUN + ["--out", str(out)])
        assert f"in use by another run (pid {holder.pid} on" in str(e.value.code)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run.lock").exists() and 0 <= main(BLOBS_RUN + ["--out", str(out)]) <= 1


def test_command_line_refuses_an_unwritable_out_before_training_also_as_root(tmp_path, monkeypatch):
    import errno
    import utils.io

    def refuse(dir=None, **kw):   # what a read-only folder answers a user who is not root
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/.write-probe-x")
    monkeypatch.setattr(utils.io.tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit) as e:
        main(BLOBS_RUN + ["--out", str(tmp_path / "ro" / "run.json")])
    assert str(e.value.code) == (f"error: --out: cannot write into {tmp_path / 'ro'} (Permission denied); choose a "
                                 f"folder this user can write")


def test_resume_takes_a_checkpoint_older_than_the_architecture_options(tmp_path, capsys):
    import json
    from utils.io import dumps
    out = tmp_path / "cnn.json"
    argv = ["--model", "cnn", "--dataset", "blobs", "--subset", "100", "--test-subset", "50", "--batch-size", "25",
            "--device", "cpu", "--quiet", "--out", str(out)]
    main(argv + ["--epochs", "1"])
    ckpt = out.with_suffix(".ckpt.pt")
    saved = torch.load(ckpt, weights_only=True)
    meta = json.loads(saved["meta"])
    for key in ("rule", "lr_schedule", "normalize", "channels", "kernel_sizes", "stride", "padding"):
        del meta["config"][key]   # as utils.train wrote it before these options
    torch.save({**saved, "meta": dumps(meta)}, ckpt)
    main(argv + ["--epochs", "2", "--resume"])
    assert "resuming" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="different configuration"):   # another architecture is another run
        main(argv + ["--epochs", "3", "--resume", "--channels", "4", "8"])
