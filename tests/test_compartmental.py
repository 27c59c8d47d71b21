"""Tests of the segregated-dendrite network: the fast engine (utils/compartmental_engine.py) against the step-by-step
reference (utils/compartmental_reference.py), the fixes that make it faithful to the authors' code, populations,
spiking statistics, validation and the scikit-learn API."""
import math

import numpy as np
import pytest
import torch
from sklearn.base import clone

from utils import compartmental_engine as engine
from utils import compartmental_native as native
from utils import compartmental_reference as R
from utils.compartmental import CompartmentalClassifier, batch_f_etas
from utils.compartmental_population import fit_population
from utils.errors import TrainingDiverged

N_IN, N_CLASSES = 20, 4
SMALL = dict(l_f_phase=8, l_t_phase=7, integration_time=4, mem=5, extra_steps=False, dtype="float64",
             use_spiking_feedback=False, use_spiking_feedforward=False)


def lone_population(clf, B):
    """The engine's population of the one (initialised) network clf, at rest for B examples."""
    return engine.Population([clf.config()], [clf._weights()], [clf._fresh_state(B)], B, clf.device_, clf.dtype_)


def small_data(n=20, seed=0):
    g = np.random.default_rng(seed)
    X = g.random((n, N_IN)) * (g.random((n, N_IN)) < 0.5)   # sparse pixels in [0, 1)
    y = np.arange(n) % N_CLASSES
    return torch.tensor(X), torch.tensor(y)


# ---------------------------------------------------------------------------------------------------------------
# the engine against the reference


def reference_epoch(clf, X, y):
    """What the reference does with the estimator's configuration, initial weights and example order: one epoch in
    batches of clf.batch_size (a smaller last batch runs on the first slots of the state, the others keep theirs)."""
    net = R.Network(clf.config())
    order = torch.randperm(len(y), generator=net.gen)    # the estimator draws its order from the same generator
    onehot = torch.nn.functional.one_hot(y, N_CLASSES).double()
    B = clf.batch_size
    net.reset(B)
    for i in range(0, len(y), B):
        idx = order[i:i + B]
        k, full = len(idx), net.state
        net.state = {key: [v[..., :k, :] for v in val] if isinstance(val, list) else val[:, :k]
                     for key, val in full.items()}
        net.train_batch(X[idx], onehot[idx])
        for key, val in full.items():
            for old, new in (zip(val, net.state[key]) if isinstance(val, list) else [(val, net.state[key])]):
                old[..., :k, :] = new
        net.state = full
    return net


CASES = {
    "1 layer random broadcast": dict(n_hidden=(15,)),
    "2 layers random broadcast": dict(n_hidden=(15, 8)),
    "2 layers random no broadcast": dict(n_hidden=(15, 8), use_broadcast=False),
    "2 layers sparse": dict(n_hidden=(15, 8), use_sparse_feedback=True),
    "1 layer symmetric": dict(n_hidden=(15,), use_symmetric_weights=True),
    "2 layers symmetric broadcast": dict(n_hidden=(15, 8), use_symmetric_weights=True),
    "2 layers noisy symmetric sparse no broadcast": dict(n_hidden=(15, 8), use_symmetric_weights=True,
                                                         noisy_symmetric_weights=True, use_sparse_feedback=True,
                                                         use_broadcast=False),
    "2 layers learned, feedback bias": dict(n_hidden=(15, 8), update_feedback_weights=True, b_etas=(0.05, 0.03),
                                            use_feedback_bias=True),
    "2 layers learned sparse no broadcast": dict(n_hidden=(15, 8), update_feedback_weights=True, b_etas=(0.05, 0.03),
                                                 use_sparse_feedback=True, use_broadcast=False),
    "1 layer no conductances": dict(n_hidden=(15,), use_conductances=False),
    "2 layers no conductances no broadcast": dict(n_hidden=(15, 8), use_conductances=False, use_broadcast=False),
    "2 layers apical conductance, feedback bias, plain init": dict(
        n_hidden=(15, 8), use_apical_conductance=True, g_A=0.05, use_feedback_bias=True,
        use_weight_optimization=False, f_etas=(0.3, 0.2, 0.1)),
    "1 layer long phases (several segments)": dict(n_hidden=(15,), l_f_phase=70, l_t_phase=66,
                                                   integration_time=20, mem=10),
    "2 layers the authors' unfiltered rates, paper init": dict(n_hidden=(15, 8), rate_psp="rate", init="paper"),
    "1 layer apical conductance, the flag alone (g_A = 0.05)": dict(n_hidden=(15,), use_apical_conductance=True),
    "2 layers apical conductance g_A = 0.2, no broadcast": dict(n_hidden=(15, 8), use_apical_conductance=True,
                                                              g_A=0.2, use_broadcast=False),
    "2 layers no conductances, apical conductance (k_B with g_A)": dict(n_hidden=(15, 8), use_conductances=False,
                                                                      use_apical_conductance=True, g_A=0.05),
}


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_reference(case, batch_size):
    """Rate mode, float64: the engine's weights after an epoch equal the step-by-step reference's to 1e-10 (20
    examples, batches of 1 or 3 with a smaller last batch)."""
    clf = CompartmentalClassifier(**{**SMALL, **CASES[case]}, batch_size=batch_size, seed=3)
    X, y = small_data()
    clf.initialize(N_IN, np.arange(N_CLASSES))
    net0 = R.Network(clf.config())
    for a, b in zip(net0.W + net0.Y, clf.W_ + clf.Y_):   # the same initial weights from the same seed
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    net = reference_epoch(clf, X, y)
    clf.partial_fit(X, y)
    for m in range(len(net.W)):
        assert (net.W[m] - net0.W[m]).abs().max() > 1e-6, "the weights did not move: the test would prove nothing"
        torch.testing.assert_close(clf.W_[m], net.W[m], rtol=0, atol=1e-10, msg=f"W{m + 1}")
        torch.testing.assert_close(clf.b_[m], net.b[m], rtol=0, atol=1e-10, msg=f"b{m + 1}")
    for m in range(len(net.Y)):
        if clf.update_feedback_weights:
            assert (net.Y[m] - net0.Y[m]).abs().max() > 1e-6
        torch.testing.assert_close(clf.Y_[m], net.Y[m], rtol=0, atol=1e-10, msg=f"Y{m + 1}")
        torch.testing.assert_close(clf.c_[m], net.c[m], rtol=0, atol=1e-10, msg=f"c{m + 1}")


