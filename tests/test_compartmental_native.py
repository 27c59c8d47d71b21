"""utils/compartmental_native.py: the C layer kernel against the torch ops it replaces (skipped where no C compiler
works here): the same potentials, the same spikes but where a uniform falls within rounding of a threshold."""
import math

import numpy as np
import pytest
import torch

from utils import compartmental_native as native
from utils.compartmental import CompartmentalClassifier

SMALL = dict(n_hidden=(40, 20), l_f_phase=30, l_t_phase=12, integration_time=5, mem=6)


@pytest.fixture
def lib():
    if native.library() is None:
        pytest.skip("no C compiler here")
    return native.library()


def data(n, seed=0):
    g = np.random.default_rng(seed)
    X = torch.tensor(g.random((n, 30)) * (g.random((n, 30)) < 0.5))
    return X, torch.tensor(np.arange(n) % 4)


def fits(monkeypatch, **kw):
    """The same network fitted with the C kernel and with the torch ops, then its test potentials."""
    X, y = data(48)
    out = []
    for use in (True, False):
        if not use:
            monkeypatch.setitem(native._lib, "lib", None)
        clf = CompartmentalClassifier(**SMALL, **kw, batch_size=8, seed=3, max_epochs=2).fit(X, y)
        out.append((clf, clf.decision_function(data(32, 1)[0])))
    return out


@pytest.mark.parametrize("extra", [dict(), dict(use_conductances=False), dict(use_spiking_feedback=False)],
                         ids=["conductances", "instantaneous", "rate feedback"])
