"""The segregated-dendrite network of Guerguiev, Lillicrap & Richards (2017), "Towards deep learning with segregated
dendrites", eLife 6:e22901, as a batched torch simulation and a scikit-learn estimator.

    from utils.compartmental import CompartmentalClassifier
    clf = CompartmentalClassifier(n_hidden=(500,), batch_size=1, max_epochs=60, seed=0)  # the paper's setup
    clf.fit(X_train, y_train)            # X: N x C x H x W (or N x D) tensor in [0, 1], y: N int64 labels
    clf.predict(X_test), clf.predict_proba(X_test), clf.score(X_test, y_test)
    clf.named_weights()                  # {"W1": ..., "W2": ..., "Y1": ...}: feedforward and feedback matrices

What is simulated (equation numbers of the paper's Methods):
* inputs: Poisson spike counts of rate lambda_max * pixel per time step of dt; hidden and output neurons fire Poisson
  spikes at rate lambda_C = lambda_max * sigmoid(C) (Eq. 4), all drawn by inverse CDF from one uniform number each.
* synapses: PSP(t) = sum_{k=0}^{mem-1} kappa((k+1) dt) S(t-k) with kappa(t) = (exp(-t/tau_L) - exp(-t/tau_s)) /
  (tau_L - tau_s) (Eq. 2), truncated to the last `mem` steps as in the authors' code. It is computed exactly by the
  two-exponential recurrence a(t) = e^(-dt/tau) (a(t-1) + S(t)) - e^(-(mem+1) dt/tau) S(t-mem) (one per tau) on a
  buffer of the last mem inputs. Basal and apical input are linear in the presynaptic signal, so the recurrence runs
  on the projected signal U = W S (fewer neurons), restarted from the stored history after every weight update, and
  window means that are linear (mean PSPs, mean A without apical conductance) are taken from the stored signals once
  per phase. The input layer depends on nothing the network does: all input spikes of up to SEGMENT steps are drawn
  up front and projected at once (only the ~20 active inputs per step are summed, `embedding_bag`).
* layer by layer (the default, whenever the apical compartment does not drive the soma: g_A = 0 or instantaneous
  somas): a layer then depends only on the layer below up to the same step, so each layer is simulated over a whole
  segment of up to SEGMENT steps before the next. Its soma is a linear filter of U = W S: C(t) = dec C(t-1) + coef
  (K U + b)(t) [+ dt I], so C for all steps of the segment is one matrix product H U with H = coef D K (K the banded
  kernel matrix, D[t, s] = dec^(t-s)) plus the bias/teaching and initial-state terms; then rates and spikes of the
  segment at once, then U of the next layer by one matrix product. With apical conductance (use_apical_conductance
  and g_A > 0) the layers are stepped together, one time step at a time, with the two-exponential recurrences.
* randomness: Poisson counts by exact inverse CDF from one uniform number each. Large segments (>= FUSE_MIN
  neuron-steps) use one element-wise kernel compiled by torch.compile that tests the first FUSE_K thresholds and
  returns the largest count; the rare counts beyond are finished by the exact series (eager fallback, two dense
  thresholds plus the sparse exact tail, when compiling is unavailable; the first compilation takes about a minute
  on a loaded 2-core CPU and is cached on disk by torch). The uniforms come in bulk from NumPy's PCG64 on the CPU
  (faster than torch's generator there) and from torch's generator on other devices.
* rate ("non-spiking") transmission, separately for the feedforward and the feedback path: the presynaptic signal
  is the rate lambda_C itself, filtered through the same truncated kernel - the expectation of the spiking PSP - so
  that both modes share their scales. (The authors' code passes the unfiltered rate instead; a deliberate change.)
* hidden layers: basal B = W PSP_below + b (Eq. 5), apical A = Y PSP_fb (+ c with use_feedback_bias; the paper's
  equations have no c, the authors' code always adds one), soma C += dt (-g_L C + g_B (B - C) [+ g_A (A - C)]) or
  instantaneous C = k_B B (Eqs. 1, 6). Feedback comes from the output layer (use_broadcast) or from the layer above,
  as it was one step earlier (the layers are updated bottom-up within a step, as in the authors' code).
* output layer: C += dt (-g_L C + g_D (B - C) + I), I = 0 in the forward phase and I = g_E (E_E - C) + g_I (E_I - C)
  in the target phase with g_E the one-hot target, g_I = 1 - g_E (Eq. 7); instantaneous: C = k_D B + k_I I0 with
  I0 = g_E E_E + g_I E_I and k_I = 1 / (g_L + g_D) (the authors' variant).
* per example (per batch): a forward phase of l_f_phase steps and a target phase of l_t_phase steps (each plus
  int(Wald(2, 1)) random extra steps with extra_steps=True, one draw per batch), averages over the last
  integration_time steps of each phase, plateau potentials alpha = sigmoid(mean A) at the end of each phase (Eq. 8).
  The network's state (potentials, PSP traces, input spike history) carries over from example to example.
* local updates (Eqs. 10-13): output E = -k_D lambda_max (mean lambda_C^t - lambda_max sigmoid(mean C^f))
  sigmoid'(mean C^f), step P_final = 20 / lambda_max^2; hidden E = -k_B lambda_max (alpha^t - alpha^f)
  sigmoid'(mean C^f), step P_hidden = 20 / lambda_max; dW = -eta P E (mean forward-phase presynaptic PSP)^T,
  db = -eta P E. A batch of B examples is simulated at once and its updates are averaged, so batch_size=1 is the
  paper's online algorithm.
* batches and learning rates: averaging a batch's updates leaves the paper's rates far too small for the hidden
  layers, but the output layer cannot take B times its online step (its non-target potentials, pushed down by ~1.5
  per online step at init, overshoot into saturation). Short MNIST sweeps (spiking, 1 x 500, 10,000 examples, test
  accuracy on 1,000 images): online (0.21, 0.21) 77.0 %; batch 8 (1.68, 0.42) 76.2 %; batch 16 (6.72, 0.42) 75.7 %,
  (3.36, 0.42) 72.0 %; batch 32 (13.4, 0.42) 70.1 %; batch 64 (26.9, 0.84) 57.8 %; batch 32 (1.68, 1.68) 13 %:
  scale the hidden rates by B to 2 B and the output rate by about 2 (2 hidden layers of 500 and 100, batch 16:
  (7.36, 7.36, 0.48), i.e. the paper's x32, x32, x4, 70.3 % after 10,000 examples; with output x2, 47 %).
* learning-rate decay (not in the paper, off by default): lr_decay_examples=N multiplies every rate by
  0.5 (1 + cos(pi min(n, N) / N)), n the examples trained on before the batch, e.g. N = max_epochs * len(X).
* initialisation ("weight optimization", Methods): W ~ W_avg + sqrt(12) W_sd U(-1/2, 1/2), b likewise, with W_avg and
  W_sd from V_avg = V_sd = 3, b_avg = 0.8, nu = lambda_max / 4, as in the authors' code. The formula assumes a mean
  presynaptic PSP of nu V_avg = 0.15; MNIST's is about 0.2 * 0.13 * sum(kappa) = 0.013, so the initial hidden basal
  potentials are about 0.8-1.0 +- 0.35 rather than 3 +- 3 - faithful to the paper, not a bug.
* feedback weights Y: fixed random; sparse (80 % zeroed, the rest x5); symmetric (Y = W^T of the layer above, or the
  product of transposes down from the output with use_broadcast; optional N(0, 0.05) noise redrawn at every update);
  learned: dY = -b_eta E_inv (mean PSP_fb)^T with E_inv = -(lambda_max sigmoid(mean C^f) - alpha^f)
  lambda_max sigmoid'(mean A^f) (the authors' rule). A learned sparse Y keeps its zeros (not rescaled again).
* testing: state reset, one forward phase of l_f_phase_test steps; prediction = argmax of the output's mean somatic
  potential over the last l_f_phase_test - (l_f_phase - integration_time) steps (220 of 250 with the defaults, as in
  the authors' code); predict_proba = softmax of those means.
* units: times (dt, tau_s, tau_L) in ms, phase lengths, mem and integration_time in time steps, lambda_max in spikes
  per time step (the authors' phi_max).
"""
import math
import os

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from utils.errors import TrainingDiverged

