"""The segregated-dendrite network of Guerguiev, Lillicrap & Richards (2017, eLife 6:e22901), one time step at a
time, one short function per equation of the paper's Methods: the readable reference that the tests check the fast
engine (utils/compartmental_engine.py) against, and the place to edit when trying a variant.

    from utils.compartmental_reference import Config, Network
    net = Network(Config(sizes=(784, 500, 10), seed=0))
    net.train_batch(x, y_onehot)          # x: B x 784 pixels in [0, 1]; forward phase, target phase, local updates
    net.forward_means(x)                  # window means of the forward phase (the prediction: argmax of C[-1])

Notation as in the paper: basal B, apical A, somatic C, firing rate lambda, feedforward W, b, feedback Y, c, the
forward (f) and target (t) phases, plateau potentials alpha. Layer m = 0 .. M-1 (the output last). Times in ms,
lengths in time steps, lambda_max in spikes per step. The batch dimension comes first; each example of a batch runs
its own copy of the network's state, with the weights shared and the updates averaged over the batch.
"""
import math
from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass(frozen=True)
class Config:
    """Everything that defines a network and its training, with the paper's defaults."""
    sizes: tuple = (784, 500, 10)   # layer sizes, input first, output last
    f_etas: tuple = (0.21, 0.21)    # forward learning rates per layer (hidden..., output)
    b_etas: tuple = (0.0,)          # feedback learning rates per hidden layer (update_feedback_weights)
    lambda_max: float = 0.2         # maximum rate, spikes per time step (phi_max)
    tau_s: float = 3.0              # synaptic rise time constant of kappa (ms)
    tau_L: float = 10.0             # leak time constant of kappa (ms)
    dt: float = 1.0                 # time step (ms)
    mem: int = 10                   # PSP kernel length (time steps)
    g_B: float = 0.6                # basal -> soma conductance (hidden layers)
    g_A: float = 0.05               # apical -> soma conductance (only with use_apical_conductance; the authors' 0.05)
    g_D: float = 0.6                # dendrite -> soma conductance (output layer)
    g_L: float = 0.1                # leak conductance
    E_E: float = 8.0                # excitatory reversal potential of the teaching current
    E_I: float = -8.0               # inhibitory reversal potential of the teaching current
    l_f_phase: int = 50             # forward phase (time steps)
    l_t_phase: int = 50             # target phase (time steps)
    l_f_phase_test: int = 250       # forward phase when testing (time steps)
    integration_time: int = 20      # last steps of a phase averaged for plasticity
    init: str = "authors"           # "authors": W_avg + 3.465 W_sd U(-1, 1); "paper": W_avg + sqrt(12) W_sd U(-1/2, 1/2)
    rate_psp: str = "kernel"        # rate transmission: "kernel" (the rate through kappa) or "rate" (the authors')
    seed: int = 0                   # weights, spikes, example order, extra steps
    # the option flags, the paper's configuration
    extra_steps: bool = True                # lengthen each phase by int(Wald(2, 1)) steps
    use_conductances: bool = True           # conductance-based somas (else instantaneous C = k B)
    use_broadcast: bool = True              # feedback to every hidden layer from the output layer
    use_spiking_feedback: bool = True       # spikes (else rates) on the feedback path
    use_spiking_feedforward: bool = True    # spikes (else rates) on the feedforward path
    use_symmetric_weights: bool = False     # Y = W^T (products of transposes with broadcast)
    noisy_symmetric_weights: bool = False   # ... plus N(0, 0.05) noise
    use_sparse_feedback: bool = False       # 80 % of Y zeroed, the rest x5
    update_feedback_weights: bool = False   # learn Y (and c) with b_etas
    use_apical_conductance: bool = False    # the apical compartment drives the soma through g_A
    use_weight_optimization: bool = True    # the paper's initialisation (V_avg = V_sd = 3, b_avg = 0.8, ...)
    use_feedback_bias: bool = False         # apical bias c
    record_backprop_angle: bool = False     # diagnostic: angle to the backprop update per hidden layer

    @property
    def M(self):
        return len(self.sizes) - 1


FLAGS = tuple(f.name for f in fields(Config) if f.type is bool or f.type == "bool")   # the option flags, in one place


# ----------------------------------------------------------------------------------------------------------------
# the equations


