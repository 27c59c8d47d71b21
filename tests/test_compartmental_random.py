"""The compartmental network's counter-based random numbers (utils/compartmental_random.py): the generator's
statistics, the Poisson counts drawn from it, the compiled and eager kernels, and the spikes' independence from who
runs them (population, batch composition)."""
import math

import numpy as np
import pytest
import torch
from sklearn.base import clone

from utils import compartmental_native as native
from utils import compartmental_random as rnd
from utils.compartmental import CompartmentalClassifier
from utils.compartmental_population import fit_population

N = 4_000_000


def draws(dtype=torch.float64, n=N, seed=3):
    """n uniforms of consecutive steps and neurons of one network, as the engine draws them."""
    ex = rnd.example_keys(torch.tensor([[rnd.member_key(seed, 0, "forward")]]), torch.arange(4).view(1, -1))
    base = rnd.step_keys(ex, 0, n // 4000).reshape(-1, 1)                       # (steps x examples, 1)
    return rnd.uniforms(base, rnd.neuron_offsets(1, 1000), dtype).reshape(-1)


def test_mix_matches_splitmix64_on_python_ints():
    """The int64 tensor arithmetic (wrapping products, masked shifts) equals the 64-bit finaliser on Python ints,
    including words with the top bit set; SplitMix64's first output from seed 0 is 0xE220A8397B1DCDAF."""
    assert rnd.mix_int(rnd.GOLDEN) == 0xE220A8397B1DCDAF
    words = [0, 1, rnd.GOLDEN, (1 << 63) + 5, (1 << 64) - 1, 123456789123456789]
    got = rnd.mix(torch.tensor([rnd.signed(w) for w in words], dtype=torch.int64))
    assert got.tolist() == [rnd.signed(rnd.mix_int(w)) for w in words]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uniforms_mean_variance_bins_and_lags(dtype):
    """4 million draws: mean 1/2 and variance 1/12 within 5 standard errors, a chi-square over 1,000 bins within
    its 1e-6 tails (about 1,000 +- 224), lag 1, 2, 1000 and 4000 (neighbour neurons, steps) correlations below
    5 / sqrt(n); in [0, 1) on the 2^-24 or 2^-53 grid."""
    u = draws(dtype).double()
    n = u.numel()
    assert n == N and float(u.min()) >= 0 and float(u.max()) < 1
    bits = 24 if dtype == torch.float32 else 53
    assert torch.equal(u * 2 ** bits, torch.floor(u * 2 ** bits))
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    counts = torch.bincount((u * 1000).long(), minlength=1000).double()
    chi2 = float(((counts - n / 1000) ** 2 / (n / 1000)).sum())
    assert 780 < chi2 < 1240, chi2
    c = u - 0.5
    for lag in (1, 2, 1000, 4000):
        r = float((c[:-lag] * c[lag:]).mean() / c.var())
        assert abs(r) < 5 / math.sqrt(n), (lag, r)


def test_different_keys_give_independent_streams():
    a, b = draws(n=400_000, seed=3), draws(n=400_000, seed=4)
    assert abs(float(np.corrcoef(a.numpy(), b.numpy())[0, 1])) < 5 / math.sqrt(400_000)
    keys = {rnd.member_key(s, e, p) for s in range(3) for e in range(3) for p in rnd.PHASES}
    assert len(keys) == 27


@pytest.mark.parametrize("lam", [0.02, 0.2, 1.5])
def test_spike_counts_are_poisson(lam):
    n = 400_000
    base = rnd.step_keys(torch.tensor([[rnd.member_key(0, 0, "test")]]), 0, 400).reshape(-1, 1)
    x = torch.full((400, 1000), lam, dtype=torch.float64)
    _, counts = rnd.spike_counts(x, base, rnd.neuron_offsets(2, 1000), 1.0, False)
    counts = counts.reshape(-1)
    se = math.sqrt(lam / n)
    assert abs(counts.mean().item() - lam) < 5 * se
    assert abs(counts.var().item() - lam) < 0.02 * lam + 10 * se
    assert (counts == counts.round()).all() and counts.min() >= 0
    for k in range(4):   # the distribution itself, P(N = k)
        pk = math.exp(-lam) * lam ** k / math.factorial(k)
        assert abs((counts == k).double().mean().item() - pk) < 5 * math.sqrt(pk * (1 - pk) / n) + 1e-6


@pytest.mark.parametrize("from_potential", [True, False])
def test_compiled_kernel_equals_eager(monkeypatch, from_potential):
    """The compiled sampler (torch.compile, where a compiler works here) and the eager ops: the same integers, so the
    same uniforms; the same counts (rates up to 4 per step: the exact tail beyond 6 is needed)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 40, generator=g) * 3 if from_potential else torch.rand(1, 40, generator=g) * 4
    base = rnd.step_keys(torch.tensor([[rnd.member_key(5, 1, "target")]]), 0, 3000).reshape(-1, 1)
    offs = rnd.neuron_offsets(1, 40)
    lm = 4.0 if from_potential else 1.0
    monkeypatch.setattr(rnd, "FUSE_MIN", 1)
    lam_c, n_c = rnd.spike_counts(x, base, offs, lm, from_potential)
    monkeypatch.setattr(rnd, "FUSE", False)
    lam_e, n_e = rnd.spike_counts(x, base, offs, lm, from_potential)
    assert n_c.max() > rnd.FUSE_K
    torch.testing.assert_close(lam_c.expand_as(n_c), lam_e.expand_as(n_e), rtol=1e-6, atol=1e-7)
    assert (n_c != n_e).float().mean() < 1e-4          # exp and sigmoid may differ by a rounding step compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_uniforms_equal_torch_ops(monkeypatch, dtype):
    """The C kernel's keyed uniforms (where a C compiler works here; skipped otherwise) are the torch ops' numbers
    bit for bit: per-row keys (R, 1), a key per entry (R, n), broadcast ranks above 2, words with the top bit set;
    offsets that differ between rows fall back (None); spike_counts gives the same counts either way."""
    monkeypatch.setattr(rnd, "NATIVE", True)
    if native.library() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(2)
    words = lambda *s: torch.randint(-2 ** 63, 2 ** 63 - 1, s, generator=g, dtype=torch.int64)   # noqa: E731
    offs = rnd.neuron_offsets(1, 37)
    for base, o, shape in ((words(50, 1), offs, (50, 37)), (words(50, 37), offs, (50, 37)),
                           (words(2, 5, 3, 1), offs.view(1, 1, 1, -1), (2, 5, 3, 37)), (words(1, 1), offs, (1, 37))):
        got = rnd.native_uniforms(base, o, shape, dtype)
        assert got is not None and got.shape == shape
        assert torch.equal(got, rnd.uniforms(base, o, dtype).expand(shape))
    assert rnd.native_uniforms(words(4, 1), words(4, 37), (4, 37), dtype) is None
    x = torch.randn(200, 37, generator=g, dtype=dtype)
    base = words(200, 1)
    monkeypatch.setattr(rnd, "FUSE", False)
    lam_n, n_n = rnd.spike_counts(x, base, offs, 2.0, True)
    monkeypatch.setattr(rnd, "NATIVE", False)
    lam_t, n_t = rnd.spike_counts(x, base, offs, 2.0, True)
    assert torch.equal(n_n, n_t) and torch.equal(lam_n, lam_t) and n_n.max() > rnd.FUSE_K


SMALL = dict(n_hidden=(12, 6), l_f_phase=30, l_t_phase=12, integration_time=5, mem=6, dtype="float64")


def data(n, seed=0):
    g = np.random.default_rng(seed)
    X = torch.tensor(g.random((n, 20)) * (g.random((n, 20)) < 0.5))
    return X, torch.tensor(np.arange(n) % 4)


def test_predictions_do_not_depend_on_the_batch_they_sit_in(monkeypatch):
    """A tested example's spikes depend on its position in X, never on the other examples of its chunk or on the
    chunk size: the first 10 of 25 predicted alone, or in chunks of 4, give the same potentials bit for bit."""
    import utils.compartmental as comp
    X, y = data(25)
    clf = CompartmentalClassifier(**SMALL, batch_size=5, seed=2).fit(X, y)
    full = clf.decision_function(X)
    np.testing.assert_array_equal(clf.decision_function(X[:10]), full[:10])
    monkeypatch.setattr(comp, "PREDICT_CHUNK", 4)
    np.testing.assert_array_equal(clf.decision_function(X), full)


@pytest.mark.parametrize("extra", [dict(), dict(use_spiking_feedback=False, use_spiking_feedforward=False),
                                   dict(use_apical_conductance=True), dict(dtype="float32")],
                         ids=["spiking", "rates", "spiking apical", "float32"])
def test_population_of_3_equals_three_lone_runs_bit_for_bit(extra):
    """Three networks of different rates, seeds, data and lengths (so smaller last batches and different random
    phase lengths) trained as one population equal three lone fits to the last bit in float64: weights and
    predictions (float32: the same spikes and predictions, weights within one rounding step)."""
    base = {**SMALL, "batch_size": 8, **extra}
    ests = [CompartmentalClassifier(**base, seed=1, max_epochs=2, f_etas=(0.3, 0.3, 0.1)),
            CompartmentalClassifier(**base, seed=2, max_epochs=1, lambda_max=0.3, g_L=0.15, tau_s=2.0),
            CompartmentalClassifier(**base, seed=3, max_epochs=3, lr_decay_examples=40, g_B=0.5)]
    sets = [data(22, 0), data(30, 1), data(13, 2)]
    lone = [clone(e).fit(*d) for e, d in zip(ests, sets)]
    pop = fit_population([clone(e) for e in ests], sets)
    X_test = data(16, 5)[0]
    for a, b in zip(lone, pop):
        for wa, wb in zip(a.W_ + a.b_ + a.Y_, b.W_ + b.b_ + b.Y_):
            if base["dtype"] == "float64":
                assert torch.equal(wa, wb)
            else:
                torch.testing.assert_close(wa, wb, rtol=2 ** -22, atol=0)
        if base["dtype"] == "float64":
            np.testing.assert_array_equal(b.decision_function(X_test), a.decision_function(X_test))
        else:
            assert np.array_equal(b.predict(X_test), a.predict(X_test))
