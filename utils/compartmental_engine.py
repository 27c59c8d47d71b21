"""The fast simulation engine of the segregated-dendrite network: P networks ("members") of one structure simulated
side by side, each on its own batch of examples, with every tensor's leading dimension the member p.

utils/compartmental_reference.py holds the same equations one time step at a time, as the paper writes them; the
tests check this engine against it. utils/compartmental.py is the scikit-learn face over both. Dimensions, as named
in the code: p member, t time step (a segment's rows), b example of a member's batch, i / o neurons of the layer
below / above; the members share the structure (layer sizes, flags, phase lengths, dt, batch size) and may differ in
every number (rates, lambda_max, conductances, tau_s, tau_L, phase lengths drawn by extra_steps, their data).

How it is fast (see utils/compartmental.py's docstring for the model):
* input layer: its spikes depend on nothing the network does, so all of a segment's input spikes are drawn at once and
  projected by one `embedding_bag` over the active inputs only (about 20 of 784 per step on MNIST).
* layer by layer, whenever the apical compartment does not drive the soma: a layer then depends only on the layer
  below up to the same step, and its soma is a linear filter of U = W S (the projected signal of the layer below):
  C(t) = dec C(t-1) + coef (K U + b)(t) [+ c_I I0], so C of all Ts steps of a segment is one batched matrix product
  H U (H = coef D K, D[t, s] = dec^(t-s), K the banded kernel matrix, both per member) plus the constant and initial
  terms. With apical conductance the layers are stepped together, one time step at a time.
* window means of linear quantities (PSPs, A = Y PSP_fb + c) are taken once per segment from the stored signals.
* members of different phase lengths run max_p T_p steps; each member's window means use only its own window, and its
  state for the next phase is gathered at its own last step (the extra steps are discarded).
* random numbers: on the CPU each member draws its uniforms from its own NumPy generator in the order a lone run does
  (per phase: the input's, then each spiking layer's, for the whole phase), so a member's spikes equal a lone run's
  to the last bit; on other devices all members draw from one torch generator (equal in distribution).
"""
import math
import os

import numpy as np
import torch

from utils import compartmental_reference as R

SEGMENT = 64          # time steps simulated (and whose input spikes are projected) in one go
FUSE = os.environ.get("BIODL_COMPILE", "1") != "0"   # sample spikes with one torch.compile'd kernel (eager fallback;
#                       BIODL_COMPILE=0 turns it off, e.g. for quick tests)
FUSE_MIN = 2 ** 16    # ... from this many neuron-steps on (smaller ones stay eager)
FUSE_K = 6            # thresholds tested densely by the fused kernel (P(N >= 6) < 1e-7 at rate 0.2; exact tail after)


# ----------------------------------------------------------------------------------------------------------------
# Poisson spike counts by inverse CDF of one uniform number each


def _spike_counts(x, u, lmax, from_potential: bool):
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


def poisson_tail(flat, lam, u, idx, k):
    """Counts flat[idx] known to be >= k: add one while u > F(k; l), F(k; l) = e^-l sum_{j<=k} l^j / j!."""
    if not idx.numel():
        return
    l = lam[idx]
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


def poisson(lam, u):
    """Exact Poisson(lam) counts by inverse CDF of the uniforms u (same shape): N >= k iff u > F(k-1; lam). The first
    two thresholds are tested densely, the further ones only where the second was passed."""
    F = torch.exp(-lam)
    out = (u > F).to(lam.dtype)                          # N >= 1: u > e^-lam
    F = F + F * lam
    second = u > F                                       # N >= 2: u > e^-lam (1 + lam)
    out += second
    poisson_tail(out.view(-1), lam.reshape(-1), u.reshape(-1), second.view(-1).nonzero().squeeze(1), 2)
    return out


