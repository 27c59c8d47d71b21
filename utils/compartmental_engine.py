"""The fast simulation engine of the segregated-dendrite network: P networks ("members") of one structure simulated
side by side, each on its own batch of examples, with every tensor's leading dimension the member p.

utils/compartmental_reference.py holds the same equations one time step at a time, as the paper writes them; the
tests check this engine against it. utils/compartmental.py is the scikit-learn face over both. Dimensions, as named
in the code: p member, t time step (a segment's rows), b example of a member's batch, i / o neurons of the layer
below / above; the members share the structure (layer sizes, flags, phase lengths, dt, batch size) and may differ in
every number (rates, lambda_max, conductances, tau_s, tau_L, phase lengths drawn by extra_steps, their data).

How it is fast (see utils/compartmental.py's docstring for the model):
* input layer: its spikes depend on nothing the network does, so all of a segment's input spikes are drawn at once and
  projected by one `embedding_bag` over the active inputs only (about 20 of 784 per step on MNIST); for dense
  images (CIFAR-10, INPUT_DENSE) every pixel's counts are drawn as one block, without gathering keys per pixel.
* layer by layer, whenever the apical compartment does not drive the soma: a layer then depends only on the layer
  below up to the same step, and its soma is a linear filter of U = W S (the projected signal of the layer below):
  U of all a segment's steps is one product, the PSP the kernel's band (mem terms, Eq. 2) for all steps at once,
  then the soma's recurrence (the reference's soma_coefficients) one element-wise step at a time, and the layer's
  spikes of the whole segment are drawn at once. With apical conductance the layers are stepped together, one time step at a time.
* every sum over time (window means, PSP means) is taken step after step in time order and every product has the
  same shapes whatever the population, so a member's numbers do not depend on its population or on the segments.
* window means of linear quantities (PSPs, A = Y PSP_fb + c) are taken once per segment from the stored signals.
* members of different phase lengths run max_p T_p steps; each member's window means use only its own window, and its
  state for the next phase is gathered at its own last step (the extra steps are discarded).
* on the CPU, C kernels (utils/compartmental_native.py) do a spiking layer's segment (band, soma, rate, counts) and
  the input layer's (counts, W S, the input PSP's mean, the history) in one pass each, into reused buffers; the
  torch ops below are the same steps where no C compiler works (and the GPU's path).
* random numbers: counter-based (utils/compartmental_random.py): each spike's uniform is a pure function of the
  member's phase key, the example's position, the time step, the layer and the neuron, computed inside the sampling
  kernel, so a member's spikes do not depend on the population, the batch or the device.
"""
import dataclasses

import numpy as np
import torch

from utils import compartmental_native as native
from utils import compartmental_random as rnd
from utils import compartmental_reference as R

SEGMENT = 64          # time steps simulated (and whose input spikes are projected) in one go
INPUT_DENSE = 0.5     # inputs with at least this fraction of nonzero pixels: spikes drawn for every pixel (None: never)


def segments(T):
    """The segments (starts, lengths) of a phase whose members run T[p] steps: SEGMENT steps each, the last one from
    below the shortest member's end to the longest's, so that every member's last steps lie in it."""
    T_min, T_max = int(np.min(T)), int(np.max(T))
    starts = list(range(0, T_min, SEGMENT))
    return starts, [SEGMENT] * (len(starts) - 1) + [T_max - starts[-1]]


@dataclasses.dataclass
class Segment:
    """What the layers of one segment of a phase read, and the phase's window sums they add into."""
    s: int                  # its first step in the phase
    Ts: int                 # its steps
    U0: torch.Tensor        # the input layer's projected signal W S, (P, mem + Ts, B, n_1) (rows [0, mem): history)
    base: object            # (P, Ts, B) int64 keys of its steps' random numbers, or None (no spikes)
    I0: object              # the teaching input g_E E_E + g_I E_I (P, B, n_out), or None (forward phase)
    win: torch.Tensor       # (P, Ts) each step's weight in the members' averaging windows (1 / window or 0)
    means: dict             # the phase's window sums: C per layer, lam (output, target phase); added into
    Wt: list                # feedforward weights transposed per layer, (P, n_in, n_out)
    Yt: list                # feedback weights transposed per hidden layer
    target: bool            # the target phase (the output layer is taught)
    record: bool            # training (every window mean); False: testing (the output's C only)


