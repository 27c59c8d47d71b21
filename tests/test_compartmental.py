"""Tests of utils/compartmental.py: the batched torch network against a small per-example NumPy implementation of
the paper's equations (written here, independently), batching, spiking statistics, validation and the sklearn API."""
import math

import numpy as np
import pytest
import torch
from sklearn.base import clone

from utils.compartmental import CompartmentalClassifier, batch_f_etas
from utils.errors import TrainingDiverged

N_IN, N_CLASSES = 20, 4
SMALL = dict(l_f_phase=8, l_t_phase=7, integration_time=4, mem=5, extra_steps=False, dtype="float64",
             use_spiking_feedback=False, use_spiking_feedforward=False)


def small_data(n=20, seed=0):
    g = np.random.default_rng(seed)
    X = g.random((n, N_IN)) * (g.random((n, N_IN)) < 0.5)   # sparse pixels in [0, 1)
    y = np.arange(n) % N_CLASSES
    return torch.tensor(X), torch.tensor(y)


# ---------------------------------------------------------------------------------------------------------------
# the reference: one example at a time, PSPs as explicit sums over each signal's last `mem` values


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_train(p, W, b, Y, c, masks, X, y_idx, order):
    """Online training (batch of one) in rate mode on both paths, following the paper's equations."""
    W, b, Y, c = [w.copy() for w in W], [v.copy() for v in b], [w.copy() for w in Y], [v.copy() for v in c]
    M, mem, dt, lmax = len(W), p["mem"], p["dt"], p["lambda_max"]
    ts = np.arange(1, mem + 1) * dt
    kappa = (np.exp(-ts / p["tau_L"]) - np.exp(-ts / p["tau_s"])) / (p["tau_L"] - p["tau_s"])  # kappa[k]: k steps ago
    g_A = p["g_A"] if p["use_apical_conductance"] else 0.0
    k_B = p["g_B"] / (p["g_L"] + p["g_B"] + g_A)
    k_D = p["g_D"] / (p["g_L"] + p["g_D"])
    sizes = [w.shape[0] for w in W]
    hist_x = np.zeros((mem, X.shape[1]))                 # row 0: the newest
    hist = [np.zeros((mem, n)) for n in sizes]
    C = [np.zeros(n) for n in sizes]
    fb_src = (lambda m: M - 1) if p["use_broadcast"] else (lambda m: m + 1)
    psp = lambda h: kappa @ h                             # noqa: E731
    for n in order:
        x = lmax * X[n]
        target = np.eye(sizes[-1])[y_idx[n]]
        means = {}
        for phase, T in (("f", p["l_f_phase"]), ("t", p["l_t_phase"])):
            rec = {k: [[] for _ in range(M)] for k in ("C", "A", "lam", "psp_in", "psp_fb")}
            for t in range(T):
                hist_x = np.vstack([x, hist_x[:-1]])
                fb_psp = [psp(hist[fb_src(m)]) for m in range(M - 1)]   # feedback as of the previous step
                for m in range(M):
                    psp_in = psp(hist_x) if m == 0 else psp(hist[m - 1])
                    B = W[m] @ psp_in + b[m]
                    if m < M - 1:
                        A = Y[m] @ fb_psp[m] + (c[m] if p["use_feedback_bias"] else 0.0)
                        if p["use_conductances"]:
                            C[m] = C[m] + dt * (-p["g_L"] * C[m] + p["g_B"] * (B - C[m]) + g_A * (A - C[m]))
                        else:
                            C[m] = k_B * B
                        rec["A"][m].append(A)
                        rec["psp_fb"][m].append(fb_psp[m])
                    else:
                        gE = target if phase == "t" else np.zeros_like(target)
                        gI = 1.0 - gE if phase == "t" else np.zeros_like(target)
                        if p["use_conductances"]:
                            I = gE * (p["E_E"] - C[m]) + gI * (p["E_I"] - C[m])
                            C[m] = C[m] + dt * (-p["g_L"] * C[m] + p["g_D"] * (B - C[m]) + I)
                        else:
                            C[m] = k_D * B + (gE * p["E_E"] + gI * p["E_I"]) / (p["g_L"] + p["g_D"])
                    lam = lmax * sigmoid(C[m])
                    hist[m] = np.vstack([lam, hist[m][:-1]])
                    rec["C"][m].append(C[m].copy())
                    rec["lam"][m].append(lam)
                    rec["psp_in"][m].append(psp_in)
            w = p["integration_time"]
            means[phase] = {k: [np.mean(v[-w:], axis=0) if v else None for v in vals] for k, vals in rec.items()}
        f, tt = means["f"], means["t"]
        dsig = lambda v: sigmoid(v) * (1 - sigmoid(v))  # noqa: E731
        E = [None] * M
        E[-1] = -k_D * lmax * (tt["lam"][-1] - lmax * sigmoid(f["C"][-1])) * dsig(f["C"][-1])
        for m in range(M - 1):
            E[m] = -k_B * lmax * (sigmoid(tt["A"][m]) - sigmoid(f["A"][m])) * dsig(f["C"][m])
        if p["update_feedback_weights"]:
            for m in range(M - 1):
                E_inv = -(lmax * sigmoid(f["C"][m]) - sigmoid(f["A"][m])) * lmax * dsig(f["A"][m])
                Y[m] = Y[m] - p["b_etas"][m] * np.outer(E_inv, f["psp_fb"][m])
                if masks is not None:
                    Y[m] = Y[m] * masks[m]
        for m in range(M):
            P = 20.0 / lmax ** 2 if m == M - 1 else 20.0 / lmax
            W[m] = W[m] - p["f_etas"][m] * P * np.outer(E[m], f["psp_in"][m])
            b[m] = b[m] - p["f_etas"][m] * P * E[m]
        if p["use_symmetric_weights"]:
            for m in range(M - 2, -1, -1):
                Y[m] = W[m + 1].T @ Y[m + 1] if (p["use_broadcast"] and m < M - 2) else W[m + 1].T.copy()
            if masks is not None:
                Y = [Y[m] * masks[m] * 5 for m in range(M - 1)]
    return W, b, Y