def spikes(x, u, lmax, from_potential):
    """(lambda, Poisson counts) for potentials x (lambda = lmax sigmoid(x)) or rates x, with uniforms u; the fused
    kernel for large tensors when torch.compile works here, else eager ops."""
    kind = x.device.type
    if FUSE and u.numel() >= FUSE_MIN and _fused.get(kind, 0) is not None:
        try:
            if kind not in _fused:
                _fused[kind] = torch.compile(_spike_counts, dynamic=True)
            # flat contiguous arguments (and lambda_max a number where the members share it): one compiled kernel
            # per use, whatever the shapes, strides and population size
            if isinstance(lmax, torch.Tensor):
                lmax = float(lmax.view(-1)[0]) if bool((lmax == lmax.view(-1)[0]).all()) else \
                    lmax.expand_as(x).reshape(-1)
            lam, n, top = _fused[kind](x.expand_as(u).reshape(-1), u.reshape(-1), lmax, from_potential)
            lam, n = lam.view(u.shape), n.view(u.shape)
        except Exception:                                # no compiler / backend: stay eager from now on
            _fused[kind] = None
        else:
            if top >= FUSE_K:                            # the rare counts >= FUSE_K: exact series from there
                flat = n.view(-1)
                poisson_tail(flat, lam.reshape(-1), u.reshape(-1), (flat >= FUSE_K).nonzero().squeeze(1), FUSE_K)
            return lam, n
    lam = torch.sigmoid(x) * lmax if from_potential else x
    return lam, poisson(lam.expand_as(u).contiguous(), u)


def segments(T):
    """The segments (starts, lengths) of a phase whose members run T[p] steps: SEGMENT steps each, the last one from
    below the shortest member's end to the longest's, so that every member's last steps lie in it."""
    T_min, T_max = int(np.min(T)), int(np.max(T))
    starts = list(range(0, T_min, SEGMENT))
    return starts, [SEGMENT] * (len(starts) - 1) + [T_max - starts[-1]]


# ----------------------------------------------------------------------------------------------------------------
# the population