def kappa(cfg, path="ff"):
    """The truncated PSP kernel kappa((k+1) dt), k = 0 .. mem-1 (Eq. 2): (e^(-t/tau_L) - e^(-t/tau_s)) /
    (tau_L - tau_s). A rate path with rate_psp="rate" passes the rate itself: the kernel (1, 0, ..., 0)."""
    spiking = cfg.use_spiking_feedforward if path == "ff" else cfg.use_spiking_feedback
    if not spiking and cfg.rate_psp == "rate":
        return np.eye(1, cfg.mem)[0]
    t = np.arange(1, cfg.mem + 1) * cfg.dt
    return (np.exp(-t / cfg.tau_L) - np.exp(-t / cfg.tau_s)) / (cfg.tau_L - cfg.tau_s)


def psp(kap, history):
    """PSP(t) = sum_k kappa((k+1) dt) S(t - k) over a signal's last mem steps, history[k] = S(t - k) (Eq. 2)."""
    return torch.tensordot(torch.as_tensor(kap, dtype=history.dtype), history, dims=1)


def basal(W, psp_below, b):
    """B = W PSP_below + b (Eq. 5)."""
    return psp_below @ W.t() + b


def apical(Y, psp_fb, c=None):
    """A = Y PSP_fb (+ c, the authors' feedback bias) (Eq. 5)."""
    return psp_fb @ Y.t() + (0.0 if c is None else c)


def rate(C, cfg):
    """lambda_C = lambda_max sigmoid(C) (Eq. 4)."""
    return cfg.lambda_max * torch.sigmoid(C)


def soma_coefficients(cfg, output, g_T=0.0):
    """(dec, k_B, k_A, k_I) of a soma as a linear filter, C(t) = dec C(t-1) + k_B B(t) + k_A A(t) + k_I I0(t), with
    I0 = g_E E_E + g_I E_I the teaching input of total conductance g_T = g_E + g_I (the output layer in the target
    phase). Conductance somas, one Euler step of dC/dt = -g_L C + g_B (B - C) + g_A (A - C) (hidden, Eq. 6; g_A only
    with use_apical_conductance) or -g_L C + g_D (B - C) + g_E (E_E - C) + g_I (E_I - C) (output, Eq. 7). Without
    conductances the steady state of the same equation without its apical drive, as the authors' code: C = k_B B,
    k_B = g_B / (g_L + g_B + g_A) (hidden), C = (g_D B + I0) / (g_L + g_D + g_T) (output)."""
    g_A = cfg.g_A if cfg.use_apical_conductance and not output else 0.0
    g = cfg.g_D if output else cfg.g_B
    g_all = cfg.g_L + g + g_A + g_T
    if cfg.use_conductances:
        return 1.0 - cfg.dt * g_all, cfg.dt * g, cfg.dt * g_A, cfg.dt
    return 0.0, g / g_all, 0.0, 1.0 / g_all


def hidden_soma(C, B, A, cfg):
    """A hidden soma's next C from its basal and apical potentials (Eqs. 1, 6; see soma_coefficients)."""
    dec, k_B, k_A, _ = soma_coefficients(cfg, output=False)
    drive = k_B * B + k_A * A
    return dec * C + drive if cfg.use_conductances else drive


def output_soma(C, B, g_E, g_I, cfg):
    """The output soma's next C from its dendrite and the teaching conductances g_E, g_I (Eq. 7; see
    soma_coefficients; instantaneous somas take the steady state, as in the authors' code)."""
    dec, k_D, _, k_I = soma_coefficients(cfg, output=True, g_T=g_E + g_I)
    drive = k_D * B + k_I * (g_E * cfg.E_E + g_I * cfg.E_I)
    return dec * C + drive if cfg.use_conductances else drive


def attenuations(cfg):
    """The steady-state attenuations (k_B, k_D) = (g_B / (g_L + g_B + g_A), g_D / (g_L + g_D)) of the errors."""
    g_A = cfg.g_A if cfg.use_apical_conductance else 0.0
    return cfg.g_B / (cfg.g_L + cfg.g_B + g_A), cfg.g_D / (cfg.g_L + cfg.g_D)


def plateau(A_mean):
    """alpha = sigmoid(mean A over the phase's integration window) (Eq. 8)."""
    return torch.sigmoid(A_mean)