@pytest.mark.parametrize("flags", [dict(), dict(use_apical_conductance=True, g_A=0.1)])
def test_spiking_engine_matches_reference_in_distribution(flags):
    """Spiking: from the same weights, the window means of a forward phase from rest (hidden and output C, over 400
    examples of one image) agree with the reference's within 5 standard errors, neuron by neuron on average."""
    x = small_data(1, seed=4)[0].repeat(400, 1)
    kw = dict(n_hidden=(12,), l_f_phase=30, integration_time=10, mem=8, dtype="float64", extra_steps=False,
              lambda_max=1.0, seed=0, **flags)
    clf = CompartmentalClassifier(**kw).initialize(N_IN, np.arange(N_CLASSES))
    pop = lone_population(clf, 400)
    from utils.compartmental_population import phase_keys
    ours = pop.phase(x.unsqueeze(0), np.array([30]), None, 10, phase_keys([clf], [torch.arange(400)], [0], "test", "cpu"))
    net = R.Network(clf.config())
    net.reset(400)
    ref = net.phase(x, 30)
    for m in range(2):
        a, b = ours["C"][m][0], ref["C"][m]
        se = torch.sqrt(a.var(0) / 400 + b.var(0) / 400)
        z = ((a.mean(0) - b.mean(0)) / se).abs()
        assert float(z.mean()) < 2.0 and float(z.max()) < 5.0, (m, z)
        assert float(a.std(0).mean()) > 1e-3                    # spikes made the means vary: a real test


# ---------------------------------------------------------------------------------------------------------------
# faithful to the authors' code


def test_instantaneous_output_soma_takes_the_steady_state_in_the_target_phase():
    cfg = R.Config(use_conductances=False)
    B, g_E = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    C = R.output_soma(None, B, g_E, 1 - g_E, cfg)
    expected = torch.tensor([(0.6 * 2.0 + 8.0) / (0.1 + 0.6 + 1.0), (0.6 * -1.0 - 8.0) / (0.1 + 0.6 + 1.0)])
    torch.testing.assert_close(C, expected)
    # the engine's filter gives the same: coef B + c_I I0 with I0 = g_E E_E + g_I E_I
    clf = CompartmentalClassifier(n_hidden=(3,), use_conductances=False).initialize(5, np.arange(2))
    dec, coef, _, c_I = R.soma_coefficients(clf.config(), True, 1.0)
    torch.testing.assert_close(coef * B + c_I * (g_E * 8.0 + (1 - g_E) * -8.0), expected)
    assert dec == 0.0 and R.soma_coefficients(clf.config(), True)[1] == pytest.approx(0.6 / 0.7)