def test_kernel_equals_torch_ops_in_float64(lib, monkeypatch, extra):
    """float64: every spike the same (the exponential's last-place error never moves a count here), so weights and
    test potentials agree to rounding."""
    (a, da), (b, db) = fits(monkeypatch, dtype="float64", **extra)
    for wa, wb in zip(a.W_ + a.b_ + a.Y_, b.W_ + b.b_ + b.Y_):
        torch.testing.assert_close(wa, wb, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(da, db, rtol=1e-10, atol=1e-10)


def test_exponential_is_within_a_few_units_in_the_last_place(lib):
    xs = np.linspace(-80.0, 80.0, 20001)
    assert max(abs(lib.exp_of_d(float(x)) / math.exp(x) - 1) for x in xs) < 4 * 2.0 ** -52
    assert max(abs(lib.exp_of_f(float(x)) / math.exp(float(np.float32(x))) - 1) for x in xs) < 4 * 2.0 ** -23
    assert math.isnan(lib.exp_of_d(float("nan"))) and math.isnan(lib.exp_of_f(float("nan")))


def test_counts_follow_the_poisson_law_up_to_large_counts(lib):
    """A layer at lambda_max = 4 per step (counts beyond the branch-free four): the counts' frequencies are
    Poisson's at each neuron's rate, within 5 standard errors."""
    P, Ts, B, n, mem = 1, 400, 25, 40, 3
    U = torch.zeros(P, mem + Ts, B, n, dtype=torch.float64)
    bias = torch.linspace(-3, 3, n, dtype=torch.float64).view(1, n)
    one = torch.ones(1, dtype=torch.float64)
    C = torch.zeros(P, B, n, dtype=torch.float64)
    base = torch.arange(P * Ts * B, dtype=torch.int64).view(P, Ts, B) * 7919 + 11
    offs = torch.arange(n, dtype=torch.int64) * 104729 + 5
    spk = torch.zeros(P, mem + Ts, B, n, dtype=torch.float64)
    lam = torch.zeros(P, mem + Ts, B, n, dtype=torch.float64)
    native.layer_segment(U, (torch.ones(P, mem, dtype=torch.float64), bias, one, None, 4 * one), C, (base, offs),
                         (spk, mem), (lam, mem))
    rate = 4 / (1 + torch.exp(-bias.view(-1)))
    torch.testing.assert_close(lam[0, mem:].reshape(-1, n)[0], rate)
    counts = spk[0, mem:].reshape(-1, n)
    assert counts.max() > 8
    for j in (0, n // 2, n - 1):
        c, lj, N = counts[:, j], float(rate[j]), counts.shape[0]
        for k in range(6):
            pk = math.exp(-lj) * lj ** k / math.factorial(k)
            assert abs(float((c == k).double().mean()) - pk) < 5 * math.sqrt(pk * (1 - pk) / N) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_split_over_threads_give_the_same_numbers(lib, monkeypatch, dtype):
    """With several torch threads the kernels' calls split the examples between threads: the same U, events, kept
    history, input mean, potentials and spikes to the last bit as one call (each range writes only its own
    examples; the kept events come per range, each example's in its order)."""
    g = torch.Generator().manual_seed(0)
    P, B, Ts, mem, n0, n1 = 2, 7, 20, 4, 30, 24
    x = torch.rand(P, B, n0, generator=g, dtype=dtype) * (torch.rand(P, B, n0, generator=g) < 0.6)
    base = torch.randint(-2 ** 62, 2 ** 62, (P, Ts, B), generator=g)
    W0t = torch.randn(P * n0, n1, generator=g, dtype=dtype)
    hist = (torch.randint(0, mem, (50,), generator=g), torch.randint(0, P * B, (50,), generator=g),
            torch.randint(0, n0, (50,), generator=g), torch.ones(50, dtype=dtype))
    soma = (torch.rand(P, mem, generator=g, dtype=dtype), torch.randn(P, n1, generator=g, dtype=dtype),
            torch.ones(P, dtype=dtype), torch.full((P,), 0.8, dtype=dtype), torch.ones(P, dtype=dtype))
    offs = torch.arange(n1, dtype=torch.int64) * 31 + 7
    w_in = torch.rand(P, mem + Ts, generator=g, dtype=dtype)
    runs = []
    old = torch.get_num_threads()
    monkeypatch.setattr(native, "SPLIT_MIN", 1)
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert len(native._chunks(B, 10 ** 6)) == threads
            in_mean = torch.zeros(P * B * n0, dtype=dtype)
            U, kept = native.input_segment(native.input_events(x, torch.full((P,), 0.7, dtype=dtype)), base, W0t,
                                           hist, (P, mem, Ts, B, n0, n1), (w_in, in_mean), (Ts, Ts))
            C = torch.zeros(P, B, n1, dtype=dtype)
            spk = torch.zeros(P, mem + Ts, B, n1, dtype=dtype)
            Cseg = native.layer_segment(U.clone(), soma, C, (base, offs), (spk, mem), None)
            order = torch.argsort(kept[1] * 10 ** 6 + kept[0] * 1000 + kept[2], stable=True)   # per example
            runs.append([U.clone(), in_mean, C, Cseg.clone(), spk] + [k[order] for k in kept])
    finally:
        torch.set_num_threads(old)
    assert runs[0][-1].numel() > 0 and runs[0][4].sum() > 0
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_sums_equal_the_torch_loop_at_any_thread_split(lib, monkeypatch, dtype):
    """row_sums: acc += sum_r w[:, r] src[:, r] over the first R rows of a larger buffer (rows of weight 0 skipped),
    equal to the row-by-row torch loop to rounding, the same bits at 1 and 3 threads; False (acc untouched) for a
    source whose rows are not contiguous blocks."""
    g = torch.Generator().manual_seed(1)
    P, rows, R, B, n = 3, 30, 22, 5, 17
    buf = torch.randn(P, rows, B, n, generator=g, dtype=dtype)
    w = torch.rand(P, R, generator=g, dtype=dtype) * (torch.rand(P, R, generator=g) < 0.5)
    w[:, 3] = 0.0                                         # a row no member weighs
    acc0 = torch.randn(P, B, n, generator=g, dtype=dtype)
    want = acc0.clone()
    for r in range(R):
        want.addcmul_(buf[:, r], w[:, r].view(-1, 1, 1))
    old = torch.get_num_threads()
    monkeypatch.setattr(native, "SPLIT_MIN", 1)
    got = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            acc = acc0.clone()
            assert native.row_sums(acc, buf, w)
            got.append(acc)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got[0], got[1])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0], want, rtol=tol, atol=tol)
    acc = acc0.clone()
    assert not native.row_sums(acc, buf[:, :, :1].expand(P, rows, B, n), w)
    assert torch.equal(acc, acc0)