PAPER_F_ETAS = {1: (0.21, 0.21), 2: (0.23, 0.23, 0.12)}  # the paper's learning rates for 1 and 2 hidden layers
FLAGS = ("use_conductances", "use_broadcast", "use_spiking_feedback", "use_spiking_feedforward",
         "use_symmetric_weights", "noisy_symmetric_weights", "use_sparse_feedback", "update_feedback_weights",
         "use_apical_conductance", "use_weight_optimization", "use_feedback_bias", "extra_steps",
         "record_backprop_angle")
SEGMENT = 64          # time steps whose input spikes are drawn and projected in one go (bounds memory)
PREDICT_CHUNK = 128   # examples simulated at once by predict / predict_proba on a CPU (larger: slower there)
PREDICT_CHUNK_GPU = 4096   # ... on a GPU (larger chunks: fewer kernel launches)
FUSE = os.environ.get("BIODL_COMPILE", "1") != "0"   # sample spikes of large segments with one torch.compile'd
#                       kernel (eager fallback if unavailable; BIODL_COMPILE=0 turns it off, e.g. for quick tests)
FUSE_MIN = 2 ** 16    # ... from this many neuron-steps on (smaller ones, e.g. batch_size=1, stay eager)
FUSE_K = 6            # thresholds tested densely by the fused kernel (P(N >= 6) < 1e-7 at rate 0.2; exact tail after)


def batch_f_etas(batch_size, f_etas=PAPER_F_ETAS[1]):
    """Online rates (hidden..., output) scaled for averaged batch updates: hidden x 2 B, output x 2 (the sweep in
    the module docstring; batch 16: (0.21, 0.21) -> (6.72, 0.42)); unchanged at batch_size=1."""
    if batch_size == 1:
        return tuple(f_etas)
    return tuple(e * 2 * batch_size for e in f_etas[:-1]) + (f_etas[-1] * 2,)


def _spike_counts(x, u, lmax: float, from_potential: bool):
    """Rates lambda = lambda_max sigmoid(x) (or x itself) and Poisson counts by inverse CDF of u, the first FUSE_K
    thresholds sum_{j<k} e^-lambda lambda^j / j! tested in one element-wise pass; also the largest count."""
    lam = torch.sigmoid(x) * lmax if from_potential else x
    term = torch.exp(-lam)
    cdf = term
    n = (u > cdf).to(u.dtype)
    for k in range(1, FUSE_K):
        term = term * lam / k
        cdf = cdf + term
        n = n + (u > cdf).to(u.dtype)
    return lam, n, n.amax()


_fused = {}   # device type -> compiled _spike_counts, or None where compiling failed