def test_learned_feedback_and_feedback_bias_follow_the_authors_rule():
    """One example: dY = -b_eta E_inv PSP_fb^T and dc = -b_eta E_inv with E_inv = -(lambda_max sigmoid(mean C^f) -
    alpha^f) sigmoid'(mean A^f) (no extra factor lambda_max), computed here by hand from the reference's means."""
    X, y = small_data(1, seed=3)
    kw = dict(SMALL, n_hidden=(6,), update_feedback_weights=True, b_etas=(0.7,), use_feedback_bias=True, seed=1)
    clf = CompartmentalClassifier(**kw).initialize(N_IN, np.arange(N_CLASSES))
    Y0, c0 = clf.Y_[0].clone(), clf.c_[0].clone()
    net = R.Network(clf.config())
    net.reset(1)
    f, _ = net.train_batch(X, torch.nn.functional.one_hot(y, N_CLASSES).double())
    s = torch.sigmoid
    C, A, lmax = f["C"][0], f["A"][0], 0.2
    E_inv = -(lmax * s(C) - s(A)) * s(A) * (1 - s(A))
    clf.partial_fit(X, y)
    torch.testing.assert_close(clf.Y_[0] - Y0, -0.7 * E_inv.t() @ f["psp_fb"][0], rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(clf.c_[0] - c0, -0.7 * E_inv[0], rtol=1e-9, atol=1e-14)
    assert (clf.c_[0] - c0).abs().max() > 1e-4


@pytest.mark.parametrize("init, spread", [("authors", 2.0), ("paper", 1.0)])
def test_initial_weights_mean_and_spread(init, spread):
    cfg = R.Config(sizes=(784, 500, 100, 10), init=init)
    W, b, Y, c = R.initial_weights(cfg, torch.Generator().manual_seed(0))
    for m, N in enumerate((784, 500, 100)):
        W_avg, W_sd = R.weight_spread(N, 0.2)
        assert float(W[m].mean()) == pytest.approx(W_avg, abs=0.05 * spread * W_sd)
        assert float(W[m].std()) == pytest.approx(spread * W_sd, rel=0.05)
        assert float(b[m].mean()) == pytest.approx(0.8, abs=1e-3)
    # broadcast feedback: one random matrix per hidden layer with the layer above's spread (500-100-10: 1.27 and
    # 2.83 with the authors' initialisation; the old product of transposes gave 8.9)
    for m, N in enumerate((500, 100)):
        assert tuple(Y[m].shape) == ((500, 10) if m == 0 else (100, 10))
        assert float(Y[m].std()) == pytest.approx(spread * R.weight_spread(N, 0.2)[1], rel=0.1)
        assert float(c[m].mean()) == pytest.approx(0.8, abs=1e-3)
    if init == "authors":
        assert float(Y[0].std()) == pytest.approx(1.27, abs=0.03)


def test_set_weights_round_trip():
    X, y = small_data(12)
    a = CompartmentalClassifier(**SMALL, n_hidden=(7, 5), batch_size=4, seed=1).fit(X, y)
    b = CompartmentalClassifier(**SMALL, n_hidden=(7, 5), seed=9).initialize(N_IN, np.arange(N_CLASSES))
    weights = {**a.named_weights(), **{f"b{m + 1}": v for m, v in enumerate(a.b_)},
               **{f"c{m + 1}": v for m, v in enumerate(a.c_)}}
    b.set_weights({k: v.numpy() for k, v in weights.items()})   # arrays are accepted too
    for k, v in b.named_weights().items():
        assert torch.equal(v, a.named_weights()[k])
    np.testing.assert_allclose(b.decision_function(X), a.decision_function(X), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="W3 must have shape"):
        b.set_weights({"W3": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="unknown weight 'W9'"):
        b.set_weights({"W9": torch.zeros(2, 2)})
    with pytest.raises(RuntimeError, match="not fitted"):
        CompartmentalClassifier().set_weights({})


def test_estimator_defaults_are_the_reference_config():
    clf, cfg = CompartmentalClassifier(), R.Config()
    for f in R.fields(R.Config):
        if f.name not in ("sizes", "f_etas", "b_etas", "seed"):
            assert getattr(clf, f.name) == getattr(cfg, f.name), f.name


# ---------------------------------------------------------------------------------------------------------------
# populations


def _population_case(dtype, extra):
    base = dict(n_hidden=(15, 6), l_f_phase=70, l_t_phase=12, integration_time=5, batch_size=8, dtype=dtype, **extra)
    ests = [CompartmentalClassifier(**base, seed=1, max_epochs=2, f_etas=(0.3, 0.3, 0.1)),
            CompartmentalClassifier(**base, seed=2, max_epochs=1, lambda_max=0.3, g_L=0.15, tau_s=2.0),
            CompartmentalClassifier(**base, seed=3, max_epochs=3, lr_decay_examples=40, g_B=0.5)]
    data = [small_data(22, 0), small_data(30, 1), small_data(13, 2)]
    return ests, data


@pytest.mark.parametrize("dtype, extra", [("float64", dict()),
                                          ("float64", dict(use_spiking_feedback=False, use_spiking_feedforward=False)),
                                          ("float64", dict(use_apical_conductance=True, g_A=0.05)),
                                          ("float32", dict())],
                         ids=["spiking", "rates", "spiking apical", "spiking float32"])
def test_population_equals_lone_runs(dtype, extra):
    """Three members (different rates, lambda_max, conductances, tau_s, seeds, epochs, decay; data of 22, 30 and 13
    examples, so smaller last batches and random phase lengths) trained as one population equal three lone fits:
    in spiking mode the same spikes (identical predictions), weights to float64 rounding (float32, the default: the
    same uniforms, two per 64-bit draw, and weights to float32 rounding)."""
    ests, data = _population_case(dtype, extra)
    lone = [clone(e).fit(*d) for e, d in zip(ests, data)]
    pop = fit_population([clone(e) for e in ests], data)
    X_test = small_data(16, 5)[0]
    for a, b in zip(lone, pop):
        assert a.examples_seen_ == b.examples_seen_ and a.epochs_done_ == b.epochs_done_
        for wa, wb in zip(a.W_ + a.b_ + a.Y_, b.W_ + b.b_ + b.Y_):
            torch.testing.assert_close(wb, wa, rtol=0, atol=1e-10 if dtype == "float64" else 1e-5)
        if "use_spiking_feedforward" not in extra:
            np.testing.assert_array_equal(b.decision_function(X_test), a.decision_function(X_test))
    assert not torch.equal(pop[0].W_[0], pop[1].W_[0])


def test_population_members_get_their_own_hook_calls():
    X, y = small_data(24)
    calls = {0: [], 1: []}
    ests = [CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=4, seed=s, max_epochs=1 + s, hook_every=8,
                                    hook=lambda c, info, s=s: calls[s].append((info["examples_seen"],
                                                                               float(c.W_[0].sum()))))
            for s in (0, 1)]
    fit_population(ests, [(X, y), (X[:16], y[:16])])
    assert [e for e, _ in calls[0]] == [0, 8, 16, 24]
    assert [e for e, _ in calls[1]] == [0, 8, 16, 24, 32]
    assert calls[0][-1][1] == pytest.approx(float(ests[0].W_[0].sum()))   # the hook saw the member's own weights


def test_cross_validate_trains_the_folds_as_one_population(monkeypatch):
    from utils import compartmental_kind, compartmental_population, evaluation
    X, y = small_data(30)
    clf = CompartmentalClassifier(**SMALL, n_hidden=(6,), batch_size=4, seed=2)
    sizes = []
    real = compartmental_population.fit_population
    monkeypatch.setattr(compartmental_kind, "fit_population", lambda ests, data: sizes.append(len(ests)) or real(ests, data))
    scores = evaluation.cross_validate(clf, X, y, folds=3, seed=1)
    assert sizes == [3]
    from sklearn.model_selection import StratifiedKFold
    expected = []
    for tr, te in StratifiedKFold(3, shuffle=True, random_state=1).split(np.zeros(30), y.numpy()):
        expected.append(clone(clf).fit(X[tr], y[tr]).score(X[te], y[te]))
    np.testing.assert_array_equal(scores, expected)


@pytest.mark.parametrize("make, match", [
    (lambda: ([CompartmentalClassifier(n_hidden=(5,)), CompartmentalClassifier(n_hidden=(6,))], 2), "n_hidden"),
    (lambda: ([CompartmentalClassifier(), CompartmentalClassifier(use_broadcast=False)], 2), "use_broadcast"),
    (lambda: ([CompartmentalClassifier()], 2), "1 estimators but 2 training sets"),
    (lambda: ([], 0), "at least one estimator"),
    (lambda: ([CompartmentalClassifier(), "mlp"], 2), "not a CompartmentalClassifier"),
])
def test_fit_population_bad_input(make, match):
    ests, k = make()
    X, y = small_data(8)
    with pytest.raises(ValueError, match=match):
        fit_population(ests, [(X, y)] * k)


def test_fit_population_empty_training_set():
    X, y = small_data(8)
    with pytest.raises(ValueError, match="training set 1 is empty"):
        fit_population([CompartmentalClassifier(), CompartmentalClassifier()], [(X, y), (X[:0], y[:0])])


def test_population_skips_a_diverging_member():
    X, y = small_data(16)
    kw = dict(SMALL, n_hidden=(5,), batch_size=4, seed=0)
    bad = CompartmentalClassifier(**kw, f_etas=(float("inf"), float("inf")))
    good = CompartmentalClassifier(**kw)
    fit_population([bad, good], [(X, y), (X, y)], on_error="skip")
    assert isinstance(bad.fit_error_, TrainingDiverged) and good.fit_error_ is None
    assert good.examples_seen_ == 16 and torch.isfinite(good.W_[0]).all()
    with pytest.raises(TrainingDiverged, match="lower the learning rates"):
        CompartmentalClassifier(**kw, f_etas=(float("inf"), float("inf"))).fit(X, y)


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


def test_truncated_kernel_weights():
    clf = CompartmentalClassifier(**{**SMALL, "mem": 6, "dt": 0.5}).initialize(N_IN, np.arange(N_CLASSES))
    t = np.arange(1, 7) * 0.5
    expected = (np.exp(-t / 10.0) - np.exp(-t / 3.0)) / 7.0
    np.testing.assert_allclose(R.kappa(clf.config(), "ff"), expected, rtol=1e-12)
    # the PSP of an impulse: kappa(dt), ..., kappa(mem dt) steps later, then exactly nothing (truncation)
    history = torch.zeros(6, 3, dtype=torch.float64)
    out = []
    for step in range(12):                     # an impulse of 1 and 2 at step 0 (newest row first)
        history = torch.cat([torch.tensor([[1.0, 0.0, 2.0]] if step == 0 else [[0.0, 0.0, 0.0]],
                                          dtype=torch.float64), history[:-1]])
        out.append(R.psp(R.kappa(clf.config(), "ff"), history).numpy())
    out = np.array(out)
    np.testing.assert_allclose(out[:6, 0], expected, rtol=1e-10)
    np.testing.assert_allclose(out[:6, 2], 2 * expected, rtol=1e-10)
    np.testing.assert_allclose(out[6:], 0, atol=1e-15)
    assert np.all(out[:, 1] == 0)
    # the engine's band gives the same impulse response, then exactly nothing (after mem steps)
    pop = lone_population(clf, 1)
    U = torch.zeros(1, 6 + 12, 1, 3, dtype=torch.float64)
    U[0, 6, 0] = torch.tensor([1.0, 0.0, 2.0])
    np.testing.assert_allclose(pop._psp_band(U, 12)[0, :, 0].numpy(), out, rtol=1e-10, atol=1e-15)
    # the authors' rate transmission: the rate itself
    cfg = R.Config(mem=6, use_spiking_feedforward=False, rate_psp="rate")
    np.testing.assert_array_equal(R.kappa(cfg, "ff"), [1, 0, 0, 0, 0, 0])
    assert R.kappa(cfg, "fb")[0] != 1.0                                # the feedback path still spikes


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
    assert set(clf.named_weights()) == {"W1", "W2", "b1", "b2", "Y1", "c1"}


def test_backprop_angle_reported_to_the_hook():
    X, y = small_data(16)
    calls = []
    CompartmentalClassifier(**SMALL, n_hidden=(15, 8), batch_size=4, record_backprop_angle=True, seed=0,
                            hook=lambda c, info: calls.append(info)).fit(X, y)
    angles = [c["bp_angle"] for c in calls[1:]]
    assert len(angles) == 4 and all(set(a) == {"hidden1", "hidden2"} for a in angles)
    assert all(0 <= v <= 180 for a in angles for v in a.values())


def test_nan_input_is_named_not_blamed_on_the_rates():
    X, y = small_data(8)
    X[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CompartmentalClassifier(**SMALL, n_hidden=(5,), seed=0).fit(X, y)


def test_divergence_raises_training_diverged():
    X, y = small_data(8)
    with pytest.raises(TrainingDiverged, match="lower the learning rates"):
        CompartmentalClassifier(**SMALL, n_hidden=(5,), seed=0, f_etas=(float("inf"), float("inf"))).fit(X, y)


def test_wrong_input_shapes_and_unfitted_use_raise_clear_errors():
    X, y = small_data(12)
    clf = CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=4, seed=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        clf.predict(X)
    clf.fit(X, y)
    with pytest.raises(ValueError, match="has 10 features per example but this network was fitted on 20"):
        clf.predict(X[:, :10])
    with pytest.raises(ValueError, match="one row per example"):
        clf.predict(X[0])
    with pytest.raises(ValueError, match="12 examples but y has 11"):
        clf.score(X, y[:11])
    with pytest.raises(ValueError, match="inputs but"):
        CompartmentalClassifier(**SMALL, n_hidden=(5,)).fit(X, y[:5])
    with pytest.raises(ValueError, match="f_etas"):
        CompartmentalClassifier(**SMALL, n_hidden=(5,), f_etas=(-0.1, 0.1)).fit(X, y)


def test_huge_batch_size_allocates_only_what_the_data_needs():
    X, y = small_data(12)
    clf = CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=10 ** 9, seed=0).fit(X, y)
    assert clf.state_["C"][0].shape[0] == 12 and clf.examples_seen_ == 12


def test_string_labels_and_numpy_input():
    X, y = small_data(12)
    labels = np.array(["a", "b", "c", "d"])[y.numpy()]
    clf = CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=4, seed=0).fit(X.numpy(), labels)
    assert set(clf.predict(X)) <= set(labels)
    assert 0 <= clf.score(X, labels) <= 1