CASES = {
    "1 layer random broadcast": dict(n_hidden=(15,)),
    "2 layers random broadcast": dict(n_hidden=(15, 8)),
    "2 layers random no broadcast": dict(n_hidden=(15, 8), use_broadcast=False),
    "2 layers sparse": dict(n_hidden=(15, 8), use_sparse_feedback=True),
    "1 layer symmetric": dict(n_hidden=(15,), use_symmetric_weights=True),
    "2 layers symmetric broadcast": dict(n_hidden=(15, 8), use_symmetric_weights=True),
    "2 layers symmetric sparse no broadcast": dict(n_hidden=(15, 8), use_symmetric_weights=True,
                                                   use_sparse_feedback=True, use_broadcast=False),
    "2 layers learned": dict(n_hidden=(15, 8), update_feedback_weights=True, b_etas=(0.05, 0.03)),
    "2 layers learned sparse no broadcast": dict(n_hidden=(15, 8), update_feedback_weights=True, b_etas=(0.05, 0.03),
                                                 use_sparse_feedback=True, use_broadcast=False),
    "1 layer no conductances": dict(n_hidden=(15,), use_conductances=False),
    "2 layers no conductances no broadcast": dict(n_hidden=(15, 8), use_conductances=False, use_broadcast=False),
    "2 layers apical conductance, feedback bias, plain init": dict(
        n_hidden=(15, 8), use_apical_conductance=True, g_A=0.05, use_feedback_bias=True,
        use_weight_optimization=False, f_etas=(0.3, 0.2, 0.1)),
    "1 layer long phases (several input segments)": dict(n_hidden=(15,), l_f_phase=70, l_t_phase=66,
                                                         integration_time=20, mem=10),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_numpy_reference(case):
    clf = CompartmentalClassifier(**{**SMALL, **CASES[case]}, batch_size=1, seed=3)
    X, y = small_data()
    clf.initialize(N_IN, np.arange(N_CLASSES))
    W0 = [w.numpy().copy() for w in clf.W_]
    b0 = [v.numpy().copy() for v in clf.b_]
    Y0 = [w.numpy().copy() for w in clf.Y_]
    c0 = [v.numpy().copy() for v in clf.c_]
    masks = [(w != 0).astype(float) for w in Y0] if clf.use_sparse_feedback else None
    g = torch.Generator()
    g.set_state(clf.gen_cpu_.get_state())
    order = torch.randperm(len(y), generator=g).numpy()   # the estimator's example order
    clf.partial_fit(X, y)
    params = {**clf.get_params(), "f_etas": clf.f_etas_, "b_etas": clf.b_etas_}
    W, b, Y = reference_train(params, W0, b0, Y0, c0, masks, X.numpy(), y.numpy(), order)
    for m in range(len(W)):
        assert np.abs(W[m] - W0[m]).max() > 1e-6, "the weights did not move: the test would prove nothing"
        np.testing.assert_allclose(clf.W_[m].numpy(), W[m], rtol=0, atol=1e-10, err_msg=f"W{m + 1}")
        np.testing.assert_allclose(clf.b_[m].numpy(), b[m], rtol=0, atol=1e-10, err_msg=f"b{m + 1}")
    for m in range(len(Y)):
        np.testing.assert_allclose(clf.Y_[m].numpy(), Y[m], rtol=0, atol=1e-10, err_msg=f"Y{m + 1}")


def test_batch_update_is_mean_of_single_updates():
    X, y = small_data(6, seed=1)
    base = CompartmentalClassifier(**SMALL, n_hidden=(15, 8), seed=5, batch_size=6)
    batched = clone(base).partial_fit(X, y, classes=np.arange(N_CLASSES))
    singles = []
    for i in range(6):
        one = clone(base).set_params(batch_size=1).partial_fit(X[i:i + 1], y[i:i + 1], classes=np.arange(N_CLASSES))
        singles.append(one)
    init = clone(base).initialize(N_IN, np.arange(N_CLASSES))
    for m in range(3):
        mean_W = torch.stack([s.W_[m] for s in singles]).mean(0)
        assert (mean_W - init.W_[m]).abs().max() > 1e-6
        torch.testing.assert_close(batched.W_[m], mean_W, rtol=0, atol=1e-12)
        torch.testing.assert_close(batched.b_[m], torch.stack([s.b_[m] for s in singles]).mean(0), rtol=0, atol=1e-12)


def test_batch_f_etas_scales_hidden_by_2B_and_output_by_2():
    assert batch_f_etas(1) == (0.21, 0.21)
    assert batch_f_etas(16) == pytest.approx((6.72, 0.42))
    assert batch_f_etas(8, (0.23, 0.23, 0.12)) == pytest.approx((3.68, 3.68, 0.24))


def test_cosine_decay_scales_each_batch_update():
    """lr_decay_examples=8, batches of 4: the second batch's update is 0.5 times the constant-rate one, then 0."""
    X, y = small_data(12, seed=2)
    classes = np.arange(N_CLASSES)
    base = CompartmentalClassifier(**SMALL, n_hidden=(15,), seed=3, batch_size=4)
    assert clone(base).set_params(lr_decay_examples=8).lr_factor() == 1.0   # before any training
    decayed = clone(base).set_params(lr_decay_examples=8).partial_fit(X[:4], y[:4], classes=classes)
    const = clone(base).partial_fit(X[:4], y[:4], classes=classes)
    for m in range(2):   # first batch: factor cos-decay(0) = 1
        torch.testing.assert_close(decayed.W_[m], const.W_[m], rtol=0, atol=1e-12)
    assert decayed.lr_factor() == pytest.approx(0.5)   # 0.5 (1 + cos(pi 4 / 8))
    before = [w.clone() for w in decayed.W_]
    decayed.partial_fit(X[4:8], y[4:8])
    const.partial_fit(X[4:8], y[4:8])
    for m in range(2):
        step_const = const.W_[m] - before[m]
        assert step_const.abs().max() > 1e-6
        torch.testing.assert_close(decayed.W_[m] - before[m], 0.5 * step_const, rtol=1e-9, atol=1e-12)
    assert decayed.lr_factor() == 0.0
    frozen = [w.clone() for w in decayed.W_]
    decayed.partial_fit(X[8:], y[8:])   # past lr_decay_examples: rates stay at 0
    for m in range(2):
        torch.testing.assert_close(decayed.W_[m], frozen[m], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# spiking


def test_spiking_reproducible_under_seed():
    X, y = small_data(24)
    kw = dict(n_hidden=(15,), l_f_phase=12, l_t_phase=10, integration_time=5, batch_size=4, max_epochs=1)
    a = CompartmentalClassifier(**kw, seed=11).fit(X, y)
    b = CompartmentalClassifier(**kw, seed=11).fit(X, y)
    c = CompartmentalClassifier(**kw, seed=12).fit(X, y)
    for m in range(2):
        assert torch.equal(a.W_[m], b.W_[m])
    assert not torch.equal(a.W_[1], c.W_[1])
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(X))


@pytest.mark.parametrize("extra", [dict(), dict(use_apical_conductance=True, g_A=0.05)])
def test_spiking_partial_last_batch(extra):
    """n not a multiple of batch_size: the last, smaller batch runs on a slice of the state (non-contiguous signal
    buffers) in both the layer-by-layer path and the step-by-step path (apical conductance)."""
    X, y = small_data(22)
    kw = dict(n_hidden=(15, 6), l_f_phase=70, l_t_phase=12, integration_time=5, batch_size=8, max_epochs=2, **extra)
    a = CompartmentalClassifier(**kw, seed=7).fit(X, y)
    b = CompartmentalClassifier(**kw, seed=7).fit(X, y)
    assert a.examples_seen_ == 44
    for m in range(3):
        assert torch.isfinite(a.W_[m]).all() and torch.equal(a.W_[m], b.W_[m])


@pytest.mark.parametrize("lam", [0.02, 0.2, 1.5])
def test_poisson_counts_have_the_expected_mean_and_variance(lam):
    clf = CompartmentalClassifier(dtype="float64")
    n = 400_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = clf._poisson(torch.full((n,), lam, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), u)
    se = math.sqrt(lam / n)
    assert abs(counts.mean().item() - lam) < 5 * se
    assert abs(counts.var().item() - lam) < 0.02 * lam + 10 * se
    assert (counts == counts.round()).all() and counts.min() >= 0
    for k in range(4):   # the distribution itself, P(N = k)
        pk = math.exp(-lam) * lam ** k / math.factorial(k)
        assert abs((counts == k).double().mean().item() - pk) < 5 * math.sqrt(pk * (1 - pk) / n) + 1e-6


@pytest.mark.parametrize("from_potential", [True, False])
def test_fused_spike_sampler_matches_eager(monkeypatch, from_potential):
    """The fused sampler's logic (6 dense inverse-CDF thresholds, exact tail beyond; run here uncompiled, so the test
    needs no C++ compiler) gives the same counts as the eager sampler from the same uniforms."""
    import utils.compartmental as cm
    clf = CompartmentalClassifier(dtype="float64", lambda_max=1.5)     # high rates: the tail beyond 6 is exercised
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 30, 60, generator=g, dtype=torch.float64) * 3 if from_potential else \
        torch.rand(1, 30 * 60, generator=g, dtype=torch.float64) * 1.5
    u = torch.rand(40, 30 * 60, generator=g, dtype=torch.float64)
    u = u.view(40, 30, 60) if from_potential else u                     # rates: one per input, broadcast over steps
    monkeypatch.setattr(cm, "FUSE_MIN", 1)
    monkeypatch.setitem(cm._fused, "cpu", cm._spike_counts)             # the fused path, uncompiled
    lam_f, n_f = clf._spikes(x, u, from_potential)
    monkeypatch.setattr(cm, "FUSE", False)
    lam_e, n_e = clf._spikes(x, u, from_potential)
    torch.testing.assert_close(lam_f.expand_as(u), lam_e.expand_as(u), rtol=0, atol=1e-15)
    assert n_f.max() > cm.FUSE_K                                        # the tail was needed
    assert torch.equal(n_f, n_e)