class Population:
    """P networks of one structure, their weights stacked along a leading member dimension, simulated together.

    `members` are CompartmentalClassifiers with their constants, generators, weights (W_, b_, Y_, c_, Y_mask_) and
    state (state_, or `states`) set up; `B` the state's batch size. With bind=True the members' weights become views
    of the stacks (their hooks see the current weights); `weights_back()` and `state_back()` write results back."""

    def __init__(self, members, B, states=None, bind=True):
        self.members = list(members)
        m0 = self.members[0]
        self.M, self.n, self.mem, self.dt, self.B = m0.M_, m0.n_, m0.mem, m0.dt, int(B)
        self.dev, self.dty = m0.device_, m0.dtype_
        self.flags = {name: bool(getattr(m0, name)) for name in (
            "use_conductances", "use_broadcast", "use_spiking_feedback", "use_spiking_feedforward",
            "use_symmetric_weights", "noisy_symmetric_weights", "use_sparse_feedback", "update_feedback_weights",
            "use_apical_conductance", "use_feedback_bias", "record_backprop_angle")}
        self.ffk = "spike" if self.flags["use_spiking_feedforward"] else "rate"
        self.fbk = "spike" if self.flags["use_spiking_feedback"] else "rate"
        self.bind = bind
        self._stack(states)

    # -- members' numbers and weights as stacked tensors -------------------------------------------------------

    def _col(self, values):
        """Per-member numbers as a (P, 1, 1) tensor (broadcasts over examples and neurons)."""
        return torch.tensor(values, device=self.dev, dtype=self.dty).view(-1, 1, 1)

    def _stack(self, states=None):
        ms, M = self.members, self.M
        self.P = len(ms)
        self.lmax = self._col([m.lambda_max for m in ms])
        self.k_B = self._col([m.k_B_ for m in ms])
        self.k_D = self._col([m.k_D_ for m in ms])
        self.E_E = self._col([m.E_E for m in ms])
        self.E_I = self._col([m.E_I for m in ms])
        self.W = [torch.stack([m.W_[k] for m in ms]) for k in range(M)]
        self.b = [torch.stack([m.b_[k] for m in ms]) for k in range(M)]
        self.Y = [torch.stack([m.Y_[k] for m in ms]) for k in range(M - 1)]
        self.c = [torch.stack([m.c_[k] for m in ms]) for k in range(M - 1)]
        self.Y_mask = None if ms[0].Y_mask_ is None else \
            [torch.stack([m.Y_mask_[k] for m in ms]) for k in range(M - 1)]
        st = states if states is not None else [m.state_ for m in ms]
        self.C = [torch.stack([s["C"][k] for s in st]) for k in range(M)]
        self.sig = [{kind: torch.stack([s["sig"][k][kind] for s in st]) for kind in st[0]["sig"][k]} for k in range(M)]
        hist = [s["hist"] for s in st]      # input history events (row, example, input, value) of each member
        p = torch.cat([torch.full_like(h[0], q) for q, h in enumerate(hist)])
        self.hist = (torch.cat([h[0] for h in hist]), p * self.B + torch.cat([h[1] for h in hist]),
                     torch.cat([h[2] for h in hist]), torch.cat([h[3] for h in hist]))
        self.kappa = {"ff": np.stack([m.kappa_ff_ for m in ms]),           # (P, mem), kappa[k]: k steps ago,
                      "fb": np.stack([m.kappa_fb_ for m in ms])}           # per path (Eq. 2)
        self.cache, self.version, self.buf = {}, 0, None
        if self.bind:
            self._point_members()

    def _point_members(self):
        """Each member's W_, b_, Y_, c_ become views of the stacks (so that hooks see the current weights)."""
        for q, m in enumerate(self.members):
            m.W_ = [w[q] for w in self.W]
            m.b_ = [v[q] for v in self.b]
            m.Y_ = [y[q] for y in self.Y]
            m.c_ = [v[q] for v in self.c]

    def state_back(self):
        """Write every member's state (potentials, signal histories, input history) back to it."""
        et, ex, ei, ev = self.hist
        for q, m in enumerate(self.members):
            keep = (ex // self.B) == q
            m.state_ = dict(C=[c[q].clone() for c in self.C],
                            sig=[{k: v[q].clone() for k, v in layer.items()} for layer in self.sig],
                            hist=(et[keep], ex[keep] % self.B, ei[keep], ev[keep]))

    def weights_back(self, keep=None):
        """Give the members their own copies of the weights; with `keep` (member indices), go on with those only."""
        for q, m in enumerate(self.members):
            m.W_, m.b_ = [w[q].clone() for w in self.W], [v[q].clone() for v in self.b]
            m.Y_, m.c_ = [y[q].clone() for y in self.Y], [v[q].clone() for v in self.c]
        if keep is not None:
            self.state_back()
            self.members = [self.members[q] for q in keep]
            if self.members:
                self._stack()

    def save_slots(self):
        """The state before a batch, for restore_slots: a smaller batch leaves its empty slots as they were."""
        return [c.clone() for c in self.C], [{k: v.clone() for k, v in layer.items()} for layer in self.sig], self.hist

    def restore_slots(self, saved, active):
        """Put the saved state back into the empty slots (and keep the new state of the active ones)."""
        C, sig, hist = saved
        a = active.unsqueeze(-1)
        self.C = [torch.where(a, new, old) for new, old in zip(self.C, C)]
        self.sig = [{k: torch.where(a.unsqueeze(1), layer[k], old[k]) for k in layer} for layer, old in zip(self.sig, sig)]
        flat = active.reshape(-1)
        new_keep, old_keep = flat[self.hist[1]], ~flat[hist[1]]
        self.hist = tuple(torch.cat([h_new[new_keep], h_old[old_keep]]) for h_new, h_old in zip(self.hist, hist))

    # -- cached per-member matrices ------------------------------------------------------------------------------

    def _tensor(self, a):
        return torch.tensor(np.asarray(a), device=self.dev, dtype=self.dty)

    def _hmat(self, Ts, layer, target):
        """H = coef D K (P x Ts x (mem + Ts)) and d = [D 1, dec^(t+1)] (P x Ts x 2) of a layer's soma over a segment:
        C = H U + d [coef b + c_I I0, C(-1)] (Eqs. 1, 6, 7 as a linear filter of the projected input U = W S)."""
        key = ("H", Ts, layer, target)
        if key not in self.cache:
            t, K = np.arange(Ts), self._kband_np(Ts)
            Hs, ds = [], []
            for q, m in enumerate(self.members):
                dec, coef, _, _ = m._soma_filter(layer, target)
                D = np.where(t[:, None] >= t[None, :], float(dec) ** np.maximum(t[:, None] - t[None, :], 0), 0.0)
                Hs.append(coef * D @ K[q])
                ds.append(np.stack([D.sum(1), float(dec) ** (t + 1)], 1))
            self.cache[key] = (self._tensor(np.stack(Hs)), self._tensor(np.stack(ds)))
        return self.cache[key]

    def _kband_np(self, Ts):
        """(P, Ts, mem + Ts) banded kernel matrices K[t, mem + t - k] = kappa[k] of the feedforward path (numpy):
        PSP drive = K @ U over a segment."""
        t, K = np.arange(Ts), np.zeros((self.P, Ts, self.mem + Ts))
        for j in range(self.mem):
            K[:, t, self.mem + t - j] = self.kappa["ff"][:, j:j + 1]
        return K

    def _kband(self, Ts):
        """_kband_np as a tensor, cached."""
        key = ("K", Ts)
        if key not in self.cache:
            self.cache[key] = self._tensor(self._kband_np(Ts))
        return self.cache[key]

    def _row_weights(self, rows, t_abs, lo, hi, window, path):
        """(P, rows): the weight of each buffer row (step tau = row - mem + t_abs) in a member's mean PSP over the
        times [lo_p, hi_p]: (1/window) sum_{t' in [lo_p, hi_p], 0 <= t' - tau < mem} kappa_p[t' - tau]. Rows of
        earlier segments weigh 0 (they were counted there)."""
        mem = self.mem
        tau = np.arange(rows) - mem + t_abs
        Kc = np.concatenate([np.zeros((self.P, 1)), np.cumsum(self.kappa[path], 1)], 1)    # (P, mem + 1)
        a = np.maximum(tau[None, :], lo[:, None]) - tau[None, :]
        b = np.minimum(tau[None, :] + mem - 1, hi[:, None]) - tau[None, :]
        w = np.where(b >= a, np.take_along_axis(Kc, np.clip(b + 1, 0, mem), 1)
                     - np.take_along_axis(Kc, np.clip(a, 0, mem), 1), 0.0) / window
        if t_abs > 0:
            w[:, tau < t_abs] = 0.0
        return self._tensor(w)

    # -- one phase ------------------------------------------------------------------------------------------------

    def phase(self, x, T, target, window, unif):
        """Simulate the members' phases of T[p] steps (numpy ints) from the state, inputs x (P, B, n_in) in [0, 1];
        target (P, B, n_out) one-hot or None (forward phase); window: steps averaged at the end of each member's phase;
        unif: per segment (see segments), (input uniforms (Ts, nnz), [per layer (P, Ts, B, n) or None]), or None
        (rate mode).
        Returns the window means C, A (hidden), lam (output, target phase), psp_fb and psp_in per layer."""
        M, mem, n, P, B = self.M, self.mem, self.n, self.P, self.B
        dev, dty, sig = self.dev, self.dty, self.sig
        T = np.asarray(T)
        starts, lens = segments(T)
        A_step = self.flags["use_conductances"] and self.flags["use_apical_conductance"] and \
            any(m.g_A != 0 for m in self.members)
        z = lambda *s: torch.zeros(*s, device=dev, dtype=dty)  # noqa: E731
        x_idx = x.nonzero(as_tuple=True)                     # active inputs, member-major (p, b, i)
        rates = x[x_idx] * self.lmax.view(-1)[x_idx[0]]       # input rates lambda_max * pixel
        ex = x_idx[0] * B + x_idx[1]                          # example index p B + b
        I0 = None if target is None else target * self.E_E + (1.0 - target) * self.E_I   # g_E E_E + g_I E_I
        w0 = T - window                                       # first step of each member's averaging window
        Csum = [z(P, B, n[m + 1]) for m in range(M)]
        lam_sum = z(P, B, n[-1])
        fb_mean = [z(P, B, n[self.fb_source(m) + 1]) for m in range(M - 1)]
        in_mean = [z(P * B * n[0])] + [z(P, B, n[m]) for m in range(1, M)]
        buf = self._buffers(mem + max(lens))
        for layer, hist in zip(buf, sig):                     # rows [0, mem): the last mem steps
            for k, v in layer.items():
                v[:, :mem] = hist[k]
        W0 = self._W0t()                                      # (p, i) rows: every member's W^T
        Wt = [w.transpose(1, 2) for w in self.W]
        Yt = [y.transpose(1, 2) for y in self.Y]
        for k, (s, Ts) in enumerate(zip(starts, lens)):
            rows = mem + Ts
            wwin = self._tensor(((np.arange(s, s + Ts)[None, :] >= w0[:, None])
                                 & (np.arange(s, s + Ts)[None, :] < T[:, None])) / window).unsqueeze(1)   # (P, 1, Ts)
            # -- input layer: events of the history rows [0, mem) and of Ts new rows; U(t) = W S(t), all rows at once
            ht, hx, hi, hv = self.hist
            if unif is not None:                              # spikes: Poisson counts of the input rates
                _, counts = spikes(rates.view(1, -1), unif[k][0], None, False)
                t_new, j = counts.nonzero(as_tuple=True)
                nv = counts[t_new, j]
            else:                                             # rates: every active input at every step
                t_new = torch.arange(Ts, device=dev).repeat_interleave(rates.numel())
                j = torch.arange(rates.numel(), device=dev).repeat(Ts)
                nv = rates[j]
            et, ee = torch.cat([ht, t_new + mem]), torch.cat([hx, ex[j]])
            ei, ev = torch.cat([hi, x_idx[2][j]]), torch.cat([hv, nv])
            p_ev = ee // B
            bag = (p_ev * rows + et) * B + ee % B             # (member, row, example): one member's W at a time
            order = torch.argsort(bag, stable=True)
            counts_bag = torch.bincount(bag, minlength=P * rows * B)
            U0 = torch.nn.functional.embedding_bag((p_ev * n[0] + ei)[order], W0, counts_bag.cumsum(0) - counts_bag,
                                                   mode="sum", per_sample_weights=ev[order])
            U0 = U0.view(P, rows, B, n[1])
            w_in = self._row_weights(rows, s, w0, T - 1, window, "ff")   # mean input PSP over the window (Eq. 12)
            in_mean[0].index_add_(0, ee * n[0] + ei, ev * w_in[p_ev, et])
            if s != starts[-1]:                               # the last mem rows become the history
                keep = et >= Ts
                self.hist = (et[keep] - Ts, ee[keep], ei[keep], ev[keep])
            else:                                             # each member keeps its own last mem rows (below)
                self.hist = (et, ee, ei, ev)
            seg_unif = unif[k][1] if unif is not None else [None] * M
            if not A_step:
                C_last = self._segment_layers(U0, Ts, s, buf, Wt, seg_unif, I0, wwin, Csum, lam_sum, target)
            else:
                C_last = self._segment_steps(U0, Ts, s, buf, Wt, Yt, seg_unif, I0, wwin, Csum, lam_sum, target)
            # -- window means of the PSPs from this segment's rows (feedback: as of the step before)
            w_fb = self._row_weights(rows, s, w0 - 1, T - 2, window, "fb") if M > 1 else None
            for m in range(M - 1):
                src = buf[self.fb_source(m)][self.fbk][:, :rows]
                fb_mean[m] += torch.bmm(w_fb.unsqueeze(1), src.reshape(P, rows, -1)).view_as(fb_mean[m])
            for m in range(1, M):
                src = buf[m - 1][self.ffk][:, :rows]
                in_mean[m] += torch.bmm(w_in.unsqueeze(1), src.reshape(P, rows, -1)).view_as(in_mean[m])
            if s != starts[-1]:
                for layer in buf:
                    for v in layer.values():
                        v[:, :mem] = v[:, Ts:Ts + mem].clone()
        # -- each member's state as of its own last step T_p - 1 (its extra steps are discarded)
        s, q = starts[-1], torch.arange(P, device=dev)
        last = torch.as_tensor(T - 1 - s, device=dev)
        self.C = [c[q, last] for c in C_last]
        hist_rows = torch.as_tensor(T - s, device=dev)[:, None] + torch.arange(mem, device=dev)   # (P, mem)
        self.sig = [{k: v[q[:, None], hist_rows] for k, v in layer.items()} for layer in buf]
        et, ee, ei, ev = self.hist                            # buffer rows r of the last segment: step s - mem + r
        et = et - torch.as_tensor(T - s, device=dev)[ee // B]  # row of the member's history [T_p - mem, T_p)
        keep = (et >= 0) & (et < mem)
        self.hist = (et[keep], ee[keep], ei[keep], ev[keep])
        A_mean = [torch.bmm(fb_mean[m], Yt[m]) for m in range(M - 1)]   # A is linear in the feedback PSP
        if self.flags["use_feedback_bias"]:
            A_mean = [a + c.unsqueeze(1) for a, c in zip(A_mean, self.c)]
        in_mean[0] = in_mean[0].view(P, B, n[0])
        return dict(C=Csum, A=A_mean, lam=lam_sum, psp_fb=fb_mean, psp_in=in_mean)

    def _buffers(self, rows):
        """Per layer and kind of signal, a (P, rows, B, n) buffer: the last mem steps, then a segment's steps."""
        first = None if self.buf is None else next(iter(self.buf[0].values()))
        if first is None or first.shape[1] < rows:
            rows = max(rows, self.mem + SEGMENT)
            self.buf = [{k: torch.empty(self.P, rows, self.B, self.n[m + 1], device=self.dev, dtype=self.dty)
                         for k in layer} for m, layer in enumerate(self.sig)]
        return self.buf

    def _W0t(self):
        """Every member's input weights transposed, (P n_in, n_1), contiguous (for embedding_bag); cached until the
        next update."""
        if self.cache.get("W0t_version") != self.version:
            P, n = self.P, self.n
            self.cache["W0t"] = self.W[0].transpose(1, 2).contiguous().view(P * n[0], n[1])
            self.cache["W0t_version"] = self.version
        return self.cache["W0t"]

    def fb_source(self, m):
        return self.M - 1 if self.flags["use_broadcast"] else m + 1

    def _emit(self, m, C, u, buf, rows_slice):
        """lambda_C = lambda_max sigmoid(C) (Eq. 4) and what layer m sends (spikes and / or rates) into its buffer."""
        layer, lmax = buf[m], self.lmax.view(-1, *[1] * (C.dim() - 1))
        if "spike" in layer:
            lam, counts = spikes(C, u, lmax, True)
            layer["spike"][rows_slice] = counts
        else:
            lam = torch.sigmoid(C) * lmax
        if "rate" in layer:
            layer["rate"][rows_slice] = lam.expand_as(C)
        return lam

    def _segment_layers(self, U0, Ts, s, buf, Wt, unif, I0, wwin, Csum, lam_sum, target):
        """Ts steps of every layer, one whole layer after the other (valid when A does not drive the soma): C of all
        steps is H U + d [coef b + c_I I0, C(-1)] (Eqs. 1, 5, 6, 7). Returns each layer's C of the segment."""
        M, mem, P, B = self.M, self.mem, self.P, self.B
        rows = mem + Ts
        C_seg = []
        for m in range(M):
            out = m == M - 1
            if m == 0:
                U = U0
            else:                                             # U = W S of the layer below, every row
                below = buf[m - 1][self.ffk][:, :rows]
                U = torch.bmm(below.reshape(P, rows * B, -1), Wt[m]).view(P, rows, B, -1)
            H, d = self._hmat(Ts, m, out and target is not None)
            no = self.n[m + 1]
            C = torch.bmm(H, U.reshape(P, rows, B * no))      # (P, Ts, B n)
            _, coef, _, c_I = self._soma(m, target is not None)
            const = coef * self.b[m].unsqueeze(1).expand(P, B, no)
            if out and target is not None:                    # teaching current g_E E_E + g_I E_I (Eq. 7)
                const = const + c_I * I0
            C = C.baddbmm_(d, torch.stack([const.reshape(P, -1), self.C[m].reshape(P, -1)], 1)).view(P, Ts, B, no)
            self.C[m] = C[:, Ts - 1]
            lam = self._emit(m, C, unif[m], buf, (slice(None), slice(mem, rows)))
            Csum[m] += torch.bmm(wwin, C.reshape(P, Ts, -1)).view(P, B, no)
            if out and target is not None:
                lam_sum += torch.bmm(wwin, lam.expand_as(C).reshape(P, Ts, -1)).view(P, B, no)
            C_seg.append(C)
        return C_seg

    def _soma(self, m, target):
        """Per-member (dec, k_B, k_A, k_I) of layer m's soma (the reference's soma_coefficients) as (P, 1, 1)
        tensors, cached."""
        key = ("soma", m, target)
        if key not in self.cache:
            vals = [mb._soma_filter(m, target) for mb in self.members]
            self.cache[key] = tuple(self._col([v[k] for v in vals]) for k in range(4))
        return self.cache[key]

    def _segment_steps(self, U0, Ts, s, buf, Wt, Yt, unif, I0, wwin, Csum, lam_sum, target):
        """Ts steps of all layers together, one time step after the other (apical conductance drives the soma):
        B = W PSP + b (Eq. 5), A = Y PSP_fb (+ c) as of the step before, C += dt (-g_L C + g_B (B - C) + g_A (A - C))
        (Eq. 6); output as in _segment_layers. PSPs are the explicit kernel sums over the buffers' last mem rows."""
        M, mem, P, B = self.M, self.mem, self.P, self.B
        rows = mem + Ts
        kap = {k: self._tensor(v[:, ::-1].copy()).unsqueeze(1) for k, v in self.kappa.items()}   # oldest row first
        Bin = torch.bmm(self._kband(Ts), U0.reshape(P, rows, -1)).view(P, Ts, B, -1) + self.b[0].unsqueeze(1).unsqueeze(1)
        C_seg = [torch.empty(P, Ts, B, self.n[m + 1], device=self.dev, dtype=self.dty) for m in range(M)]
        consts = [self._soma(m, target is not None) for m in range(M)]

        def psp(layer, kind, r, path):                      # PSP of the rows (r - mem, r] (Eq. 2)
            src = buf[layer][kind][:, r - mem + 1:r + 1]
            return torch.bmm(kap[path], src.reshape(P, mem, -1)).view(P, B, -1)
        for t in range(Ts):
            r = mem + t
            for m in range(M):
                out = m == M - 1
                dec, gB, gA, c_I = consts[m]
                basal = Bin[:, t] if m == 0 else torch.baddbmm(self.b[m].unsqueeze(1), psp(m - 1, self.ffk, r, "ff"), Wt[m])
                C = self.C[m] * dec + basal * gB
                if not out:
                    A = torch.bmm(psp(self.fb_source(m), self.fbk, r - 1, "fb"), Yt[m])
                    if self.flags["use_feedback_bias"]:
                        A = A + self.c[m].unsqueeze(1)
                    C = C + A * gA
                elif target is not None:
                    C = C + I0 * c_I
                self.C[m] = C
                C_seg[m][:, t] = C
                self._emit(m, C, None if unif[m] is None else unif[m][:, t], buf, (slice(None), r))
        for m in range(M):
            no = self.n[m + 1]
            Csum[m] += torch.bmm(wwin, C_seg[m].reshape(P, Ts, -1)).view(P, B, no)
        if target is not None:
            lam = torch.sigmoid(C_seg[-1]) * self.lmax.unsqueeze(-1)
            lam_sum += torch.bmm(wwin, lam.reshape(P, Ts, -1)).view(P, B, -1)
        return C_seg

    # -- learning -------------------------------------------------------------------------------------------------

    def update(self, f, t, w_ex, lr):
        """The members' local updates from their window means f (forward) and t (target), each example weighted by
        w_ex (P, B) (1 / B_p for a member's examples, 0 for empty slots), rates scaled by lr (P,) (Eqs. 10-13).
        Returns each member's angles to the backprop update (record_backprop_angle) or None."""
        M, lmax, P = self.M, self.lmax, self.P
        Cf = f["C"]
        w = w_ex.unsqueeze(-1)                                            # (P, B, 1)
        alpha_f = [R.plateau(a) for a in f["A"]]
        alpha_t = [R.plateau(a) for a in t["A"]]
        E = [R.hidden_error(alpha_t[m], alpha_f[m], Cf[m], self.k_B, lmax) for m in range(M - 1)]
        E.append(R.output_error(t["lam"], Cf[M - 1], self.k_D, lmax))
        angles, dW = None, None
        if self.flags["record_backprop_angle"] and M > 1:
            dW = [torch.bmm((E[m] * w).transpose(1, 2), f["psp_in"][m]) for m in range(M)]
            angles = self._bp_angles(E, dW, Cf, f, w)
        lr = torch.as_tensor(lr, device=self.dev, dtype=self.dty).view(-1, 1, 1)
        if self.flags["update_feedback_weights"]:
            b_etas = self._col([mb.b_etas_ for mb in self.members]).view(P, -1)
            for m in range(M - 1):
                E_inv = R.feedback_error(Cf[m], alpha_f[m], f["A"][m], lmax) * w
                step = lr * b_etas[:, m].view(-1, 1, 1)
                self.Y[m] -= step * torch.bmm(E_inv.transpose(1, 2), f["psp_fb"][m])
                if self.flags["use_feedback_bias"]:
                    self.c[m] -= step.view(-1, 1) * E_inv.sum(1)
                if self.Y_mask is not None:
                    self.Y[m] *= self.Y_mask[m]
        f_etas = self._col([mb.f_etas_ for mb in self.members]).view(P, -1)
        P_out, P_hid = R.step_sizes(lmax)
        for m in range(M):                                    # W -= eta P E^T PSP_in, b -= eta P E (batch means)
            step = lr * f_etas[:, m].view(-1, 1, 1) * (P_out if m == M - 1 else P_hid)
            self.W[m] -= step * (dW[m] if dW is not None else torch.bmm((E[m] * w).transpose(1, 2), f["psp_in"][m]))
            self.b[m] -= step.view(-1, 1) * (E[m] * w).sum(1)
        self.version += 1
        if self.flags["use_symmetric_weights"]:
            for q, mb in enumerate(self.members):
                cfg = mb.config()
                Y = R.symmetric_feedback([wt[q] for wt in self.W], cfg, mb.gen_cpu_)
                for m in range(M - 1):
                    self.Y[m][q] = Y[m] * (self.Y_mask[m][q] * 5 if self.Y_mask is not None else 1)
        return angles

    def _bp_angles(self, E, dW, Cf, f, w):
        """Per member: the angle between each hidden layer's local update and backprop's from the same state: the
        output error sent down through the forward weights, E_bp^m = (E_bp^(m+1) W^(m+1)) k_B lambda_max
        sigmoid'(C^m), the paper's Fig. 7A diagnostic."""
        out = [dict() for _ in range(self.P)]
        E_bp = E[-1]
        for m in range(self.M - 2, -1, -1):
            E_bp = torch.bmm(E_bp, self.W[m + 1]) * self.k_B * self.lmax * R.dsigmoid(Cf[m])
            dW_bp = torch.bmm((E_bp * w).transpose(1, 2), f["psp_in"][m])
            cos = (dW[m] * dW_bp).sum((1, 2)) / (dW[m].norm(dim=(1, 2)) * dW_bp.norm(dim=(1, 2)))
            deg = torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).tolist()
            for q in range(self.P):
                out[q][f"hidden{m + 1}"] = deg[q]
        return out