def test_population_larger_than_memory_trains_in_chunks(monkeypatch):
    """P is limited by the estimate made before the run: with room for 2 members, 3 train as chunks of 2 and 1,
    and each still equals its lone run."""
    import utils.compartmental_population as cm
    ests, data = _population_case("float64", dict(use_spiking_feedback=False, use_spiking_feedforward=False))
    lone = [clone(e).fit(*d) for e, d in zip(ests, data)]
    per = cm.member_bytes(clone(ests[0]).initialize(N_IN, np.arange(N_CLASSES)), 8)
    monkeypatch.setattr(cm, "_free_bytes", lambda device: int(2.2 * per / 0.8))
    chunks = []
    real = cm._train
    monkeypatch.setattr(cm, "_train", lambda members, *a, **k: chunks.append(len(members)) or real(members, *a, **k))
    pop = fit_population([clone(e) for e in ests], data)
    assert chunks == [2, 1]
    for a, b in zip(lone, pop):
        torch.testing.assert_close(b.W_[0], a.W_[0], rtol=0, atol=1e-10)


def test_backprop_angle_is_the_angle_to_autograds_gradient():
    """The Fig. 7A diagnostic against autograd: in the mean-field network (C_h = k_B (W_h psp + b_h), the next
    layer's PSP = lambda_max sigmoid(C_h), C_out = k_D (W_out psp + b_out)) with the loss
    L = sum_b w_b / 2 |lambda_t - lambda_max sigmoid(C_out)|^2, the update the diagnostic calls backprop's is dL/dW_h,
    so an update equal to autograd's gradient is at 0 degrees and any other at its angle to that gradient."""
    import types
    torch.manual_seed(0)
    P, B, n = 1, 3, [6, 5, 4, 3]
    k_B, k_D, lmax = 0.7, 0.8, 0.2
    W = [torch.randn(P, n[m + 1], n[m], dtype=torch.float64, requires_grad=True) for m in range(3)]
    b = [torch.randn(P, 1, n[m + 1], dtype=torch.float64) for m in range(3)]
    psp0 = torch.rand(P, B, n[0], dtype=torch.float64)
    lam_t = torch.rand(P, B, n[3], dtype=torch.float64) * lmax
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).view(1, B, 1)
    psp, C = [psp0], []
    for m in range(3):                                        # the mean-field forward pass
        C.append((k_D if m == 2 else k_B) * (torch.bmm(psp[m], W[m].transpose(1, 2)) + b[m]))
        psp.append(lmax * torch.sigmoid(C[m]))
    loss = (w * (lam_t - lmax * torch.sigmoid(C[2])) ** 2).sum() / 2
    grads = torch.autograd.grad(loss, W[:2])
    Cf = [c.detach() for c in C]
    E_out = R.output_error(lam_t, Cf[2], k_D, lmax)
    net = types.SimpleNamespace(P=P, M=3, W=[x.detach() for x in W], k_B=k_B, lmax=lmax)
    f = {"psp_in": [x.detach() for x in psp[:3]]}
    exact = engine.Population._bp_angles(net, [None, None, E_out], [grads[0], grads[1]], Cf, f, w)[0]
    assert exact["hidden1"] == pytest.approx(0.0, abs=1e-4) and exact["hidden2"] == pytest.approx(0.0, abs=1e-4)
    other = [torch.randn_like(g) for g in grads]
    got = engine.Population._bp_angles(net, [None, None, E_out], other, Cf, f, w)[0]
    for m, g in enumerate(grads):
        want = math.degrees(math.acos(float((other[m] * g).sum() / (other[m].norm() * g.norm()))))
        assert got[f"hidden{m + 1}"] == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the defects issue: fidelity to the authors' formulas, memory, divergence, input