def test_truncated_kernel_weights():
    clf = CompartmentalClassifier(**{**SMALL, "mem": 6, "dt": 0.5}).initialize(N_IN, np.arange(N_CLASSES))
    t = np.arange(1, 7) * 0.5
    expected = (np.exp(-t / 10.0) - np.exp(-t / 3.0)) / 7.0
    np.testing.assert_allclose(clf.kappa_, expected, rtol=1e-12)
    # an impulse through the recurrence: kappa(dt), ..., kappa(mem dt), then exactly nothing (truncation)
    eL, eS = math.exp(-0.5 / 10.0), math.exp(-0.5 / 3.0)
    S = np.zeros((20, 3))
    S[6] = [1.0, 0.0, 2.0]                           # rows 0..5: the (empty) history
    aL, aS = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    out = []
    for row in range(6, 20):
        new, old = torch.tensor(S[row]), torch.tensor(S[row - 6])
        clf._filter_step(aL, aS, new, old, eL, eS, eL ** 7, eS ** 7)
        out.append(((aL - aS) / 7.0).numpy())
    out = np.array(out)
    np.testing.assert_allclose(out[:6, 0], expected, rtol=1e-10)
    np.testing.assert_allclose(out[:6, 2], 2 * expected, rtol=1e-10)
    np.testing.assert_allclose(out[6:], 0, atol=1e-15)
    assert np.all(out[:, 1] == 0)
    # the banded matrix used for the input layer holds the same weights
    K = clf._kband(4).numpy()
    assert K.shape == (4, 10)
    np.testing.assert_allclose(K[3, 9::-1][:6], expected)