# ----------------------------------------------------------------------------------------------------------------
# the population


def fresh_state(cfg, B, device, dtype):
    """A network's state at rest for B examples (cfg: the reference's Config): zero potentials C per layer, zero
    signal histories (the last mem steps of what each layer sends: spikes and / or rates) and no input events."""
    M, n = cfg.M, cfg.sizes
    kinds = [set() for _ in range(M)]                       # what each layer sends: spikes and / or rates
    for m in range(M - 1):
        kinds[m].add("spike" if cfg.use_spiking_feedforward else "rate")
        kinds[M - 1 if cfg.use_broadcast else m + 1].add("spike" if cfg.use_spiking_feedback else "rate")
    to = dict(device=device, dtype=dtype)
    e = torch.zeros(0, dtype=torch.long, device=device)
    return dict(C=[torch.zeros(B, n[m + 1], **to) for m in range(M)],
                sig=[{k: torch.zeros(cfg.mem, B, n[m + 1], **to) for k in sorted(kinds[m])} for m in range(M)],
                hist=(e, e, e, torch.zeros(0, **to)))   # input events (row, example, input, value)


class Population:
    """P networks of one structure, their weights stacked along a leading member dimension, simulated together.

    cfgs: one reference Config per member (the numbers, rates, flags: the structure and flags shared); weights: per
    member dict(W=[...], b=[...], Y=[...], c=[...], mask=[...] or None) of tensors; states: per member a state (see
    fresh_state) of batch B; generators: per member the torch.Generator of the noisy symmetric feedback's noise (or
    None). The stacks self.W, self.b, self.Y, self.c are updated in place; member(q) gives views of member q's,
    state_of(q) its state; keep(indices) goes on with some members only."""

    def __init__(self, cfgs, weights, states, B, device, dtype, generators=None):
        self.cfgs, c0 = list(cfgs), cfgs[0]
        self.M, self.n, self.mem, self.B = c0.M, tuple(c0.sizes), c0.mem, int(B)
        self.dev, self.dty = torch.device(device), dtype
        self.flags = {name: bool(getattr(c0, name)) for name in R.FLAGS}
        self.ffk = "spike" if self.flags["use_spiking_feedforward"] else "rate"
        self.fbk = "spike" if self.flags["use_spiking_feedback"] else "rate"
        self._stack(weights, states, generators or [None] * len(self.cfgs))

    # -- members' numbers and weights as stacked tensors -------------------------------------------------------

    def _col(self, values):
        """Per-member numbers as a (P, 1, 1) tensor (broadcasts over examples and neurons)."""
        return torch.tensor(values, device=self.dev, dtype=self.dty).view(-1, 1, 1)

    def _stack(self, weights, states, generators):
        cs, M = self.cfgs, self.M
        self.P, self.gens = len(cs), list(generators)
        self.lmax = self._col([c.lambda_max for c in cs])
        self.lmax_shared = float(cs[0].lambda_max) if len({c.lambda_max for c in cs}) == 1 else None
        att = [R.attenuations(c) for c in cs]                # steady-state attenuations k_B, k_D
        self.k_B, self.k_D = self._col([a[0] for a in att]), self._col([a[1] for a in att])
        self.E_E, self.E_I = self._col([c.E_E for c in cs]), self._col([c.E_I for c in cs])
        self.f_etas = self._col([c.f_etas for c in cs]).view(self.P, -1)
        self.b_etas = self._col([c.b_etas for c in cs]).view(self.P, -1) if M > 1 else None
        to = dict(device=self.dev, dtype=self.dty)
        stack = lambda key, k: torch.stack([w[key][k].to(**to) for w in weights])   # noqa: E731
        self.W, self.b = [stack("W", k) for k in range(M)], [stack("b", k) for k in range(M)]
        self.Y, self.c = [stack("Y", k) for k in range(M - 1)], [stack("c", k) for k in range(M - 1)]
        self.Y_mask = None if weights[0].get("mask") is None else [stack("mask", k) for k in range(M - 1)]
        self.C = [torch.stack([s["C"][k] for s in states]) for k in range(M)]
        self.sig = [{kind: torch.stack([s["sig"][k][kind] for s in states]) for kind in states[0]["sig"][k]}
                    for k in range(M)]
        hist = [s["hist"] for s in states]  # input history events (row, example, input, value) of each member
        p = torch.cat([torch.full_like(h[0], q) for q, h in enumerate(hist)])
        self.hist = (torch.cat([h[0] for h in hist]), p * self.B + torch.cat([h[1] for h in hist]),
                     torch.cat([h[2] for h in hist]), torch.cat([h[3] for h in hist]))
        self.kappa = {path: np.stack([R.kappa(c, path) for c in cs]) for path in ("ff", "fb")}   # (P, mem), Eq. 2
        self.cache, self.version, self.buf, self._inp, self.scratch = {}, 0, None, None, {}

    def member(self, q):
        """Member q's weights as views of the stacks: dict(W, b, Y, c) of lists (they follow the updates)."""
        return dict(W=[w[q] for w in self.W], b=[v[q] for v in self.b], Y=[y[q] for y in self.Y],
                    c=[v[q] for v in self.c])

    def weights_of(self, q):
        """Member q's own copies of its weights (and masks), as the constructor takes them."""
        out = {k: [v.clone() for v in vs] for k, vs in self.member(q).items()}
        out["mask"] = None if self.Y_mask is None else [mk[q].clone() for mk in self.Y_mask]
        return out

    def state_of(self, q):
        """Member q's state (potentials, signal histories, input history events), as fresh_state makes it."""
        et, ex, ei, ev = self.hist
        keep = (ex // self.B) == q
        return dict(C=[c[q].clone() for c in self.C], sig=[{k: v[q].clone() for k, v in layer.items()}
                                                             for layer in self.sig],
                    hist=(et[keep], ex[keep] % self.B, ei[keep], ev[keep]))

    def keep(self, indices):
        """Go on with the members `indices` only (in that order)."""
        weights, states = [self.weights_of(q) for q in indices], [self.state_of(q) for q in indices]
        self.cfgs = [self.cfgs[q] for q in indices]
        if self.cfgs:
            self._stack(weights, states, [self.gens[q] for q in indices])

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

    def _row_weights(self, rows, t_abs, lo, hi, window, path):
        """(P, rows): the weight of each buffer row (step tau = row - mem + t_abs) in a member's mean PSP over the
        times [lo_p, hi_p]: (1/window) sum_{t' in [lo_p, hi_p], 0 <= t' - tau < mem} kappa_p[t' - tau]. Rows of
        earlier segments weigh 0 (they were counted there). Cached (they recur from batch to batch)."""
        key = ("rows", rows, t_abs, tuple(np.asarray(lo).tolist()), tuple(np.asarray(hi).tolist()), window, path)
        if key not in self.cache:
            if len(self.cache) > 512:                         # (a bound: phase lengths vary with extra_steps)
                self.cache = {k: v for k, v in self.cache.items() if k[0] != "rows"}
            self.cache[key] = self._row_weights_new(rows, t_abs, lo, hi, window, path)
        return self.cache[key]

    def _row_weights_new(self, rows, t_abs, lo, hi, window, path):
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

    def phase(self, x, T, target, window, keys, record=True):
        """Simulate the members' phases of T[p] steps (numpy ints) from the state, inputs x (P, B, n_in) in [0, 1];
        target (P, B, n_out) one-hot or None (forward phase); window: steps averaged at the end of each member's phase;
        keys: (P, B) int64 example keys of the phase (compartmental_random.example_keys), or None (no spikes);
        record=False (testing): only the output's window mean of C is kept (no PSP, A or hidden means), and where
        the apical compartment does not drive the soma the output layer sends nothing (its signal histories in the
        state after such a phase are not meaningful: a test starts from rest and its state is discarded).
        Returns the window means C, A (hidden), lam (output, target phase), psp_fb and psp_in per layer."""
        M, mem, n, P, B = self.M, self.mem, self.n, self.P, self.B
        dev, dty = self.dev, self.dty
        T = np.asarray(T)
        starts, lens = segments(T)
        A_step = self.flags["use_conductances"] and self.flags["use_apical_conductance"] and \
            any(c.g_A != 0 for c in self.cfgs)
        z = lambda *s: torch.zeros(*s, device=dev, dtype=dty)  # noqa: E731
        inp = self._inp[2] if self._inp is not None and self._inp[0] is x and self._inp[1] == x._version else \
            self._input_events(x)
        self._inp = (x, x._version, inp)                      # (the target phase's input is the forward phase's)
        I0 = None if target is None else target * self.E_E + (1.0 - target) * self.E_I   # g_E E_E + g_I E_I
        w0 = T - window                                       # first step of each member's averaging window
        means = dict(C=[z(P, B, n[m + 1]) for m in range(M)], lam=z(P, B, n[-1]),
                     psp_fb=[z(P, B, n[self.fb_source(m) + 1]) for m in range(M - 1)],
                     psp_in=[z(P * B * n[0])] + [z(P, B, n[m]) for m in range(1, M)])
        buf = self._buffers(mem + max(lens))
        for layer, hist in zip(buf, self.sig):                # rows [0, mem): the last mem steps
            for k, v in layer.items():
                v[:, :mem] = hist[k]
        Wt = [w.transpose(1, 2) for w in self.W]
        Yt = [y.transpose(1, 2) for y in self.Y]
        for s, Ts in zip(starts, lens):
            t_abs = np.arange(s, s + Ts)
            win = ((t_abs[None, :] >= w0[:, None]) & (t_abs[None, :] < T[:, None])) / window      # (P, Ts)
            win_w = self._tensor(win)
            base = None if keys is None else rnd.step_keys(keys, s, Ts)   # (P, Ts, B) keys of the segment's steps
            w_in = self._row_weights(mem + Ts, s, w0, T - 1, window, "ff") if record else None
            last = s == starts[-1]                            # (the history: buffer rows from Ts, or each member's)
            U0 = self._input_segment(inp, s, Ts, base, w_in, means["psp_in"][0], int(T.min()) - s if last else Ts,
                                     last)
            seg = Segment(s, Ts, U0, base, I0, win_w, means, Wt, Yt, target is not None, record)
            C_last = self._segment_steps(seg) if A_step else self._segment_layers(seg)
            if record:                                        # window means of the PSPs from this segment's rows
                self._psp_means(buf, Ts, s, w0, T, window, w_in, means)
            if s != starts[-1]:
                for layer in buf:
                    for v in layer.values():
                        v[:, :mem] = v[:, Ts:Ts + mem].clone()
        self._keep_state(C_last, buf, T, starts[-1])
        means["A"] = [torch.bmm(means["psp_fb"][m], Yt[m]) for m in range(M - 1)]   # A is linear in the PSP
        if self.flags["use_feedback_bias"]:
            means["A"] = [a + c.unsqueeze(1) for a, c in zip(means["A"], self.c)]
        means["psp_in"][0] = means["psp_in"][0].view(P, B, n[0])
        return means

    def _input_events(self, x):
        """The active inputs of x (P, B, n_in): (member-major index (p, b, i), rates lambda_max x pixel, example
        index p B + b, the inputs' random-number counters); or ("dense", rates (P, B, n_in), the counters) for spikes
        where at least INPUT_DENSE of the pixels are nonzero (CIFAR-10: nearly all), sampled densely."""
        if self.flags["use_spiking_feedforward"] and self.dev.type == "cpu":
            events = native.input_events(x, self.lmax)       # the C kernel's: dense or sparse alike
            if events is not None:
                return "native", events
        if INPUT_DENSE is not None and self.flags["use_spiking_feedforward"] and x.numel() and \
                float((x != 0).sum()) >= INPUT_DENSE * x.numel():
            return "dense", x * self.lmax, rnd.neuron_offsets(0, x.shape[-1]).to(x.device).view(1, 1, 1, -1)
        x_idx = x.nonzero(as_tuple=True)
        rates = x[x_idx] * self.lmax.view(-1)[x_idx[0]]
        return x_idx, rates, x_idx[0] * self.B + x_idx[1], rnd.neuron_offsets(0, x_idx[2])

    def _input_segment(self, inp, s, Ts, base, w_in, in_mean, keep_from, last):
        """The input layer over a segment: its events (the history rows [0, mem), then Ts new rows of Poisson counts
        or rates) projected as U(t) = W S(t) for every row by one embedding_bag over the active inputs; adds the
        window mean of the input PSP (weights w_in per row) into in_mean; keeps the events of the rows from
        keep_from on as the history (renumbered from Ts on where another segment follows; after the last one
        _keep_state picks each member's rows). Dense input (inp[0] == "dense") draws the counts of every input
        (a pixel of 0 has rate 0 and never spikes) from the same keyed uniforms, without gathering keys per event;
        the events come in the same order, so the sums are the same."""
        P, B, mem, n, dev = self.P, self.B, self.mem, self.n, self.dev
        if inp[0] == "native":                                # the C kernel: the same steps in one pass
            U0, self.hist = native.input_segment(
                inp[1], base, self._W0t(), self.hist, (P, mem, Ts, B, n[0], n[1]),
                None if w_in is None else (w_in, in_mean), (keep_from, 0 if last else Ts), store=self.scratch)
            return U0
        rows = mem + Ts
        ht, hx, hi, hv = self.hist
        if inp[0] == "dense":                                 # spikes of every input: Poisson counts, (P, Ts, B, n_in)
            _, S = rnd.spike_counts(inp[1].unsqueeze(1), base.unsqueeze(-1), inp[2], 1.0, False)
            f = S.view(-1).nonzero().view(-1)                 # events in (member, step, example, input) order
            nv = S.view(-1)[f]
            new_i, r = f % n[0], f // n[0]
            new_x, r = r % B, r // B
            t_new, new_x = r % Ts, (r // Ts) * B + new_x
        else:
            x_idx, rates, ex, in_offs = inp
            if self.flags["use_spiking_feedforward"]:         # spikes: Poisson counts of the input rates
                base_in = base.transpose(0, 1).reshape(Ts, P * B)[:, ex]  # (Ts, nnz): each input's example's keys
                _, counts = rnd.spike_counts(rates.view(1, -1), base_in, in_offs, 1.0, False)
                t_new, j = counts.nonzero(as_tuple=True)
                nv = counts[t_new, j]
            else:                                             # rates: every active input at every step
                t_new = torch.arange(Ts, device=dev).repeat_interleave(rates.numel())
                j = torch.arange(rates.numel(), device=dev).repeat(Ts)
                nv = rates[j]
            new_x, new_i = ex[j], x_idx[2][j]
        et, ee = torch.cat([ht, t_new + mem]), torch.cat([hx, new_x])
        ei, ev = torch.cat([hi, new_i]), torch.cat([hv, nv])
        p_ev = ee // B
        bag = (p_ev * rows + et) * B + ee % B                 # (member, row, example): one member's W at a time
        idx = p_ev * n[0] + ei
        if bag.numel() > 1 and not bool((bag[1:] >= bag[:-1]).all()):   # (already in order: a stable sort's)
            order = torch.argsort(bag, stable=True)
            idx, weights = idx[order], ev[order]
        else:
            weights = ev
        counts_bag = torch.bincount(bag, minlength=P * rows * B)
        U0 = torch.nn.functional.embedding_bag(idx, self._W0t(), counts_bag.cumsum(0) - counts_bag, mode="sum",
                                               per_sample_weights=weights)
        if w_in is not None:                                  # mean input PSP over the window (Eq. 12)
            in_mean.index_add_(0, ee * n[0] + ei, ev * w_in[p_ev, et])
        keep = et >= keep_from                                # the rows that can become the history
        self.hist = (et[keep] - (0 if last else Ts), ee[keep], ei[keep], ev[keep])
        return U0.view(P, rows, B, n[1])

    def _psp_means(self, buf, Ts, s, w0, T, window, w_in, means):
        """Add this segment's rows into the window means of the feedback PSPs (as of the step before) and of the
        hidden and output layers' input PSPs: sum over rows of weight x signal, row after row."""
        rows, M = self.mem + Ts, self.M
        w_fb = self._row_weights(rows, s, w0 - 1, T - 2, window, "fb") if M > 1 else None
        for m in range(M - 1):
            self._row_sum(means["psp_fb"][m], buf[self.fb_source(m)][self.fbk], w_fb)
        for m in range(1, M):
            self._row_sum(means["psp_in"][m], buf[m - 1][self.ffk], w_in)

    def _row_sum(self, acc, src, w):
        """acc (P, ...) += sum_r w[:, r] src[:, r] over the rows r of nonzero weight, in row order (so a member's sums
        do not depend on the population or the segments): the PSPs' window means from the buffers' rows, and those
        of C and lambda over a segment's steps (w = Segment.win)."""
        if native.row_sums(acc, src, w):
            return
        nz = (w != 0).any(0).nonzero().view(-1).tolist()
        for r in nz:
            acc.addcmul_(src[:, r], w[:, r].view(-1, 1, 1))

    def _keep_state(self, C_last, buf, T, s):
        """Each member's state as of its own last step T_p - 1 of the last segment (starting at s; its extra steps
        are discarded): C, the signals' last mem rows and the input history's events."""
        P, B, mem, dev = self.P, self.B, self.mem, self.dev
        if (T == T[0]).all():                                 # one length: slices (the same numbers, no gathers)
            e = int(T[0]) - s
            self.C = [c[:, e - 1].clone() for c in C_last]
            self.sig = [{k: v[:, e:e + mem].clone() for k, v in layer.items()} for layer in buf]
        else:
            q = torch.arange(P, device=dev)
            last = torch.as_tensor(T - 1 - s, device=dev)
            self.C = [c[q, last] for c in C_last]
            hist_rows = torch.as_tensor(T - s, device=dev)[:, None] + torch.arange(mem, device=dev)   # (P, mem)
            self.sig = [{k: v[q[:, None], hist_rows] for k, v in layer.items()} for layer in buf]
        et, ee, ei, ev = self.hist                            # buffer rows r of the last segment: step s - mem + r
        et = et - torch.as_tensor(T - s, device=dev)[ee // B]  # row of the member's history [T_p - mem, T_p)
        keep = (et >= 0) & (et < mem)
        self.hist = (et[keep], ee[keep], ei[keep], ev[keep])

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

    def _emit(self, m, C, base, buf, rows_slice):
        """lambda_C = lambda_max sigmoid(C) (Eq. 4) and what layer m sends (spikes and / or rates) into its buffer;
        C (P, ..., n) with base (P, ...) the step keys of its rows (spike counts from the keyed uniforms)."""
        layer, lmax = buf[m], self.lmax.view(-1, *[1] * (C.dim() - 1))
        if "spike" in layer:
            n = C.shape[-1]
            rows = C.reshape(-1, n)
            lm = self._lmax_rows(C.shape[:-1])
            lam, counts = rnd.spike_counts(rows, base.reshape(-1, 1), rnd.neuron_offsets(m + 1, n).to(C.device),
                                           lm, True)
            layer["spike"][rows_slice] = counts.view(C.shape)
            lam = lam.view(C.shape)
        else:
            lam = torch.sigmoid(C) * lmax
        if "rate" in layer:
            layer["rate"][rows_slice] = lam.expand_as(C)
        return lam

    def _lmax_rows(self, shape):
        """lambda_max per row of a (P, ...) row layout: a number where the members share it, else (rows, 1)."""
        if self.lmax_shared is not None:
            return self.lmax_shared
        return self.lmax.view(-1, *[1] * (len(shape) - 1)).expand(shape).reshape(-1, 1)

    def _segment_layers(self, seg):
        """Ts steps of every layer, one whole layer after the other (valid when A does not drive the soma): the
        projected input U = W S of every row, then the PSP and soma recurrences step by step (_filter, Eqs. 1, 2, 5,
        6, 7), then the layer's spikes for the whole segment. Returns each layer's C of the segment."""
        M, mem, P, B, buf = self.M, self.mem, self.P, self.B, self.buf
        rows, Csum = mem + seg.Ts, seg.means["C"]
        C_seg = []
        for m in range(M):
            out = m == M - 1
            if m == 0:
                U = seg.U0
            else:                                             # U = W S of the layer below, every row
                below = buf[m - 1][self.ffk][:, :rows]
                U = torch.bmm(below.reshape(P, rows * B, -1), seg.Wt[m]).view(P, rows, B, -1)
            fast = self._native_layer(m, U, seg)
            if fast is not None:                              # the C kernel did filter and emit (spikes, rates)
                C, lam = fast
                if seg.record or out:
                    self._row_sum(Csum[m], C, seg.win)
                if out and seg.target:
                    self._row_sum(seg.means["lam"], lam, seg.win)
                C_seg.append(C)
                continue
            C = self._filter(m, U, seg.Ts, seg.I0 if out and seg.target else None)
            if out and not seg.record and not seg.target:    # testing: nothing reads the output's spikes
                self._row_sum(Csum[m], C, seg.win)
                C_seg.append(C)
                continue
            lam = self._emit(m, C, seg.base, buf, (slice(None), slice(mem, rows)))
            if seg.record or out:
                self._row_sum(Csum[m], C, seg.win)
            if out and seg.target:
                self._row_sum(seg.means["lam"], lam.expand_as(C), seg.win)
            C_seg.append(C)
        return C_seg

    def _native_layer(self, m, U, seg):
        """Layer m's segment by the C kernel (compartmental_native.layer_segment: _filter and _emit in one pass),
        spiking layers on the CPU only; (C, lambda or None) of the segment, or None (then the torch ops)."""
        layer, out, P, mem = self.buf[m], m == self.M - 1, self.P, self.mem
        if seg.base is None or "spike" not in layer or self.dev.type != "cpu" or native.library() is None:
            return None
        testing = out and not seg.record and not seg.target   # nothing reads the output's spikes
        dec, k_B, _, k_I = self._soma(m, out and seg.target)
        drive_I = (k_I * seg.I0).contiguous() if out and seg.target else None
        lam = None
        if "rate" in layer and not testing:
            lam = (layer["rate"], mem)
        elif out and seg.target:
            lam = (native.scratch(self.scratch, ("lam", m), (P, seg.Ts, self.B, self.n[m + 1]), self.dty), 0)
        C = self.C[m].contiguous().clone()
        soma = (self._kernel("ff").view(P, mem), self.b[m].reshape(P, -1), k_B.view(P),
                dec.view(P) if self.flags["use_conductances"] else None, self.lmax.view(P))
        C_seg = native.layer_segment(
            U, soma, C, (seg.base, rnd.neuron_offsets(m + 1, self.n[m + 1]).view(-1)),
            None if testing else (layer["spike"], mem), lam, drive_I,
            out=native.scratch(self.scratch, ("C", m), (P, seg.Ts, self.B, self.n[m + 1]), self.dty))
        if C_seg is None:
            return None
        self.C[m] = C
        if lam is None:
            return C_seg, None
        return C_seg, lam[0][:, lam[1]:lam[1] + seg.Ts]

    def _kernel(self, path):
        """The members' truncated kernels kappa[k] (Eq. 2) of a path as (P, mem, 1, 1, 1) tensors, cached."""
        key = ("kappa", path)
        if key not in self.cache:
            self.cache[key] = self._tensor(self.kappa[path]).view(self.P, self.mem, 1, 1, 1)
        return self.cache[key]

    def _psp_band(self, U, Ts):
        """A layer's input PSP over a segment from its projected input U (P, mem + Ts, B, n; rows [0, mem) the last
        mem steps): PSP(t) = sum_k kappa[k] U(t - k) (Eq. 2), the kernel's band only (mem terms), for all Ts steps at
        once, term after term in a fixed order."""
        mem, kap = self.mem, self._kernel("ff")
        psp = U[:, mem:mem + Ts] * kap[:, 0]
        for k in range(1, mem):
            psp.addcmul_(U[:, mem - k:mem - k + Ts], kap[:, k])
        return psp

    def _filter(self, m, U, Ts, I0):
        """Layer m's C over a segment: C(t) = dec C(t-1) + k_B (PSP(t) + b) + k_I I0 (Eqs. 5-7, the reference's
        soma_coefficients; I0 the teaching input: output layer, target phase), PSP from _psp_band; the soma's
        recurrence one element-wise step at a time (none for instantaneous somas, dec = 0)."""
        dec, k_B, _, k_I = self._soma(m, I0 is not None)
        drive = (self._psp_band(U, Ts) + self.b[m].view(self.P, 1, 1, -1)) * k_B.unsqueeze(1)
        if I0 is not None:                                    # teaching current g_E E_E + g_I E_I (Eq. 7)
            drive += (k_I * I0).unsqueeze(1)
        if not self.flags["use_conductances"]:
            self.C[m] = drive[:, Ts - 1]
            return drive
        C = self.C[m]
        for t in range(Ts):
            C = drive[:, t].addcmul_(C, dec)
        self.C[m] = C
        return drive

    def _soma(self, m, target):
        """Per-member (dec, k_B, k_A, k_I) of layer m's soma (the reference's soma_coefficients) as (P, 1, 1)
        tensors, cached."""
        key = ("soma", m, target)
        if key not in self.cache:
            out = m == self.M - 1
            vals = [R.soma_coefficients(c, out, 1.0 if out and target else 0.0) for c in self.cfgs]
            self.cache[key] = tuple(self._col([v[k] for v in vals]) for k in range(4))
        return self.cache[key]

    def _segment_steps(self, seg):
        """Ts steps of all layers together, one time step after the other (apical conductance drives the soma):
        B = W PSP + b (Eq. 5), A = Y PSP_fb (+ c) as of the step before, C = dec C + k_B B + k_A A (Eq. 6, the
        reference's soma_coefficients); output as in _segment_layers. The input layer's PSP by _psp_band, the others
        as explicit kernel sums over the buffers' last mem rows."""
        M, mem, P, B, buf, Ts = self.M, self.mem, self.P, self.B, self.buf, seg.Ts
        Wt, Yt, base, I0 = seg.Wt, seg.Yt, seg.base, seg.I0
        kap = {k: self._tensor(v[:, ::-1].copy()).unsqueeze(1) for k, v in self.kappa.items()}   # oldest row first
        basal0 = self._psp_band(seg.U0, Ts) + self.b[0].view(P, 1, 1, -1)
        C_seg = [torch.empty(P, Ts, B, self.n[m + 1], device=self.dev, dtype=self.dty) for m in range(M)]
        consts = [self._soma(m, seg.target) for m in range(M)]

        def psp(layer, kind, r, path):                      # PSP of the rows (r - mem, r] (Eq. 2)
            src = buf[layer][kind][:, r - mem + 1:r + 1]
            return torch.bmm(kap[path], src.reshape(P, mem, -1)).view(P, B, -1)
        for t in range(Ts):
            r = mem + t
            for m in range(M):
                out = m == M - 1
                dec, gB, gA, c_I = consts[m]
                basal = basal0[:, t] if m == 0 else \
                    torch.baddbmm(self.b[m].unsqueeze(1), psp(m - 1, self.ffk, r, "ff"), Wt[m])
                C = self.C[m] * dec + basal * gB
                if not out:
                    A = torch.bmm(psp(self.fb_source(m), self.fbk, r - 1, "fb"), Yt[m])
                    if self.flags["use_feedback_bias"]:
                        A = A + self.c[m].unsqueeze(1)
                    C = C + A * gA
                elif seg.target:
                    C = C + I0 * c_I
                self.C[m] = C
                C_seg[m][:, t] = C
                self._emit(m, C, None if base is None else base[:, t], buf, (slice(None), r))
        for m in range(M):
            if seg.record or m == M - 1:
                self._row_sum(seg.means["C"][m], C_seg[m], seg.win)
        if seg.target:
            self._row_sum(seg.means["lam"], torch.sigmoid(C_seg[-1]) * self.lmax.unsqueeze(-1), seg.win)
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
        ones = torch.ones(P, 1, self.B, device=self.dev, dtype=self.dty)   # (a product: the same sum whatever P)
        if self.flags["update_feedback_weights"]:
            b_etas = self.b_etas
            for m in range(M - 1):
                E_inv = R.feedback_error(Cf[m], alpha_f[m], f["A"][m], lmax) * w
                step = lr * b_etas[:, m].view(-1, 1, 1)
                self.Y[m] -= step * torch.bmm(E_inv.transpose(1, 2), f["psp_fb"][m])
                if self.flags["use_feedback_bias"]:
                    self.c[m] -= step.view(-1, 1) * torch.bmm(ones, E_inv).squeeze(1)   # batch sum, as a product
                if self.Y_mask is not None:
                    self.Y[m] *= self.Y_mask[m]
        f_etas = self.f_etas
        P_out, P_hid = R.step_sizes(lmax)
        for m in range(M):                                    # W -= eta P E^T PSP_in, b -= eta P E (batch means)
            step = lr * f_etas[:, m].view(-1, 1, 1) * (P_out if m == M - 1 else P_hid)
            self.W[m] -= step * (dW[m] if dW is not None else torch.bmm((E[m] * w).transpose(1, 2), f["psp_in"][m]))
            self.b[m] -= step.view(-1, 1) * torch.bmm(w.transpose(1, 2), E[m]).squeeze(1)
        self.version += 1
        if self.flags["use_symmetric_weights"]:
            for q, cfg in enumerate(self.cfgs):
                Y = R.symmetric_feedback([wt[q] for wt in self.W], cfg, self.gens[q])
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