def test_apical_conductance_flag_alone_takes_the_authors_g_A():
    """The authors set g_A = 0.05 whenever use_apical_conductance is on (k_B = g_B / (g_L + g_B + g_A) = 0.8);
    the flag alone used to leave g_A = 0, i.e. no apical drive at all."""
    clf = CompartmentalClassifier(use_apical_conductance=True)
    assert clf.g_A == 0.05 and R.Config().g_A == 0.05
    cfg = R.Config(use_apical_conductance=True)
    dec, k_B, k_A, _ = R.soma_coefficients(cfg, output=False)
    assert (dec, k_B, k_A) == pytest.approx((1 - (0.1 + 0.6 + 0.05), 0.6, 0.05))
    assert R.attenuations(cfg) == pytest.approx((0.6 / 0.75, 0.6 / 0.7))
    C, B, A = torch.tensor([0.5]), torch.tensor([2.0]), torch.tensor([-3.0])   # dC = -g_L C + g_B (B - C) + g_A (A - C)
    want = 0.5 + (-0.1 * 0.5 + 0.6 * (2.0 - 0.5) + 0.05 * (-3.0 - 0.5))
    torch.testing.assert_close(R.hidden_soma(C, B, A, cfg), torch.tensor([want]))
    assert R.soma_coefficients(R.Config(), output=False)[2] == 0.0          # the flag off: no apical drive