# ---------------------------------------------------------------------------------------------------------------
# validation and the scikit-learn API


@pytest.mark.parametrize("params, name", [
    (dict(tau_s=-1.0), "tau_s"), (dict(tau_L=0.0), "tau_L"), (dict(tau_s=10.0, tau_L=10.0), "tau_s"),
    (dict(n_hidden=()), "n_hidden"), (dict(n_hidden=(10, 0)), "n_hidden"),
    (dict(l_f_phase=10, integration_time=20), "l_f_phase"), (dict(l_t_phase=5, integration_time=20), "l_t_phase"),
    (dict(f_etas=(0.1,)), "f_etas"), (dict(n_hidden=(5, 5), f_etas=(0.1, 0.1)), "f_etas"),
    (dict(b_etas=(0.1, 0.1)), "b_etas"), (dict(update_feedback_weights=True), "b_etas"),
    (dict(dtype="float16"), "dtype"), (dict(use_broadcast="yes"), "use_broadcast"), (dict(dt=-1.0), "dt"),
    (dict(mem=0), "mem"), (dict(batch_size=0), "batch_size"), (dict(g_L=-0.1), "g_L"),
    (dict(lr_decay_examples=0), "lr_decay_examples"), (dict(lr_decay_examples=2.5), "lr_decay_examples"),
])
def test_bad_hyperparameters_raise_naming_the_parameter(params, name):
    X, y = small_data(8)
    with pytest.raises(ValueError, match=name):
        CompartmentalClassifier(**params).fit(X, y)