def dsigmoid(x):
    return torch.sigmoid(x) * (1 - torch.sigmoid(x))


def output_error(lam_t, C_f, k_D, lmax):
    """E^0 = -k_D lambda_max (mean lambda_C^t - lambda_max sigmoid(mean C^f)) sigmoid'(mean C^f) (Eqs. 10, 11)."""
    return -k_D * lmax * (lam_t - lmax * torch.sigmoid(C_f)) * dsigmoid(C_f)


def hidden_error(alpha_t, alpha_f, C_f, k_B, lmax):
    """E^1 = -k_B lambda_max (alpha^t - alpha^f) sigmoid'(mean C^f) (Eqs. 12, 13)."""
    return -k_B * lmax * (alpha_t - alpha_f) * dsigmoid(C_f)


def feedback_error(C_f, alpha_f, A_f, lmax):
    """The authors' feedback-weight error (their update_Y): E_inv = -(lambda_max sigmoid(mean C^f) - alpha^f)
    sigmoid'(mean A^f); dY = -b_eta E_inv PSP_fb^T, dc = -b_eta E_inv."""
    return -(lmax * torch.sigmoid(C_f) - alpha_f) * dsigmoid(A_f)


def step_sizes(lmax):
    """The paper's step-size factors: P^0 = 20 / lambda_max^2 (output), P^1 = 20 / lambda_max (hidden)."""
    return 20.0 / lmax ** 2, 20.0 / lmax


def weight_spread(N, lmax):
    """The "weight optimization" (Methods) for N inputs: W_avg and W_sd such that the basal potentials start at
    V_avg = 3 +- V_sd = 3 for presynaptic rates nu = lambda_max / 4 with bias b_avg = 0.8 (the authors' formula)."""
    V_avg, V_sd, b_avg, nu = 3.0, 3.0, 0.8, lmax * 0.25
    V_sm = V_sd ** 2 + V_avg ** 2
    W_avg = (V_avg - b_avg) / (nu * N * V_avg)
    W_sm = (V_sm + nu ** 2 * (N - N ** 2) * W_avg ** 2 * V_avg ** 2 - 2 * N * nu * b_avg * V_avg * W_avg
            - b_avg ** 2) / (N * nu ** 2 * V_sm)
    return W_avg, math.sqrt(max(W_sm - W_avg ** 2, 0.0))


B_AVG, B_SD = 0.8, 0.001   # the initial biases' mean and spread (weight optimization)


def initial_weights(cfg, generator):
    """W, b, Y, c as float64 CPU tensors, drawn top-down as the authors do. With weight optimization every value is
    avg + 3.465 sd U(-1, 1) (init="authors", as their code: a standard deviation of 2 sd) or avg + sqrt(12) sd
    U(-1/2, 1/2) (init="paper", the paper's formula: sd); the feedback Y into hidden layer m is one random matrix from
    the layer above (from the output with use_broadcast) with the W_avg and W_sd of the layer above m, c like b.
    Without weight optimization, as the authors: W = 0.1 U(-1, 1), b, Y, c = U(-1, 1)."""
    n, M = cfg.sizes, cfg.M
    width = 2.0 if cfg.init == "authors" else 1.0

    def U(*shape, w=1.0):                             # uniform on (-w/2, w/2)
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) - 0.5) * w
    W, b, Y, c = [None] * M, [None] * M, [None] * (M - 1), [None] * (M - 1)
    for m in range(M - 1, -1, -1):
        N = n[m]                                      # inputs of layer m
        fb_cols = n[-1] if cfg.use_broadcast else n[m + 1]
        if cfg.use_weight_optimization:
            W_avg, W_sd = weight_spread(N, cfg.lambda_max)
            W[m] = W_avg + 3.465 * W_sd * U(n[m + 1], N, w=width)
            b[m] = B_AVG + 3.465 * B_SD * U(n[m + 1], w=width)
            if m > 0:                                 # feedback into hidden layer m-1 (size N)
                Y[m - 1] = W_avg + 3.465 * W_sd * U(N, fb_cols, w=width)
                c[m - 1] = B_AVG + 3.465 * B_SD * U(N, w=width)
        else:
            W[m], b[m] = 0.1 * U(n[m + 1], N, w=2.0), U(n[m + 1], w=2.0)
            if m > 0:
                Y[m - 1], c[m - 1] = U(N, fb_cols, w=2.0), U(N, w=2.0)
    return W, b, Y, c