def test_hidden_soma_without_conductances_is_k_B_B_with_g_A():
    """The authors' instantaneous hidden soma: C = k_B B with k_B = g_B / (g_L + g_B + g_A) (0.6 / 0.75 at g_A =
    0.05); the reference used g_B / (g_L + g_B), ignoring g_A, where the engine did not."""
    cfg = R.Config(use_conductances=False, use_apical_conductance=True)
    B = torch.tensor([2.0, -1.0])
    torch.testing.assert_close(R.hidden_soma(None, B, torch.tensor([9.0, 9.0]), cfg), 0.8 * B)
    clf = CompartmentalClassifier(n_hidden=(3,), use_conductances=False, use_apical_conductance=True)
    clf.initialize(5, np.arange(2))
    assert R.soma_coefficients(clf.config(), False) == pytest.approx((0.0, 0.8, 0.0, 1 / 0.75))


def test_plain_initialisation_is_the_authors_spread():
    """Without weight optimization the authors draw W = 0.1 U(-1, 1) and b, Y, c = U(-1, 1) (sd 0.1 / sqrt(3) and
    1 / sqrt(3)); the project drew half that spread."""
    cfg = R.Config(sizes=(400, 300, 50), use_weight_optimization=False)
    W, b, Y, c = R.initial_weights(cfg, torch.Generator().manual_seed(0))
    for w, bound in ((W[0], 0.1), (W[1], 0.1), (b[0], 1.0), (b[1], 1.0), (Y[0], 1.0), (c[0], 1.0)):
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert abs(float(w.mean())) < 0.1 * bound


def test_named_weights_has_the_biases_and_set_weights_masks_and_symmetric_feedback():
    X, y = small_data(12)
    sym = CompartmentalClassifier(**SMALL, n_hidden=(7,), use_symmetric_weights=True, seed=1)
    sym.initialize(N_IN, np.arange(N_CLASSES))
    W2 = torch.randn(N_CLASSES, 7, dtype=torch.float64)
    sym.set_weights({"W2": W2})                               # Y follows W under symmetric weights
    torch.testing.assert_close(sym.Y_[0], W2.t())
    assert set(sym.named_weights()) == {"W1", "W2", "b1", "b2", "Y1", "c1"}
    sp = CompartmentalClassifier(**SMALL, n_hidden=(7,), use_sparse_feedback=True, seed=1)
    sp.initialize(N_IN, np.arange(N_CLASSES))
    assert "mask1" in sp.named_weights()
    mask = torch.zeros(7, N_CLASSES, dtype=torch.bool)
    mask[:, 0] = True
    sp.set_weights({"mask1": mask, "Y1": torch.ones(7, N_CLASSES)})
    assert torch.equal(sp.Y_[0], mask.double())              # Y zeroed outside the new mask
    sp.partial_fit(X, y)
    assert torch.equal(sp.Y_[0] != 0, mask)                  # ... and it stays zero there
    with pytest.raises(ValueError, match="mask1 must have shape"):
        sp.set_weights({"mask1": torch.ones(2, 2)})


def test_a_member_that_cannot_fit_is_refused_before_training(monkeypatch):
    """fit and fit_population refuse a network whose estimate (member_bytes) exceeds the memory available, naming
    the largest batch size or hidden size that fits, before anything trains."""
    import utils.compartmental_population as cm
    from utils import memory
    from utils.errors import InsufficientMemory
    X, y = small_data(20)
    clf = CompartmentalClassifier(**SMALL, n_hidden=(50,), batch_size=16, seed=0)
    need16 = cm.member_bytes(clone(clf).initialize(N_IN, np.arange(N_CLASSES)), 16)
    need4 = cm.member_bytes(clone(clf).initialize(N_IN, np.arange(N_CLASSES)), 4)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: int(need4 / memory.HEADROOM) + 1)
    calls = []
    monkeypatch.setattr(cm, "_step", lambda *a: calls.append(1))
    with pytest.raises(InsufficientMemory, match=r"batch_size=4 \(--batch-size 4\)"):
        clf.fit(X, y)
    with pytest.raises(InsufficientMemory, match="batch_size=4"):
        fit_population([clone(clf), clone(clf)], [(X, y), (X, y)])
    assert calls == [] and need16 > need4
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    with pytest.raises(InsufficientMemory, match="choose a smaller network"):
        clone(clf).fit(X, y)