def test_unknown_keyword_raises():
    with pytest.raises(ValueError, match="use_magic"):
        CompartmentalClassifier().set_params(use_magic=True)


def test_get_set_params_and_clone_round_trip():
    clf = CompartmentalClassifier(n_hidden=(7, 3), f_etas=(0.1, 0.2, 0.3), use_sparse_feedback=True, lambda_max=0.3,
                                  seed=4, hook_every=50)
    params = clf.get_params()
    for name in ("n_hidden", "f_etas", "b_etas", "batch_size", "max_epochs", "lambda_max", "tau_s", "tau_L", "dt", "mem",
                 "g_B", "g_A", "g_D", "g_L", "E_E", "E_I", "l_f_phase", "l_t_phase", "l_f_phase_test",
                 "integration_time", "extra_steps", "use_conductances", "use_broadcast", "use_spiking_feedback",
                 "use_spiking_feedforward", "use_symmetric_weights", "noisy_symmetric_weights", "use_sparse_feedback",
                 "update_feedback_weights", "use_apical_conductance", "use_weight_optimization", "use_feedback_bias",
                 "record_backprop_angle", "seed", "device", "dtype", "verbose", "hook", "hook_every"):
        assert name in params
    twin = clone(clf)
    assert twin.get_params() == params
    twin.set_params(lambda_max=0.5, n_hidden=(4,), f_etas=None)
    assert twin.lambda_max == 0.5 and clf.lambda_max == 0.3