class CompartmentalClassifier(ClassifierMixin, BaseEstimator):
    """The segregated-dendrite network as a scikit-learn classifier (see the module docstring)."""

    def __init__(self,
                 n_hidden=(500,),          # hidden layer sizes (any number of layers)
                 f_etas=None,              # forward learning rates per layer (hidden..., output); None: the paper's
                 b_etas=None,              # feedback learning rates per hidden layer (update_feedback_weights)
                 batch_size=1,             # examples simulated at once; their updates are averaged (1: the paper)
                 max_epochs=1,             # passes over the training data in fit
                 lr_decay_examples=None,   # None: constant rates (the paper); N: cosine decay to 0 over N examples
                 lambda_max=0.2,           # maximum rate, spikes per time step (phi_max)
                 tau_s=3.0,                # synaptic rise time constant of kappa (ms)
                 tau_L=10.0,               # leak (decay) time constant of kappa (ms)
                 dt=1.0,                   # time step (ms)
                 mem=10,                   # PSP kernel length (time steps)
                 g_B=0.6,                  # basal -> soma conductance (hidden layers)
                 g_A=0.0,                  # apical -> soma conductance (only with use_apical_conductance)
                 g_D=0.6,                  # dendrite -> soma conductance (output layer)
                 g_L=0.1,                  # leak conductance
                 E_E=8.0,                  # excitatory reversal potential of the teaching current
                 E_I=-8.0,                 # inhibitory reversal potential of the teaching current
                 l_f_phase=50,             # forward phase (time steps)
                 l_t_phase=50,             # target phase (time steps)
                 l_f_phase_test=250,       # forward phase when testing (time steps)
                 integration_time=20,      # last steps of a phase averaged for plasticity
                 extra_steps=True,         # lengthen each phase by int(Wald(2, 1)) steps
                 use_conductances=True,    # conductance-based somas (else instantaneous C = k B)
                 use_broadcast=True,       # feedback to every hidden layer from the output layer
                 use_spiking_feedback=True,     # spikes (else filtered rates) on the feedback path
                 use_spiking_feedforward=True,  # spikes (else filtered rates) on the feedforward path
                 use_symmetric_weights=False,   # Y = W^T (products of transposes with broadcast)
                 noisy_symmetric_weights=False,  # ... plus N(0, 0.05) noise
                 use_sparse_feedback=False,     # 80 % of Y zeroed, the rest x5
                 update_feedback_weights=False,  # learn Y with b_etas
                 use_apical_conductance=False,  # apical compartment drives the soma through g_A
                 use_weight_optimization=True,  # the paper's initialisation (V_avg = V_sd = 3, b_avg = 0.8, ...)
                 use_feedback_bias=False,       # apical bias c
                 record_backprop_angle=False,   # diagnostic: angle to the backprop update per hidden layer
                 seed=None,                # int seed (weights, spikes, order, extra steps); None: fresh entropy
                 device=None,              # None: the device of X
                 dtype="float32",          # "float32" or "float64"
                 verbose=0,                # 0: silent; 1: tqdm progress bar
                 hook=None,                # hook(clf, info) for logging (see utils/logger.py)
                 hook_every=None):         # call the hook after the batch crossing each multiple of this many examples
        for name, value in list(locals().items()):
            if name != "self":
                setattr(self, name, value)

    # ------------------------------------------------------------------------------------------------------------
    # validation and set-up

    def _check_params(self):
        """Raise ValueError naming the first bad hyperparameter and how to fix it."""
        def bad(name, fix):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {fix}")
        n_hidden = (self.n_hidden,) if isinstance(self.n_hidden, (int, np.integer)) else self.n_hidden
        if not isinstance(n_hidden, (tuple, list)) or len(n_hidden) == 0:
            bad("n_hidden", "give at least one hidden layer, e.g. n_hidden=(500,)")
        if any(not isinstance(n, (int, np.integer)) or n < 1 for n in n_hidden):
            bad("n_hidden", "every hidden layer size must be a positive integer")
        for name in ("tau_s", "tau_L", "dt", "lambda_max"):
            if not float(getattr(self, name)) > 0:
                bad(name, "must be > 0")
        if math.isclose(self.tau_s, self.tau_L):
            bad("tau_s", f"must differ from tau_L={self.tau_L} (the kernel divides by tau_L - tau_s)")
        for name in ("g_B", "g_D", "g_L", "g_A"):
            if not float(getattr(self, name)) >= 0:
                bad(name, "conductances must be >= 0")
        if self.g_L + self.g_B == 0 or self.g_L + self.g_D == 0:
            bad("g_L", "g_L + g_B and g_L + g_D must be > 0")
        for name in ("mem", "l_f_phase", "l_t_phase", "l_f_phase_test", "integration_time", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                bad(name, "must be a positive integer")
        if not isinstance(self.max_epochs, (int, np.integer)) or self.max_epochs < 0:
            bad("max_epochs", "must be a non-negative integer")
        for name in ("l_f_phase", "l_t_phase"):
            if getattr(self, name) < self.integration_time:
                bad(name, f"must be >= integration_time={self.integration_time} (the averaging window); "
                          f"lengthen the phase or shorten integration_time")
        if self.l_f_phase_test < self.integration_time:
            bad("l_f_phase_test", f"must be >= integration_time={self.integration_time}")
        M = len(n_hidden) + 1
        if self.f_etas is not None and (not isinstance(self.f_etas, (tuple, list)) or len(self.f_etas) != M):
            bad("f_etas", f"give {M} learning rates (one per hidden layer and one for the output), or None")
        if self.b_etas is not None and (not isinstance(self.b_etas, (tuple, list)) or len(self.b_etas) != M - 1):
            bad("b_etas", f"give {M - 1} feedback learning rates (one per hidden layer), or None")
        if self.update_feedback_weights and self.b_etas is None:
            bad("b_etas", "update_feedback_weights=True needs feedback learning rates, e.g. b_etas=(0.01,)")
        if self.update_feedback_weights and self.use_symmetric_weights:
            bad("update_feedback_weights", "cannot learn Y while use_symmetric_weights=True ties it to W; "
                                           "turn one of them off")
        for name in FLAGS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                bad(name, "must be True or False")
        if self.dtype not in ("float32", "float64"):
            bad("dtype", 'use "float32" or "float64"')
        if self.lr_decay_examples is not None and (not isinstance(self.lr_decay_examples, (int, np.integer))
                                                   or self.lr_decay_examples < 1):
            bad("lr_decay_examples", "give the number of training examples over which the rates decay "
                                     "(e.g. max_epochs * len(X)), or None for constant rates")
        if self.hook_every is not None and (not isinstance(self.hook_every, (int, np.integer)) or self.hook_every < 1):
            bad("hook_every", "must be a positive integer or None")
        if self.hook is not None and not callable(self.hook):
            bad("hook", "must be callable as hook(clf, info), or None")
        if self.verbose not in (0, 1, 2, True, False):
            bad("verbose", "use 0 (silent) or 1 (progress bar)")
        try:
            torch.device(self.device) if self.device is not None else None
        except (RuntimeError, TypeError):
            bad("device", 'use None, "cpu", "cuda" or "cuda:N"')
        return tuple(int(n) for n in n_hidden)

    def _setup(self, n_in, n_out, device):
        """Constants, random generators, weights and state of a fresh network."""
        n_hidden = self._check_params()
        self.n_ = (int(n_in),) + n_hidden + (int(n_out),)   # layer sizes, input first
        self.M_ = len(self.n_) - 1                          # layers with weights (hidden + output)
        self.device_ = torch.device(self.device) if self.device is not None else torch.device(device)
        self.dtype_ = getattr(torch, self.dtype)
        seed = self.seed if self.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self.rng_np_ = np.random.default_rng(seed)                            # extra steps
        self.gen_cpu_ = torch.Generator().manual_seed(int(seed) % 2**63)      # weights, order
        self.gen_ = torch.Generator(device=self.device_).manual_seed(int(seed) % 2**63 + 1)  # spikes
        self.f_etas_ = tuple(float(e) for e in (self.f_etas if self.f_etas is not None
                                                 else PAPER_F_ETAS.get(self.M_ - 1, (0.21,) * self.M_)))
        self.b_etas_ = tuple(float(e) for e in self.b_etas) if self.b_etas is not None else (0.0,) * (self.M_ - 1)
        g_A = self.g_A if self.use_apical_conductance else 0.0
        self.k_B_ = self.g_B / (self.g_L + self.g_B + g_A)  # steady-state attenuation, hidden soma
        self.k_D_ = self.g_D / (self.g_L + self.g_D)        # steady-state attenuation, output soma
        self.k_I_ = 1.0 / (self.g_L + self.g_D)             # teaching-current gain, instantaneous output soma
        k = np.arange(1, self.mem + 1) * self.dt
        self.kappa_ = (np.exp(-k / self.tau_L) - np.exp(-k / self.tau_s)) / (self.tau_L - self.tau_s)  # Eq. 2
        self._init_weights()
        self._reset_state(self.batch_size)
        self.examples_seen_ = 0
        self.epochs_done_ = 0

    def _init_weights(self):
        """W, b (feedforward), Y, c (feedback), drawn in float64 on the CPU (same weights on every device)."""
        g, n, M = self.gen_cpu_, self.n_, self.M_
        U = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5  # noqa: E731
        W, b, Y, c = [None] * M, [None] * M, [None] * (M - 1), [None] * (M - 1)
        Y_above = torch.eye(n[-1], dtype=torch.float64)   # broadcast feedback reaches layer m-1 through Y[m]
        for m in range(M - 1, -1, -1):                    # top-down, as the authors
            N = n[m]                                      # inputs of layer m
            if self.use_weight_optimization:              # the paper's "weight optimization" (Methods)
                V_avg, V_sd, b_avg, b_sd, nu = 3.0, 3.0, 0.8, 0.001, self.lambda_max * 0.25
                V_sm = V_sd ** 2 + V_avg ** 2
                W_avg = (V_avg - b_avg) / (nu * N * V_avg)
                W_sm = (V_sm + nu ** 2 * (N - N ** 2) * W_avg ** 2 * V_avg ** 2 - 2 * N * nu * b_avg * V_avg * W_avg
                        - b_avg ** 2) / (N * nu ** 2 * V_sm)
                W_sd = math.sqrt(max(W_sm - W_avg ** 2, 0.0))
                W[m] = W_avg + 3.465 * W_sd * U(n[m + 1], N)
                b[m] = b_avg + 3.465 * b_sd * U(n[m + 1])
            else:
                W[m], b[m] = 0.1 * U(n[m + 1], N), 1.0 * U(n[m + 1])
            if m > 0:                                     # feedback into hidden layer m-1 (size N)
                if self.use_broadcast:
                    if self.use_weight_optimization:
                        Y[m - 1] = (3.465 * W_sd * U(N, n[m + 1])) @ Y_above
                        c[m - 1] = Y[m - 1] @ (3.465 * W_sd * U(n[-1]))
                    else:
                        Y[m - 1], c[m - 1] = U(N, n[-1]), U(N)
                    Y_above = Y[m - 1]
                else:
                    if self.use_weight_optimization:
                        Y[m - 1] = W_avg + 3.465 * W_sd * U(N, n[m + 1])
                        c[m - 1] = W_avg + 3.465 * W_sd * U(N)
                    else:
                        Y[m - 1], c[m - 1] = U(N, n[m + 1]), U(N)
        to = dict(device=self.device_, dtype=self.dtype_)
        self.W_ = [w.to(**to) for w in W]
        self.b_ = [v.to(**to) for v in b]
        self.Y_ = [y.to(**to) for y in Y]
        self.c_ = [v.to(**to) for v in c]
        self.Y_mask_ = None
        if self.use_symmetric_weights:
            self._make_symmetric()
        if self.use_sparse_feedback:                      # 80 % of each Y zeroed, survivors x5
            self.Y_mask_ = []
            for m in range(M - 1):
                numel = self.Y_[m].numel()
                mask = torch.ones(numel, dtype=torch.bool)
                mask[torch.randperm(numel, generator=g)[:int(0.8 * numel)]] = False
                self.Y_mask_.append(mask.view_as(self.Y_[m]).to(self.device_))
                self.Y_[m] = self.Y_[m] * self.Y_mask_[m] * 5

    def _make_symmetric(self):
        """Y = W^T of the layer above (broadcast: products of transposes down from the output), optionally noisy."""
        def WT(m):
            w = self.W_[m].t()
            if self.noisy_symmetric_weights:
                w = w + 0.05 * torch.randn(w.shape, generator=self.gen_cpu_, dtype=torch.float64).to(w)
            return w
        for m in range(self.M_ - 2, -1, -1):
            if self.use_broadcast and m < self.M_ - 2:
                self.Y_[m] = WT(m + 1) @ self.Y_[m + 1]
            else:
                self.Y_[m] = WT(m + 1).clone()

    def _reset_state(self, B):
        """Zero potentials, signal histories and input history for B parallel examples."""
        M, n, mem = self.M_, self.n_, self.mem
        self.state_B_ = B
        self.C_ = [torch.zeros(B, n[m + 1], device=self.device_, dtype=self.dtype_) for m in range(M)]
        # what each layer sends: "spike" counts or "rate"s, to the layer above (ff) and to its feedback targets (fb);
        # a buffer holds the last mem steps (rows [0, mem)) followed by the steps of the current segment
        kinds = [set() for _ in range(M)]
        for m in range(M - 1):
            kinds[m].add(self._ff_kind())
            kinds[self._fb_source(m)].add(self._fb_kind())
        self.sig_ = [{k: torch.zeros(mem + SEGMENT, B, n[m + 1], device=self.device_, dtype=self.dtype_)
                      for k in sorted(kinds[m])} for m in range(M)]
        # input history: events (row in [0, mem), example, input, value) of the last mem steps
        e = torch.zeros(0, dtype=torch.long, device=self.device_)
        self.hist_ = (e, e, e, torch.zeros(0, device=self.device_, dtype=self.dtype_))

    def _fb_source(self, m):
        return self.M_ - 1 if self.use_broadcast else m + 1

    def _ff_kind(self):
        return "spike" if self.use_spiking_feedforward else "rate"

    def _fb_kind(self):
        return "spike" if self.use_spiking_feedback else "rate"

    # ------------------------------------------------------------------------------------------------------------
    # simulation

    def _uniform(self, *shape):
        """Uniform [0, 1) numbers: NumPy's PCG64 on the CPU (faster than torch's generator there), torch's elsewhere."""
        if self.device_.type == "cpu":
            return torch.from_numpy(self.rng_np_.random(shape, dtype=np.float32 if self.dtype == "float32"
                                                         else np.float64))
        return torch.rand(*shape, generator=self.gen_, device=self.device_, dtype=self.dtype_)

    def _spikes(self, x, u, from_potential, out=None):
        """(lambda, Poisson counts) for the potentials (from_potential) or rates x with uniforms u; the fused kernel
        for large tensors when torch.compile works here, else eager ops."""
        kind = x.device.type
        if FUSE and u.numel() >= FUSE_MIN and _fused.get(kind, 0) is not None:
            try:
                if kind not in _fused:
                    _fused[kind] = torch.compile(_spike_counts, dynamic=True)
                lam, n, top = _fused[kind](x, u, float(self.lambda_max), from_potential)
            except Exception:                               # no compiler / backend: stay eager from now on
                _fused[kind] = None
            else:
                if top >= FUSE_K:                           # the rare counts >= FUSE_K: exact series from there
                    flat = n.view(-1)
                    idx = (flat >= FUSE_K).nonzero().squeeze(1)
                    self._poisson_tail(flat, lam.expand_as(u).reshape(-1), u.reshape(-1), idx, FUSE_K)
                if out is not None:
                    out.copy_(n)
                return lam, (n if out is None else out)
        lam = torch.sigmoid(x).mul_(self.lambda_max) if from_potential else x
        if out is None:
            lam = lam.expand_as(u).contiguous()
            out = torch.empty_like(lam)
        return lam, self._poisson(lam, out, u)

    @staticmethod
    def _poisson_tail(flat, l, u, idx, k):
        """Counts flat[idx] known to be >= k: add one while u > F(k; l), F(k; l) = e^-l sum_{j<=k} l^j / j!."""
        if not idx.numel():
            return
        l = l[idx]
        v = u[idx] * torch.exp(l)
        term = l ** k / math.factorial(k)
        s = sum(l ** j / math.factorial(j) for j in range(k + 1))
        while True:
            hit = v > s
            if not bool(hit.any()) or k > 200:
                break
            idx, v, l, term, s = idx[hit], v[hit], l[hit], term[hit], s[hit]
            flat[idx] += 1
            k += 1
            term = term * l / k
            s = s + term

    def _poisson(self, lam, out, u=None, F=None):
        """Exact Poisson(lam) counts into out by inverse CDF of one uniform u each: N >= k iff u > F(k-1; lam).
        The first two thresholds, e^-lam and e^-lam (1 + lam), are tested densely; the further ones only where the
        second was passed (at most 1.8 % of the neurons at lambda_max = 0.2), as u e^lam > sum_{j<k} lam^j / j!."""
        u = self._uniform(*lam.shape) if u is None else u
        dest, out = out, (out if out.is_contiguous() else torch.empty_like(lam))
        F = torch.neg(lam, out=F).exp_() if F is not None else torch.exp(-lam)
        torch.gt(u, F, out=out)                              # N >= 1: u > e^-lam
        F.addcmul_(F, lam)
        torch.gt(u, F, out=F)                                # N >= 2: u > e^-lam (1 + lam), as 0/1
        out.add_(F)
        self._poisson_tail(out.view(-1), lam.reshape(-1), u.reshape(-1), F.view(-1).nonzero().squeeze(1), 2)
        if dest is not out:
            dest.copy_(out)
        return dest

    @staticmethod
    def _filter_step(aL, aS, new, old, eL, eS, eLm, eSm):
        """One step of the exact truncated-kernel recurrence: a(t) = e^(-dt/tau) (a(t-1) + S(t)) - e^(-(mem+1)dt/tau)
        S(t-mem), for tau_L (aL) and tau_s (aS); the PSP is (aL - aS) / (tau_L - tau_s) (Eq. 2)."""
        aL.add_(new).mul_(eL).sub_(old, alpha=eLm)
        aS.add_(new).mul_(eS).sub_(old, alpha=eSm)

    def _row_weights(self, rows, t_abs, lo, hi, window, first):
        """Weight of each buffer row (step tau = row - mem + t_abs) in the mean PSP over the psp times [lo, hi]:
        (1/window) sum_{t' in [lo, hi], 0 <= t' - tau < mem} kappa[t' - tau]. Rows of earlier segments weigh 0."""
        mem = self.mem
        tau = np.arange(rows) - mem + t_abs
        Kc = np.concatenate([[0.0], np.cumsum(self.kappa_)])
        a = np.maximum(tau, lo) - tau
        b = np.minimum(tau + mem - 1, hi) - tau
        w = np.where(b >= a, Kc[np.clip(b + 1, 0, mem)] - Kc[np.clip(a, 0, mem)], 0.0) / window
        if not first:
            w[tau < t_abs] = 0.0
        return torch.tensor(w, device=self.device_, dtype=self.dtype_)

    def _kband(self, Ts):
        """(Ts, mem + Ts) matrix K with K[t, mem + t - k] = kappa[k]: basal drive = K @ U over a segment."""
        key = (Ts, self.mem, self.dtype_, self.device_)
        cache = self.__dict__.setdefault("kband_cache_", {})
        if key not in cache:
            K = np.zeros((Ts, self.mem + Ts))
            for k in range(self.mem):
                K[np.arange(Ts), self.mem + np.arange(Ts) - k] = self.kappa_[k]
            cache[key] = torch.tensor(K, device=self.device_, dtype=self.dtype_)
        return cache[key]

    def _input_events(self, x_idx, rates, Ts):
        """The input signal of Ts new steps as events (step, example, input, value): Poisson counts or rates."""
        b_idx, i_idx = x_idx
        P = rates.numel()
        if self.use_spiking_feedforward:
            _, counts = self._spikes(rates.view(1, P), self._uniform(Ts, P).to(self.device_), False)
            t, p = counts.nonzero(as_tuple=True)
            return t, b_idx[p], i_idx[p], counts[t, p]
        t = torch.arange(Ts, device=self.device_).repeat_interleave(P)
        return t, b_idx.repeat(Ts), i_idx.repeat(Ts), rates.repeat(Ts)

    def _phase(self, x_idx, rates, T, target, window, record):
        """Simulate T steps of the B examples in the state; return the window means (C, A, output rate, PSPs)."""
        M, mem, dt, lmax, n = self.M_, self.mem, self.dt, self.lambda_max, self.n_
        B, dev, dty = self.state_B_, self.device_, self.dtype_
        eL, eS = math.exp(-dt / self.tau_L), math.exp(-dt / self.tau_s)
        eLm, eSm = eL ** (mem + 1), eS ** (mem + 1)
        inv = 1.0 / (self.tau_L - self.tau_s)
        wl = torch.tensor(eL ** np.arange(mem, 0, -1), device=dev, dtype=dty)   # filter state from mem history rows
        ws = torch.tensor(eS ** np.arange(mem, 0, -1), device=dev, dtype=dty)
        w0 = T - window                                     # first step of the averaging window
        z = lambda *s: torch.zeros(*s, device=dev, dtype=dty)  # noqa: E731
        g_A = self.g_A if self.use_apical_conductance else 0.0
        A_step = self.use_conductances and g_A != 0.0       # A drives the soma: needed at every step
        ffk, fbk = self._ff_kind(), self._fb_kind()
        dec_h = 1.0 - dt * (self.g_L + self.g_B + g_A)
        dec_o = 1.0 - dt * (self.g_L + self.g_D + (1.0 if target is not None else 0.0))
        I0 = None if target is None else target * self.E_E + (1.0 - target) * self.E_I   # g_E E_E + g_I E_I
        Csum = [z(B, n[m + 1]) for m in range(M)]
        lam_sum = z(B, n[-1])
        fb_mean = [z(B, n[self._fb_source(m) + 1]) for m in range(M - 1)]   # mean feedback PSP (previous step)
        Asum = [z(B, n[m + 1]) for m in range(M - 1)] if A_step else None
        in_mean = [z(B * n[0])] + [z(B, n[m]) for m in range(1, M)] if record else None
        if not A_step:   # per layer: C, lambda_C and the Poisson thresholds of every step of a segment
            e = lambda: [torch.empty(SEGMENT, B, n[m + 1], device=dev, dtype=dty) for m in range(M)]  # noqa: E731
            seg = list(zip(e(), e(), e()))
        else:
            lam = [z(B, n[m + 1]) for m in range(M)]
            F = [z(B, n[m + 1]) for m in range(M)]
            Bv = [z(B, n[m + 1]) for m in range(M)]
            Ub = [None] + [z(mem + SEGMENT, B, n[m + 1]) for m in range(1, M)]   # U = W s(below), per step
            aL = [None] + [z(B, n[m + 1]) for m in range(1, M)]
            aS = [None] + [z(B, n[m + 1]) for m in range(1, M)]
            UA = [z(mem + SEGMENT, B, n[m + 1]) for m in range(M - 1)]  # U_A = Y s(feedback source), per step
            AL, AS, A = ([z(B, n[m + 1]) for m in range(M - 1)] for _ in range(3))
        W0t = self.W_[0].t().contiguous()
        Wt = [w.t() for w in self.W_]
        Yt = [y.t() for y in self.Y_]
        sig = self.sig_
        t_abs = 0
        while t_abs < T:
            Ts = min(SEGMENT, T - t_abs)
            rows, first = mem + Ts, t_abs == 0
            # -- input layer: events of the history rows [0, mem) and of Ts new rows, U(t) = W S(t) for all rows at once
            ht, hb, hi, hv = self.hist_
            nt, nb, ni, nv = self._input_events(x_idx, rates, Ts)
            et, eb, ei, ev = torch.cat([ht, nt + mem]), torch.cat([hb, nb]), torch.cat([hi, ni]), torch.cat([hv, nv])
            counts = torch.bincount(et * B + eb, minlength=rows * B)
            U = torch.nn.functional.embedding_bag(ei, W0t, counts.cumsum(0) - counts, mode="sum",
                                                  per_sample_weights=ev)
            if record:                                      # mean input PSP over the window (Eq. 12)
                wrow = self._row_weights(rows, t_abs, w0, T - 1, window, first)
                in_mean[0].index_add_(0, eb * n[0] + ei, ev * wrow[et])
            keep = et >= Ts                                 # the last mem rows become the history
            self.hist_ = (et[keep] - Ts, eb[keep], ei[keep], ev[keep])
            unif = [self._uniform(Ts, B, n[m + 1]).to(dev) if "spike" in sig[m] else None for m in range(M)]
            if not A_step:                                  # no apical drive: layer after layer over the whole segment
                self._segment_layers(U, Ts, t_abs, w0, I0, unif, Wt, Csum, lam_sum, seg)
            else:                                           # A drives the soma: step after step
                Bin = torch.mm(self._kband(Ts), U.view(rows, -1)).view(Ts, B, -1).add_(self.b_[0])  # B = W PSP + b
                # -- filters of the other layers' basal (and apical) drive, started from the history rows
                for m in range(1, M):
                    torch.matmul(sig[m - 1][ffk][:mem], Wt[m], out=Ub[m][:mem])
                    torch.tensordot(wl, Ub[m][:mem], dims=1, out=aL[m])
                    torch.tensordot(ws, Ub[m][:mem], dims=1, out=aS[m])
                if A_step:
                    for m in range(M - 1):
                        torch.matmul(sig[self._fb_source(m)][fbk][:mem], Yt[m], out=UA[m][:mem])
                        torch.tensordot(wl, UA[m][:mem], dims=1, out=AL[m])
                        torch.tensordot(ws, UA[m][:mem], dims=1, out=AS[m])
                for t in range(Ts):
                    p, in_window = mem + t, t_abs + t >= w0
                    for m in range(M):
                        C, out = self.C_[m], m == M - 1
                        # basal potential B = W PSP + b (Eq. 5)
                        if m == 0:
                            basal = Bin[t]
                        else:
                            torch.mm(sig[m - 1][ffk][p], Wt[m], out=Ub[m][p])
                            self._filter_step(aL[m], aS[m], Ub[m][p], Ub[m][p - mem], eL, eS, eLm, eSm)
                            basal = torch.sub(aL[m], aS[m], out=Bv[m]).mul_(inv).add_(self.b_[m])
                        if not out:
                            if A_step:                          # apical A = Y PSP_fb (+ c), PSP as of step t - 1
                                if t > 0:
                                    src = sig[self._fb_source(m)][fbk]
                                    torch.mm(src[p - 1], Yt[m], out=UA[m][p - 1])
                                    self._filter_step(AL[m], AS[m], UA[m][p - 1], UA[m][p - 1 - mem], eL, eS, eLm, eSm)
                                torch.sub(AL[m], AS[m], out=A[m]).mul_(inv)
                                if self.use_feedback_bias:
                                    A[m].add_(self.c_[m])
                                if in_window:
                                    Asum[m].add_(A[m])
                            if self.use_conductances:       # soma (Eqs. 1, 6)
                                C.mul_(dec_h).add_(basal, alpha=dt * self.g_B)
                                if A_step:
                                    C.add_(A[m], alpha=dt * g_A)
                            else:
                                torch.mul(basal, self.k_B_, out=C)
                        else:                               # output soma, teaching current in the target phase (Eq. 7)
                            if self.use_conductances:
                                C.mul_(dec_o).add_(basal, alpha=dt * self.g_D)
                                if I0 is not None:
                                    C.add_(I0, alpha=dt)
                            else:
                                torch.mul(basal, self.k_D_, out=C)
                                if I0 is not None:
                                    C.add_(I0, alpha=self.k_I_)
                        torch.sigmoid(C, out=lam[m]).mul_(lmax)   # lambda_C = lambda_max sigmoid(C) (Eq. 4)
                        if in_window:
                            Csum[m].add_(C)
                            if out and I0 is not None:
                                lam_sum.add_(lam[m])
                        for kind, buf in sig[m].items():        # what the layer sends: spikes or rates
                            if kind == "spike":
                                self._poisson(lam[m], buf[p], unif[m][t], F[m])
                            else:
                                buf[p].copy_(lam[m])
            # -- window means of the PSPs from this segment's rows, then keep the last mem rows as history
            for m in range(M - 1):
                src = sig[self._fb_source(m)][fbk][:rows]
                fb_mean[m].add_(torch.tensordot(self._row_weights(rows, t_abs, w0 - 1, T - 2, window, first), src,
                                                dims=1))
            if record:
                wrow = self._row_weights(rows, t_abs, w0, T - 1, window, first)
                for m in range(1, M):
                    in_mean[m].add_(torch.tensordot(wrow, sig[m - 1][ffk][:rows], dims=1))
            for layer in sig:
                for buf in layer.values():
                    buf[:mem] = buf[Ts:Ts + mem].clone()
            t_abs += Ts
        if A_step:
            A_mean = [s / window for s in Asum]
        else:                                               # A is linear in the feedback PSP: average, then project
            A_mean = [torch.addmm(self.c_[m], fb_mean[m], Yt[m]) if self.use_feedback_bias else fb_mean[m] @ Yt[m]
                      for m in range(M - 1)]
        res = dict(C=[s / window for s in Csum], A=A_mean, lam=lam_sum / window, psp_fb=fb_mean)
        if record:
            res["psp_in"] = [in_mean[0].view(B, -1)] + in_mean[1:]
        return res

    def _segment_layers(self, U0, Ts, t_abs, w0, I0, unif, Wt, Csum, lam_sum, seg):
        """Ts steps of every layer, one whole layer after the other. Valid when the apical compartment does not drive
        the soma (g_A = 0 or instantaneous somas): a layer then depends only on the signals of the layer below up to
        the same step. Its soma is then a linear filter of U = W S (the projected signal of the layer below):
        C(t) = dec C(t-1) + coef B(t) + dt I (Eqs. 1, 6, 7; dec = 1 - dt (g_L + g [+ 1]), coef = dt g; instantaneous
        somas: dec = 0, coef = k) with B = K U + b (Eq. 5, K the banded kernel matrix), so the C of all Ts steps is
        one matrix product H U + d1 (coef b + dt I) + dpow C(-1), H = coef D K, D[t, s] = dec^(t-s) (s <= t)."""
        M, mem, dt, B = self.M_, self.mem, self.dt, self.state_B_
        rows, lo = mem + Ts, max(0, w0 - t_abs)              # segment steps [lo, Ts) lie in the averaging window
        ffk, target = self._ff_kind(), I0 is not None
        for m in range(M):
            out = m == M - 1
            U = U0 if m == 0 else torch.matmul(self.sig_[m - 1][ffk][:rows], Wt[m])   # U = W S, all rows
            g, k = (self.g_D, self.k_D_) if out else (self.g_B, self.k_B_)
            if self.use_conductances:
                dec, coef, c_I = 1.0 - dt * (self.g_L + g + (1.0 if out and target else 0.0)), dt * g, dt
            else:
                dec, coef, c_I = 0.0, k, self.k_I_
            H, d = self._hmat(Ts, dec, coef)
            C, lam, F = (s[:Ts] for s in seg[m])
            C2 = C.view(Ts, -1)
            torch.mm(H, U.view(rows, -1), out=C2)
            const = (self.b_[m] * coef).expand(B, -1)
            if out and target:                               # teaching current g_E E_E + g_I E_I, g_E + g_I = 1
                const = const + c_I * I0
            C2.addmm_(d, torch.stack([const.reshape(-1), self.C_[m].reshape(-1)]))
            self.C_[m].copy_(C[Ts - 1])
            sig = self.sig_[m]
            if "spike" in sig:                               # lambda_C = lambda_max sigmoid(C) (Eq. 4), spikes
                lam, _ = self._spikes(C, unif[m], True, out=sig["spike"][mem:rows])
            else:
                torch.sigmoid(C, out=lam).mul_(self.lambda_max)
            if "rate" in sig:
                sig["rate"][mem:rows].copy_(lam)
            if lo < Ts:
                Csum[m].add_(C[lo:].sum(0))
                if out and target:
                    lam_sum.add_(lam[lo:].sum(0))

    def _hmat(self, Ts, dec, coef):
        """H = coef D K (Ts x (mem + Ts)) and d = [D 1, dec^(t+1)] (Ts x 2) of _segment_layers, cached."""
        key = ("H", Ts, dec, coef, self.mem, self.dtype_, self.device_)
        cache = self.__dict__.setdefault("kband_cache_", {})
        if key not in cache:
            t = np.arange(Ts)
            D = np.where(t[:, None] >= t[None, :], float(dec) ** np.maximum(t[:, None] - t[None, :], 0), 0.0)
            K = np.zeros((Ts, self.mem + Ts))
            for j in range(self.mem):
                K[t, self.mem + t - j] = self.kappa_[j]
            d = np.stack([D.sum(1), float(dec) ** (t + 1)], 1)
            to = dict(device=self.device_, dtype=self.dtype_)
            cache[key] = (torch.tensor(coef * D @ K, **to), torch.tensor(d, **to))
        return cache[key]

    def _state_views(self, B):
        """Point C_, sig_ and hist_ at the first B slots; returns the full C_ and sig_ to restore."""
        full_C, full_sig, full_hist = self.C_, self.sig_, self.hist_
        self.C_ = [c[:B] for c in full_C]
        self.sig_ = [{k: v[:, :B] for k, v in layer.items()} for layer in full_sig]
        keep = full_hist[1] < B
        self.hist_ = tuple(h[keep] for h in full_hist)
        self.state_B_ = B
        return full_C, full_sig

    def _simulate_batch(self, X, y_onehot, Tf, Tt):
        """Forward and target phases of one batch; returns the forward and target window means."""
        B = X.shape[0]
        if B > self.C_[0].shape[0]:
            self._reset_state(B)
        full_C, full_sig = self._state_views(B)
        try:
            x_idx = X.nonzero(as_tuple=True)
            rates = X[x_idx] * self.lambda_max                     # input rates lambda_max * pixel
            f = self._phase(x_idx, rates, Tf, None, self.integration_time, record=True)
            t = self._phase(x_idx, rates, Tt, y_onehot, self.integration_time, record=False)
        finally:
            self.C_, self.sig_ = full_C, full_sig
            self.state_B_ = full_C[0].shape[0]
        return f, t

    # ------------------------------------------------------------------------------------------------------------
    # learning

    def lr_factor(self):
        """The multiplier of every learning rate for the next batch: 1, or the cosine decay of lr_decay_examples."""
        if self.lr_decay_examples is None:
            return 1.0
        progress = min(getattr(self, "examples_seen_", 0), self.lr_decay_examples) / self.lr_decay_examples
        return 0.5 * (1 + math.cos(math.pi * progress))

    def _update(self, f, t):
        """The local weight updates of one batch, averaged over its examples (Eqs. 10-13). Returns bp angles."""
        M, lmax, B = self.M_, self.lambda_max, f["C"][0].shape[0]
        lr = self.lr_factor()
        sig = torch.sigmoid
        dsig = lambda x: sig(x) * (1 - sig(x))   # noqa: E731
        P_final, P_hidden = 20.0 / lmax ** 2, 20.0 / lmax
        E = [None] * M
        Cf = f["C"]
        E[M - 1] = -self.k_D_ * lmax * (t["lam"] - lmax * sig(Cf[M - 1])) * dsig(Cf[M - 1])   # output error
        alpha_f = [sig(a) for a in f["A"]]                       # plateau potentials (Eq. 8)
        alpha_t = [sig(a) for a in t["A"]]
        for m in range(M - 1):
            E[m] = -self.k_B_ * lmax * (alpha_t[m] - alpha_f[m]) * dsig(Cf[m])               # hidden error
        dW = [E[m].t() @ f["psp_in"][m] / B for m in range(M)]
        angles = None
        if self.record_backprop_angle and M > 1:
            angles, E_bp = {}, E[M - 1]
            for m in range(M - 2, -1, -1):
                E_bp = (E_bp @ self.W_[m + 1]) * self.k_B_ * lmax * dsig(Cf[m])
                dW_bp = E_bp.t() @ f["psp_in"][m] / B
                cos = (dW[m] * dW_bp).sum() / (dW[m].norm() * dW_bp.norm())
                angles[f"hidden{m + 1}"] = float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))))
        if self.update_feedback_weights:
            for m in range(M - 1):
                E_inv = -(lmax * sig(Cf[m]) - alpha_f[m]) * lmax * dsig(f["A"][m])
                self.Y_[m] -= lr * self.b_etas_[m] * (E_inv.t() @ f["psp_fb"][m]) / B
                if self.Y_mask_ is not None:
                    self.Y_[m] *= self.Y_mask_[m]
        for m in range(M):
            P = P_final if m == M - 1 else P_hidden
            self.W_[m] -= lr * self.f_etas_[m] * P * dW[m]
            self.b_[m] -= lr * self.f_etas_[m] * P * E[m].mean(0)
        if self.use_symmetric_weights:
            self._make_symmetric()
            if self.Y_mask_ is not None:
                for m in range(M - 1):
                    self.Y_[m] = self.Y_[m] * self.Y_mask_[m] * 5
        return angles

    # ------------------------------------------------------------------------------------------------------------
    # scikit-learn API

    def _to_tensor(self, X):
        X = torch.as_tensor(X)
        X = X.reshape(X.shape[0], -1)
        dev = self.device_ if hasattr(self, "device_") else (torch.device(self.device) if self.device else X.device)
        return X.to(device=dev, dtype=getattr(torch, self.dtype))

    def initialize(self, n_features, classes):
        """A fresh network for n_features inputs and the given class labels (fit does this itself)."""
        self.classes_ = np.asarray(classes)
        dev = torch.device(self.device) if self.device is not None else torch.device("cpu")
        self._setup(n_features, len(self.classes_), dev)
        return self

    def fit(self, X, y):
        """Train a fresh network for max_epochs epochs."""
        self._check_params()
        X_dev = torch.as_tensor(X).device
        y_np = _as_numpy(y)
        self.classes_ = np.unique(y_np)
        dev = torch.device(self.device) if self.device is not None else X_dev
        n_features = int(np.prod(torch.as_tensor(X).shape[1:]))
        self._setup(n_features, len(self.classes_), dev)
        self._train(X, y_np, self.max_epochs)
        return self

    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y), continuing from the current weights and state."""
        y_np = _as_numpy(y)
        if not hasattr(self, "W_"):
            self._check_params()
            self.classes_ = np.asarray(classes) if classes is not None else np.unique(y_np)
            X_dev = torch.as_tensor(X).device
            dev = torch.device(self.device) if self.device is not None else X_dev
            self._setup(int(np.prod(torch.as_tensor(X).shape[1:])), len(self.classes_), dev)
        self._train(X, y_np, 1)
        return self

    def _train(self, X, y_np, epochs):
        X = self._to_tensor(X)
        n = X.shape[0]
        pos = np.clip(np.searchsorted(self.classes_, y_np), 0, len(self.classes_) - 1)
        y_idx = torch.as_tensor(pos, device=self.device_)
        if not np.array_equal(self.classes_[pos], y_np):
            raise ValueError("y contains labels that are not in classes_; pass all classes to the first partial_fit")
        onehot = torch.nn.functional.one_hot(y_idx, len(self.classes_)).to(self.dtype_)
        bar = None
        if self.verbose and epochs * n:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs * n, desc="compartmental", unit="ex", leave=False)
        seen0, acc = self.examples_seen_, dict(loss=0.0, correct=0.0, n=0, angles={}, n_angles=0)
        if self.hook is not None:
            self.hook(self, dict(epoch=self.epochs_done_, examples_seen=0, n_train=n,
                                 train_loss=float("nan"), train_acc=float("nan")))
        try:
            for _ in range(epochs):
                order = torch.randperm(n, generator=self.gen_cpu_).to(self.device_)
                for i in range(0, n, self.batch_size):
                    idx = order[i:i + self.batch_size]
                    Tf, Tt = self.l_f_phase, self.l_t_phase
                    if self.extra_steps:   # random phase lengths (authors: + int(Wald(2, 1)))
                        Tf += int(self.rng_np_.wald(2.0, 1.0))
                        Tt += int(self.rng_np_.wald(2.0, 1.0))
                    f, t = self._simulate_batch(X[idx], onehot[idx], Tf, Tt)
                    angles = self._update(f, t)
                    self._check_finite(f)
                    out = f["C"][-1]
                    acc["loss"] += float(torch.nn.functional.cross_entropy(out, y_idx[idx], reduction="sum"))
                    acc["correct"] += float((out.argmax(1) == y_idx[idx]).sum())
                    acc["n"] += len(idx)
                    for k, v in (angles or {}).items():
                        acc["angles"][k] = acc["angles"].get(k, 0.0) + v
                    acc["n_angles"] += angles is not None
                    before = self.examples_seen_ - seen0
                    self.examples_seen_ += len(idx)
                    if bar is not None:
                        bar.update(len(idx))
                    after = self.examples_seen_ - seen0
                    k = self.hook_every
                    if self.hook is not None and (k is None or after // k > before // k):
                        info = dict(epoch=self.epochs_done_, examples_seen=after, n_train=n,
                                    train_loss=acc["loss"] / acc["n"], train_acc=acc["correct"] / acc["n"])
                        if self.record_backprop_angle and acc["n_angles"]:
                            info["bp_angle"] = {k2: v / acc["n_angles"] for k2, v in acc["angles"].items()}
                        self.hook(self, info)
                        acc = dict(loss=0.0, correct=0.0, n=0, angles={}, n_angles=0)
                self.epochs_done_ += 1
        finally:
            if bar is not None:
                bar.close()

    def _check_finite(self, f):
        total = sum(w.sum() for w in self.W_) + sum(v.sum() for v in self.b_) + f["C"][-1].sum()
        if not bool(torch.isfinite(total)):
            raise TrainingDiverged(f"weights or potentials became NaN/inf after {self.examples_seen_} examples "
                                   f"(f_etas={self.f_etas_}); lower the learning rates")

    def decision_function(self, X):
        """Mean output somatic potential over the test window of a fresh forward phase (N x n_classes numpy)."""
        if not hasattr(self, "W_"):
            raise RuntimeError("this CompartmentalClassifier is not fitted yet; call fit first")
        X = self._to_tensor(X)
        T = self.l_f_phase_test
        window = int(min(T, max(1, T - (self.l_f_phase - self.integration_time))))
        saved = (self.C_, self.sig_, self.hist_, self.state_B_)
        outs = []
        try:
            chunk = PREDICT_CHUNK if self.device_.type == "cpu" else PREDICT_CHUNK_GPU
            for i in range(0, X.shape[0], chunk):
                xb = X[i:i + chunk]
                self._reset_state(xb.shape[0])                   # testing starts from rest
                x_idx = xb.nonzero(as_tuple=True)
                res = self._phase(x_idx, xb[x_idx] * self.lambda_max, T, None, window, record=False)
                outs.append(res["C"][-1].cpu())
        finally:
            self.C_, self.sig_, self.hist_, self.state_B_ = saved
        return torch.cat(outs).double().numpy() if outs else np.zeros((0, len(self.classes_)))

    def predict_proba(self, X):
        return torch.softmax(torch.as_tensor(self.decision_function(X)), dim=1).numpy()

    def predict(self, X):
        return self.classes_[self.decision_function(X).argmax(1)]

    def score(self, X, y, sample_weight=None):
        return float(np.average(self.predict(X) == _as_numpy(y), weights=sample_weight))

    def named_weights(self):
        """Feedforward W1..WM (output last) and feedback Y1..Y(M-1) matrices, by name."""
        out = {f"W{m + 1}": w for m, w in enumerate(self.W_)}
        out.update({f"Y{m + 1}": y for m, y in enumerate(self.Y_)})
        return out


def _as_numpy(y):
    return y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


POPULATION_SHARED = ("n_hidden", "batch_size", "dt", "mem", "l_f_phase", "l_t_phase", "l_f_phase_test",
                     "integration_time", "device", "dtype") + FLAGS   # what the members of a population share


def fit_population(estimators, datasets):
    """Fit P CompartmentalClassifiers on P training sets (X_p, y_p); returns the fitted estimators, each equal to
    what estimators[p].fit(*datasets[p]) alone gives. The members must share the structure (POPULATION_SHARED)."""
    estimators, datasets = list(estimators), list(datasets)
    _check_population(estimators, datasets)
    return [est.fit(X, y) for est, (X, y) in zip(estimators, datasets)]


def _check_population(estimators, datasets):
    """Raise ValueError naming what makes (estimators, datasets) no population."""
    if not estimators:
        raise ValueError("fit_population needs at least one estimator")
    if len(estimators) != len(datasets):
        raise ValueError(f"fit_population got {len(estimators)} estimators but {len(datasets)} training sets; "
                         "give one (X, y) per estimator")
    for p, est in enumerate(estimators):
        if not isinstance(est, CompartmentalClassifier):
            raise ValueError(f"member {p} is a {type(est).__name__}, not a CompartmentalClassifier")
    first = estimators[0].get_params()
    for p, est in enumerate(estimators[1:], 1):
        params = est.get_params()
        for name in POPULATION_SHARED:
            a, b = first[name], params[name]
            if (tuple(a) if isinstance(a, (list, tuple)) else a) != (tuple(b) if isinstance(b, (list, tuple)) else b):
                raise ValueError(f"member {p} has {name}={b!r} but member 0 has {a!r}: the members of a population "
                                 f"share {', '.join(POPULATION_SHARED[:8])} and the flags; train different "
                                 "structures as separate populations")
    for p, data in enumerate(datasets):
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError(f"training set {p} must be a pair (X, y)")
        X, y = data
        if len(X) == 0:
            raise ValueError(f"training set {p} is empty; give every member at least one example")
        if len(X) != len(y):
            raise ValueError(f"training set {p} has {len(X)} inputs but {len(y)} labels")