@pytest.mark.parametrize("f_etas", [(1e6, 1e6), (1e30, 1e30)])
def test_exploding_rates_raise_training_diverged(f_etas):
    """Huge rates used to finish with weights of 2e5 (2e29) predicting one class; saturation (weights far beyond the
    paper's range, or every hidden rate pinned) raises TrainingDiverged naming the rates to lower."""
    X, y = small_data(24)
    clf = CompartmentalClassifier(**SMALL, n_hidden=(8,), batch_size=4, seed=0, f_etas=f_etas)
    with pytest.raises(TrainingDiverged, match=r"f_etas=\(.+\).*lower the learning rates"):
        clf.fit(X, y)
    CompartmentalClassifier(**SMALL, n_hidden=(8,), batch_size=4, seed=0, f_etas=(1.0, 0.4)).fit(X, y)  # sane: no


def test_saturation_detector_flags_pinned_hidden_rates():
    from types import SimpleNamespace
    from utils.compartmental_population import _diverged
    W = [torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 2, 3, dtype=torch.float64)]
    pop = SimpleNamespace(W=W, b=[torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)])
    Cf = [torch.full((2, 5, 3), 25.0, dtype=torch.float64), torch.zeros(2, 5, 2, dtype=torch.float64)]
    Cf[0][1, 0, 0] = 1.0                                      # member 1: one neuron of one example still in range
    active = torch.ones(2, 5, dtype=torch.bool)
    assert [q for q, _ in _diverged(pop, Cf, active)] == [0]
    active[1, 0] = False                                      # ... in an empty slot: that does not count
    assert [q for q, _ in _diverged(pop, Cf, active)] == [0, 1]


def test_uint8_pixels_are_scaled_as_for_the_mlp_and_floats_outside_0_1_refused():
    X, y = small_data(12)
    X8 = (X * 255).round().to(torch.uint8)
    kw = dict(SMALL, n_hidden=(5,), batch_size=4, seed=0)
    a = CompartmentalClassifier(**kw).fit(X8, y)
    b = CompartmentalClassifier(**kw).fit(X8.double() / 255, y)
    torch.testing.assert_close(a.W_[0], b.W_[0], rtol=0, atol=1e-6)   # the MLP's rule: uint8 / 255 (float32 there)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*scale the images"):
        CompartmentalClassifier(**kw).fit(X * 255, y)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        a.predict(X - 0.5)


def test_members_with_different_classes_get_all_classes():
    X, y = small_data(16)
    keep = y < 2
    a, b = (CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=4, seed=s) for s in (0, 1))
    fit_population([a, b], [(X, y), (X[keep], y[keep])])
    assert list(a.classes_) == list(b.classes_) == [0, 1, 2, 3]


def test_column_labels_and_empty_predict():
    X, y = small_data(12)
    clf = CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=4, seed=0).fit(X, y.view(-1, 1))
    ref = CompartmentalClassifier(**SMALL, n_hidden=(5,), batch_size=4, seed=0).fit(X, y)
    assert torch.equal(clf.W_[0], ref.W_[0])
    assert clf.predict(X[:0]).shape == (0,) and clf.predict_proba(X[:0]).shape == (0, N_CLASSES)
    with pytest.raises(ValueError, match="one class label per example"):
        CompartmentalClassifier(**SMALL, n_hidden=(5,)).fit(X, np.zeros((12, 2)))


def test_batch_f_etas_scale_by_the_batch_that_trains():
    assert batch_f_etas(16, (0.21, 0.21), n_examples=5) == pytest.approx((0.21 * 10, 0.42))
    assert batch_f_etas(16, (0.21, 0.21), n_examples=500) == batch_f_etas(16)
    assert batch_f_etas(16, (0.21, 0.21), n_examples=1) == (0.21, 0.21)