def test_learns_an_easy_problem_and_calls_the_hook():
    # 4 classes lighting disjoint blocks of an 8 x 8 image. lambda_max=1: at the paper's 0.2 a 64-pixel input drives
    # the weight-optimised hidden layer too weakly for its activity to depend much on the input
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 4
    blocks = torch.zeros(4, 64)
    for k in range(4):
        blocks[k, 16 * k:16 * (k + 1)] = 1
    X = (blocks[y] * (0.6 + 0.4 * torch.rand(240, 64, generator=g))).reshape(240, 1, 8, 8)
    calls = []
    clf = CompartmentalClassifier(n_hidden=(30,), batch_size=4, max_epochs=2, l_f_phase=20, l_t_phase=20,
                                  integration_time=10, l_f_phase_test=40, lambda_max=1.0, seed=0,
                                  hook=lambda c, info: calls.append(dict(info)), hook_every=80)
    clf.fit(X[:200], y[:200])
    acc = clf.score(X[200:], y[200:])
    assert acc > 0.9, acc       # chance: 0.25
    proba = clf.predict_proba(X[200:])
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    assert set(clf.predict(X[:5])) <= {0, 1, 2, 3}
    assert calls[0]["examples_seen"] == 0
    assert [c["examples_seen"] for c in calls[1:]] == [80, 160, 240, 320, 400]
    for c in calls[1:]:
        assert set(c) == {"epoch", "examples_seen", "n_train", "train_loss", "train_acc"}
        assert c["n_train"] == 200 and 0 <= c["train_acc"] <= 1 and c["train_loss"] > 0
    assert calls[-1]["epoch"] == 1
    assert set(clf.named_weights()) == {"W1", "W2", "Y1"}


def test_backprop_angle_reported_to_the_hook():
    X, y = small_data(16)
    calls = []
    CompartmentalClassifier(**SMALL, n_hidden=(15, 8), batch_size=4, record_backprop_angle=True, seed=0,
                            hook=lambda c, info: calls.append(info)).fit(X, y)
    angles = [c["bp_angle"] for c in calls[1:]]
    assert len(angles) == 4 and all(set(a) == {"hidden1", "hidden2"} for a in angles)
    assert all(0 <= v <= 180 for a in angles for v in a.values())


def test_divergence_raises_training_diverged():
    X, y = small_data(8)
    X[3, 0] = float("nan")
    with pytest.raises(TrainingDiverged):
        CompartmentalClassifier(**SMALL, n_hidden=(5,), seed=0).fit(X, y)


def test_string_labels_and_numpy_input():
    X, y = small_data(12)
    labels = np.array(["a", "b", "c", "d"])[y.numpy()]
    clf = CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=4, seed=0).fit(X.numpy(), labels)
    assert set(clf.predict(X)) <= set(labels)
    assert 0 <= clf.score(X, labels) <= 1