def sparse_masks(Y, generator):
    """use_sparse_feedback: a random 80 % of each Y's entries zeroed (the survivors are multiplied by 5)."""
    masks = []
    for y in Y:
        mask = torch.ones(y.numel(), dtype=torch.bool)
        mask[torch.randperm(y.numel(), generator=generator)[:int(0.8 * y.numel())]] = False
        masks.append(mask.view_as(y))
    return masks


def symmetric_feedback(W, cfg, generator=None):
    """use_symmetric_weights: Y = W^T of the layer above, or with use_broadcast the product of the transposes down
    from the output; noisy_symmetric_weights adds N(0, 0.05) noise to each transpose (drawn from `generator`)."""
    M = len(W)
    Y = [None] * (M - 1)

    def WT(m):
        w = W[m].t()
        if cfg.noisy_symmetric_weights:
            w = w + 0.05 * torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
        return w
    for m in range(M - 2, -1, -1):
        Y[m] = WT(m + 1) @ Y[m + 1] if cfg.use_broadcast and m < M - 2 else WT(m + 1).clone()
    return Y


# ----------------------------------------------------------------------------------------------------------------
# the network, one time step at a time


class Network:
    """One network and the state of B examples, simulated step by step with the functions above."""

    def __init__(self, cfg, weights=None, dtype=torch.float64):
        self.cfg, self.dtype = cfg, dtype
        self.gen = torch.Generator().manual_seed(cfg.seed)               # weights, masks, noise
        self.spike_gen = torch.Generator().manual_seed(cfg.seed + 1)     # Poisson spikes
        self.rng = np.random.default_rng(cfg.seed)                       # extra steps
        W, b, Y, c = weights if weights is not None else initial_weights(cfg, self.gen)
        self.masks = sparse_masks(Y, self.gen) if cfg.use_sparse_feedback and weights is None else None
        to = lambda ts: [t.to(dtype).clone() for t in ts]  # noqa: E731
        self.W, self.b, self.Y, self.c = to(W), to(b), to(Y), to(c)
        if weights is None:
            self._tie_feedback()
        self.kappa_ff, self.kappa_fb = kappa(cfg, "ff"), kappa(cfg, "fb")
        self.k_B, self.k_D = attenuations(cfg)                           # steady-state attenuations
        self.state = None

    def _tie_feedback(self):
        cfg = self.cfg
        if cfg.use_symmetric_weights:
            self.Y = symmetric_feedback(self.W, cfg, self.gen)
        if self.masks is not None:
            self.Y = [y * mk * 5 for y, mk in zip(self.Y, self.masks)]

    def reset(self, B):
        """Rest: zero potentials and histories for B examples (history[k]: the signal k steps ago)."""
        cfg, n = self.cfg, self.cfg.sizes
        z = lambda *s: torch.zeros(*s, dtype=self.dtype)  # noqa: E731
        self.state = dict(C=[z(B, k) for k in n[1:]], x=z(cfg.mem, B, n[0]),
                          S=[z(cfg.mem, B, k) for k in n[1:]], lam=[z(cfg.mem, B, k) for k in n[1:]])

    def _sent(self, m, path):
        """History of what layer m sends on a path: spike counts or rates."""
        spiking = self.cfg.use_spiking_feedforward if path == "ff" else self.cfg.use_spiking_feedback
        return self.state["S" if spiking else "lam"][m]

    def phase(self, x, T, target=None):
        """T steps from the current state with pixels x (B x n_in) and, in the target phase, the one-hot target;
        returns the means over the last integration_time steps of C, A, lambda, PSP_in (per layer) and PSP_fb."""
        cfg, M, st = self.cfg, self.cfg.M, self.state
        fb_src = (lambda m: M - 1) if cfg.use_broadcast else (lambda m: m + 1)
        push = lambda h, v: torch.cat([v.unsqueeze(0), h[:-1]])   # noqa: E731
        rec = {k: [[] for _ in range(M)] for k in ("C", "A", "lam", "psp_in", "psp_fb")}
        g_E = target if target is not None else torch.zeros(1, dtype=self.dtype)
        g_I = 1.0 - target if target is not None else torch.zeros(1, dtype=self.dtype)
        for _ in range(T):
            x_rate = cfg.lambda_max * x
            x_sig = torch.poisson(x_rate, generator=self.spike_gen) if cfg.use_spiking_feedforward else x_rate
            st["x"] = push(st["x"], x_sig)
            fb = [psp(self.kappa_fb, self._sent(fb_src(m), "fb")) for m in range(M - 1)]   # as of the step before
            for m in range(M):
                below = st["x"] if m == 0 else self._sent(m - 1, "ff")
                p_in = psp(self.kappa_ff, below)
                B = basal(self.W[m], p_in, self.b[m])
                if m < M - 1:
                    A = apical(self.Y[m], fb[m], self.c[m] if cfg.use_feedback_bias else None)
                    st["C"][m] = hidden_soma(st["C"][m], B, A, cfg)
                    rec["A"][m].append(A)
                    rec["psp_fb"][m].append(fb[m])
                else:
                    st["C"][m] = output_soma(st["C"][m], B, g_E, g_I, cfg)
                lam = rate(st["C"][m], cfg)
                st["lam"][m] = push(st["lam"][m], lam)
                if cfg.use_spiking_feedforward or cfg.use_spiking_feedback:
                    st["S"][m] = push(st["S"][m], torch.poisson(lam, generator=self.spike_gen))
                for k, v in (("C", st["C"][m]), ("lam", lam), ("psp_in", p_in)):
                    rec[k][m].append(v)
        w = cfg.integration_time
        return {k: [torch.stack(v[-w:]).mean(0) if v else None for v in vals] for k, vals in rec.items()}

    def phase_lengths(self):
        """(forward, target) phase lengths: the configured ones, each + int(Wald(2, 1)) with extra_steps."""
        cfg = self.cfg
        if not cfg.extra_steps:
            return cfg.l_f_phase, cfg.l_t_phase
        return cfg.l_f_phase + int(self.rng.wald(2.0, 1.0)), cfg.l_t_phase + int(self.rng.wald(2.0, 1.0))

    def train_batch(self, x, target, lr_factor=1.0, lengths=None):
        """One batch: forward phase, target phase, the local updates averaged over the batch (Eqs. 10-13)."""
        cfg, M, lmax = self.cfg, self.cfg.M, self.cfg.lambda_max
        if self.state is None:
            self.reset(x.shape[0])
        Tf, Tt = lengths if lengths is not None else self.phase_lengths()
        f = self.phase(x, Tf)
        t = self.phase(x, Tt, target)
        Bn = x.shape[0]
        alpha_f = [plateau(a) for a in f["A"][:M - 1]]
        alpha_t = [plateau(a) for a in t["A"][:M - 1]]
        E = [hidden_error(alpha_t[m], alpha_f[m], f["C"][m], self.k_B, lmax) for m in range(M - 1)]
        E.append(output_error(t["lam"][M - 1], f["C"][M - 1], self.k_D, lmax))
        if cfg.update_feedback_weights:
            for m in range(M - 1):
                E_inv = feedback_error(f["C"][m], alpha_f[m], f["A"][m], lmax)
                self.Y[m] = self.Y[m] - lr_factor * cfg.b_etas[m] * E_inv.t() @ f["psp_fb"][m] / Bn
                if cfg.use_feedback_bias:
                    self.c[m] = self.c[m] - lr_factor * cfg.b_etas[m] * E_inv.mean(0)
                if self.masks is not None:
                    self.Y[m] = self.Y[m] * self.masks[m]
        P_out, P_hid = step_sizes(lmax)
        for m in range(M):
            P = P_out if m == M - 1 else P_hid
            self.W[m] = self.W[m] - lr_factor * cfg.f_etas[m] * P * E[m].t() @ f["psp_in"][m] / Bn
            self.b[m] = self.b[m] - lr_factor * cfg.f_etas[m] * P * E[m].mean(0)
        if cfg.use_symmetric_weights:
            self._tie_feedback()
        return f, t

    def forward_means(self, x, T=None):
        """Testing: the state at rest, one forward phase of l_f_phase_test steps; the window means."""
        self.reset(x.shape[0])
        return self.phase(x, T or self.cfg.l_f_phase_test)