def test_rate_feedforward_with_spiking_feedback_passes_the_input_rates():
    """Feedforward rates with spiking feedback: the hidden somas see the input rates (they were silenced: the input
    was sampled from zero uniforms); without apical drive the hidden C is deterministic and equals the reference's."""
    x = small_data(3, seed=1)[0]
    clf = CompartmentalClassifier(**{**SMALL, "use_spiking_feedback": True}, n_hidden=(9,), seed=0)
    clf.initialize(N_IN, np.arange(N_CLASSES))
    pop = lone_population(clf, 3)
    from utils.compartmental_population import phase_keys
    ours = pop.phase(x.unsqueeze(0), np.array([8]), None, 4, phase_keys([clf], [torch.arange(3)], [0], "test", "cpu"))
    net = R.Network(clf.config())
    net.reset(3)
    torch.testing.assert_close(ours["C"][0][0], net.phase(x, 8)["C"][0], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# the pure engine and the estimator's state_dict


def test_engine_runs_from_configs_and_weights_alone():
    """The engine takes the reference's Config and weight lists, no estimator: a rate-mode forward phase from rest
    equals the reference's to float64 rounding, and the engine's module never names the estimator."""
    import inspect
    cfg = R.Config(sizes=(N_IN, 9, N_CLASSES), mem=5, integration_time=4, use_spiking_feedback=False,
                   use_spiking_feedforward=False)
    W, b, Y, c = R.initial_weights(cfg, torch.Generator().manual_seed(0))
    x = small_data(4)[0]
    st = engine.fresh_state(cfg, 4, "cpu", torch.float64)
    pop = engine.Population([cfg], [dict(W=W, b=b, Y=Y, c=c)], [st], 4, "cpu", torch.float64)
    ours = pop.phase(x.unsqueeze(0), np.array([12]), None, 4, None)
    net = R.Network(cfg, weights=(W, b, Y, c))
    net.reset(4)
    ref = net.phase(x, 12)
    for m in range(2):
        torch.testing.assert_close(ours["C"][m][0], ref["C"][m], rtol=0, atol=1e-12)
    src = inspect.getsource(engine)
    assert "CompartmentalClassifier" not in src and "utils.compartmental import" not in src


@pytest.mark.parametrize("extra", [dict(), dict(use_sparse_feedback=True, use_symmetric_weights=True,
                                                noisy_symmetric_weights=True)])
def test_state_dict_round_trip_mid_epoch_resumes_the_uninterrupted_run(extra, tmp_path):
    """Stopped after 2 of 5 batches of the second epoch (state_dict saved by the hook, as a checkpoint would), a
    fresh estimator loaded from it finishes that epoch and a third one equal to the uninterrupted run, bit for bit;
    the same through utils.checkpoint's file."""
    from utils.checkpoint import read_checkpoint, write_checkpoint
    X, y = small_data(20)
    kw = dict(n_hidden=(9,), l_f_phase=14, l_t_phase=10, integration_time=4, mem=5, dtype="float64", batch_size=4,
              seed=5, lr_decay_examples=60, **extra)
    whole = CompartmentalClassifier(**kw, max_epochs=3).fit(X, y)
    saved = {}

    def stop(clf, info):
        if info["examples_seen"] == 28:                  # epoch 2, after its second batch
            saved["sd"] = clf.state_dict()
            write_checkpoint(tmp_path / "c.pt", clf)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        CompartmentalClassifier(**kw, max_epochs=3, hook=stop).fit(X, y)
    assert saved["sd"]["meta"]["position"] == 8 and saved["sd"]["meta"]["epochs_done"] == 1
    for resumed in (CompartmentalClassifier(**kw).load_state_dict(saved["sd"]), read_checkpoint(tmp_path / "c.pt")[0]):
        resumed.partial_fit(X, y)                        # the rest of epoch 2
        assert resumed.examples_seen_ == 40 and resumed.epochs_done_ == 2
        resumed.partial_fit(X, y)                        # epoch 3
        for a, b in zip(whole.W_ + whole.b_ + whole.Y_ + whole.c_, resumed.W_ + resumed.b_ + resumed.Y_ + resumed.c_):
            assert torch.equal(a, b)
        np.testing.assert_array_equal(resumed.decision_function(X), whole.decision_function(X))
    with pytest.raises(ValueError, match="unfinished epoch of this network is over 20 examples but X has 12"):
        CompartmentalClassifier(**kw).load_state_dict(saved["sd"]).partial_fit(X[:12], y[:12])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dense_input_path_equals_sparse_bit_for_bit(monkeypatch, dtype):
    """Spikes of dense input (every pixel's counts drawn at once, engine.INPUT_DENSE) are the sparse path's: the same
    keyed uniforms and the same order of events, so the same weights and outputs to the last bit, alone and in a
    population of 2 (whose events need the sort), with phases longer than a segment and a smaller last batch;
    the population member equals its lone run (float64 to the last bit, float32 within a rounding step)."""
    X, y = small_data(22, seed=4)
    X = X * 0.5 + 0.3 * (X == 0)                             # mostly nonzero pixels, as CIFAR-10's
    cfg = dict(SMALL, dtype=dtype, use_spiking_feedforward=True, use_spiking_feedback=True, extra_steps=True,
               l_f_phase=engine.SEGMENT + 6, batch_size=4, max_epochs=2, l_f_phase_test=engine.SEGMENT + 3)
    runs = {}
    for path, dense in (("native", None), ("sparse", None), ("dense", 0.0)):   # the C kernels, then the torch ops
        if path != "native":
            monkeypatch.setitem(native._lib, "lib", None)
        elif native.library() is None:
            continue
        monkeypatch.setattr(engine, "INPUT_DENSE", dense)
        a, b = CompartmentalClassifier(seed=1, **cfg), CompartmentalClassifier(seed=2, **cfg)
        alone = clone(a).fit(X, y)
        fit_population([a, b], [(X, y), (X[:13], y[:13])])
        runs[path] = [(m, m.decision_function(X[:7])) for m in (alone, a, b)]
    for (one, d_one), (other, d_other) in zip(runs["sparse"], runs["dense"]):
        for u, v in zip(one.W_ + one.b_, other.W_ + other.b_):
            assert torch.equal(u, v)
        assert np.array_equal(d_one, d_other)
    if "native" in runs and dtype == "float64":                 # the C kernels: the same spikes, other rounding
        for (one, d_one), (other, d_other) in zip(runs["sparse"], runs["native"]):
            for u, v in zip(one.W_ + one.b_, other.W_ + other.b_):
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(d_one, d_other, rtol=1e-10, atol=1e-10)
    for path, members in runs.items():                         # (and the population member is its lone run:
        for u, v in zip(members[0][0].W_, members[1][0].W_):   # float32 within a rounding step of the largest
            if dtype == "float64":                             # weight: the population's products may take
                assert torch.equal(u, v), path                 # another BLAS kernel)
            else:
                torch.testing.assert_close(u, v, rtol=2 ** -22, atol=2 ** -22 * float(u.abs().max()))
