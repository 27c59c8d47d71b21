"""Many compartmental networks of one structure trained side by side, each exactly as it would train alone.

    from utils.compartmental_population import fit_population   # also importable from utils.compartmental
    fit_population([clf_a, clf_b, clf_c], [(Xa, ya), (Xb, yb), (Xc, yc)])   # three networks in one simulation

The estimator (utils/compartmental.py) trains through this module too, as a population of one: `_train` runs the
members' schedules in lockstep (each its own epochs of random permutations cut into batches, its own hook calls),
`_step` one batch (a forward and a target phase of utils.compartmental_engine.Population, then the local updates),
`phase_keys` the counter-based random numbers' keys of a phase (utils/compartmental_random.py). `member_bytes` estimates a
member's memory before the run, so that a population larger than memory trains in chunks instead of failing.
"""
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from utils import compartmental_random as rnd
from utils import compartmental_reference as R
from utils.compartmental_engine import SEGMENT, Population, fresh_state, segments
from utils import memory
from utils.errors import TrainingDiverged

POPULATION_SHARED = ("n_hidden", "batch_size", "dt", "mem", "l_f_phase", "l_t_phase", "l_f_phase_test",
                     "integration_time", "init", "rate_psp", "device", "dtype") + R.FLAGS   # what a population shares


WEIGHT_BOUND = 1e3    # |W|, |b| beyond this: diverged (the paper's initial weights are below 0.2, trained ones below 10)
SATURATED = 20.0      # |mean C| beyond this pins lambda at 0 or lambda_max (sigmoid within 2e-9 of 0 or 1)


def _as_numpy(y):
    return y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


def as_labels(y):
    """y as a 1-d NumPy array of labels, one per example (a column (N, 1) is read as N labels)."""
    y = _as_numpy(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y has shape {y.shape}; give one class label per example, shape (N,) (or a column (N, 1))")
    return y


def as_pixels(X):
    """X as an (N, features) tensor of pixel intensities in [0, 1]: the workspace's one input rule (uint8 and other
    non-float input through utils.classifiers.as_inputs, the MLP's and CNN's: uint8 pixels / 255); floats keep their
    precision. ValueError naming the problem for a wrong shape, NaN or inf, or values outside [0, 1]. N may be 0."""
    if not isinstance(X, torch.Tensor):
        X = np.asarray(X)
        X = torch.from_numpy(np.ascontiguousarray(X)) if X.dtype.kind in "biuf" else X
    if isinstance(X, torch.Tensor) and X.dim() >= 2 and len(X) == 0:
        return X.reshape(0, int(np.prod(X.shape[1:]))).double()
    if not isinstance(X, torch.Tensor) or not X.is_floating_point():
        from utils.classifiers import as_inputs             # (a lazy import: utils.classifiers imports this package)
        X = as_inputs(X)
    if X.dim() < 2:
        raise ValueError(f"X must have one row per example (N x features or N x C x H x W); got shape "
                         f"{tuple(X.shape)}")
    X = X.reshape(X.shape[0], -1)
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or infinite values; the network needs pixel intensities in [0, 1]")
    lo, hi = float(X.min()), float(X.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"X holds values in [{lo:g}, {hi:g}], outside [0, 1]: the compartmental network reads pixels "
                         f"as firing rates (lambda_max x pixel); scale the images to [0, 1] (uint8 pixels are "
                         f"divided by 255 for you)")
    return X


def _n_features(X):
    return int(np.prod(torch.as_tensor(X).shape[1:]))


# ----------------------------------------------------------------------------------------------------------------
# populations: many networks of one structure trained side by side


def fit_population(estimators, datasets, on_error="raise"):
    """Fit P CompartmentalClassifiers on P training sets [(X_p, y_p)] in one batched simulation; returns the fitted
    estimators, each equal to what estimators[p].fit(X_p, y_p) alone gives (to the last bit on the CPU; in
    distribution on a GPU). They must share the structure (POPULATION_SHARED) and may differ in every number (rates,
    lambda_max, conductances, tau_s, tau_L, seed, max_epochs, lr decay) and in their data (lengths too).
    on_error="raise": a member that diverges raises TrainingDiverged; "skip": it is dropped, its error kept in
    estimator.fit_error_, and the others go on. Every member gets the classes of all the training sets (one output
    neuron each, also for a class its own data lack). A member that cannot fit in memory raises InsufficientMemory
    before anything trains."""
    estimators, datasets = list(estimators), list(datasets)
    _check_population(estimators, datasets)
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error={on_error!r} is invalid: use "raise" or "skip"')
    classes = np.unique(np.concatenate([as_labels(y) for _, y in datasets]))
    for est, (X, y) in zip(estimators, datasets):
        est._start(X, classes)
        est.fit_error_ = None
    per_member = member_bytes(estimators[0], max(min(estimators[0].batch_size, len(X)) for X, _ in datasets))
    size = max(1, int(0.8 * _free_bytes(estimators[0].device_) // per_member))   # members that fit at once
    for i in range(0, len(estimators), size):   # independent members: training them in chunks changes nothing
        _train(estimators[i:i + size], datasets[i:i + size], [est.max_epochs for est in estimators[i:i + size]],
               on_error)
    return estimators


def member_bytes(est, B, n=None):
    """An estimate (from above) of the memory one member of a population takes while training at state batch B,
    made before the run: random numbers and signal buffers for a phase, segment potentials, weights and their
    updates, input events. n: the layer sizes (default: the member's)."""
    n, T = n or est.n_, est.l_f_phase + est.l_t_phase + 40      # + Wald extra steps, generously
    neurons = sum(n[1:])
    weights = sum(a * b for a, b in zip(n[:-1], n[1:])) + neurons * n[-1]
    values = (T * B * neurons                                       # uniforms of a phase
              + 2 * (est.mem + 2 * SEGMENT) * B * neurons           # signal buffers (spikes and rates)
              + 4 * SEGMENT * B * neurons                           # potentials, rates, counts of a segment
              + 5 * weights                                         # W, Y, their updates, W^T for the input
              + 2 * SEGMENT * B * n[0])                             # input events (index, value) and uniforms
    return int(1.5 * values * (8 if est.dtype == "float64" else 4)) + 8 * SEGMENT * B * n[0] * 4


def _largest(fits, hi):
    """The largest k in [1, hi] with fits(k) (fits is monotone), or 0 when not even 1 fits."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_member_fits(est, B):
    """Raise utils.errors.InsufficientMemory (utils.memory.check_fits) when one member at state batch B does not fit,
    naming the largest batch size, or else the largest hidden size, that does."""
    room = memory.HEADROOM * memory.available_bytes(est.device_)
    need = member_bytes(est, B)
    if need <= room:
        return
    hidden = est.n_[1:-1]
    b_max = _largest(lambda b: member_bytes(est, b) <= room, B)
    if b_max:
        largest = f"batch_size={b_max} (--batch-size {b_max})"
    else:
        h = _largest(lambda k: member_bytes(est, 1, (est.n_[0],) + (k,) * len(hidden) + (est.n_[-1],)) <= room,
                     max(hidden))
        largest = f"n_hidden={(h,) * len(hidden)} at batch_size=1" if h else None
    memory.check_fits(need, f"a compartmental network {est.n_} at batch {B}", largest=largest, device=est.device_)


def _free_bytes(device):
    """Memory free for a population (utils.memory.available_bytes)."""
    return memory.available_bytes(device)


def _check_population(estimators, datasets):
    """Raise ValueError naming what makes (estimators, datasets) no population."""
    if not estimators:
        raise ValueError("fit_population needs at least one estimator")
    if len(estimators) != len(datasets):
        raise ValueError(f"fit_population got {len(estimators)} estimators but {len(datasets)} training sets; "
                         "give one (X, y) per estimator")
    for p, est in enumerate(estimators):
        from utils.compartmental import CompartmentalClassifier   # (lazy: that module imports this one)
        if not isinstance(est, CompartmentalClassifier):
            raise ValueError(f"member {p} is a {type(est).__name__}, not a CompartmentalClassifier")
    first = estimators[0].get_params()
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v   # noqa: E731
    for p, est in enumerate(estimators[1:], 1):
        params = est.get_params()
        for name in POPULATION_SHARED:
            if norm(first[name]) != norm(params[name]):
                raise ValueError(f"member {p} has {name}={params[name]!r} but member 0 has {first[name]!r}: the "
                                 "members of a population share their structure (layer sizes, batch size, phases, "
                                 "flags, dtype, device); train different structures as separate populations")
    for p, data in enumerate(datasets):
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError(f"training set {p} must be a pair (X, y)")
        X, y = data
        y = as_labels(y)
        if len(X) == 0:
            raise ValueError(f"training set {p} is empty; give every member at least one example")
        if len(X) != len(y):
            raise ValueError(f"training set {p} has {len(X)} inputs but {len(y)} labels")
    if len({_n_features(X) for X, _ in datasets}) > 1:
        raise ValueError("the training sets have different numbers of features; a population shares its input size")


def phase_keys(members, positions, epochs, phase, device):
    """(P, B) int64 example keys of a phase (compartmental_random): member q's seed, epochs[q], the phase name and
    each slot's position positions[q] (a (B,) int64 tensor), or None when nothing spikes."""
    m0 = members[0]
    if not (m0.use_spiking_feedforward or m0.use_spiking_feedback):
        return None
    keys = torch.tensor([rnd.member_key(mb.seed_, e, phase) for mb, e in zip(members, epochs)], dtype=torch.int64)
    return rnd.example_keys(keys.view(-1, 1).to(device), torch.stack(list(positions)).to(device))


def _class_indices(mb, y):
    """The labels y as indices into the member's classes_ (a tensor on its device); ValueError for unknown ones."""
    y_np = as_labels(y)
    pos = np.clip(np.searchsorted(mb.classes_, y_np), 0, len(mb.classes_) - 1)
    if not np.array_equal(mb.classes_[pos], y_np):
        raise ValueError("y contains labels that are not in classes_; pass all classes to the first partial_fit")
    return torch.as_tensor(pos, device=mb.device_)


def _widen_state(mb, B):
    """The member's state at batch width B: a fresh one, or its old one widened with slots at rest."""
    old, mb.state_ = mb.state_, fresh_state(mb.config(), B, mb.device_, mb.dtype_)
    if old is not None:
        k = old["C"][0].shape[0]
        for m in range(mb.M_):
            mb.state_["C"][m][:k] = old["C"][m]
            for kind in old["sig"][m]:
                mb.state_["sig"][m][kind][:, :k] = old["sig"][m][kind]
        mb.state_["hist"] = old["hist"]


def _train(members, datasets, epochs, on_error="raise"):
    """Train the members side by side for epochs[p] passes over their data, batch after batch in lockstep; each
    member's batches, random numbers, updates and hook calls are those of a lone run."""
    m0 = members[0]
    Xs = [mb._to_tensor(X) for mb, (X, _) in zip(members, datasets)]
    ys = [_class_indices(mb, y) for mb, (_, y) in zip(members, datasets)]
    B_state = max([min(m0.batch_size, len(X)) for X in Xs] +
                  [mb.state_["C"][0].shape[0] for mb in members if mb.state_ is not None])
    for mb in members:
        _widen_state(mb, B_state)
    check_member_fits(m0, B_state)                           # before anything trains
    runs = [_Run(mb, X, y, ep) for mb, X, y, ep in zip(members, Xs, ys, epochs)]
    pop = population(members, B_state)
    bar = None
    if any(mb.verbose for mb in members):
        bar = tqdm(total=sum(r.total for r in runs), desc="compartmental", unit="ex", leave=False)
    try:
        while True:
            batches = [r.next_batch() for r in runs]
            if any(b is None for b in batches):              # members that are done leave the population
                keep = [q for q, b in enumerate(batches) if b is not None]
                write_back(pop, [r.mb for r in runs])
                pop.keep(keep)
                runs, batches = [runs[q] for q in keep], [batches[q] for q in keep]
                if not runs:
                    break
                bind(pop, [r.mb for r in runs])
            diverged = _step(pop, runs, batches)
            if bar is not None:
                bar.update(sum(len(b) for b in batches))
            for q, why in diverged:
                mb = runs[q].mb
                err = TrainingDiverged(f"{why} after {mb.examples_seen_} examples (f_etas={mb.f_etas_}"
                                       + (f", b_etas={mb.b_etas_}" if mb.update_feedback_weights else "")
                                       + "); lower the learning rates (the paper's, scaled for the batch: "
                                         "utils.compartmental.batch_f_etas)")
                if on_error == "raise":
                    write_back(pop, [r.mb for r in runs])
                    raise err
                mb.fit_error_ = err
                runs[q].done = True
            for q, r in enumerate(runs):
                if r.mb.hook is not None:                    # the hook sees the current state (state_dict)
                    r.mb.state_ = pop.state_of(q)
                r.after_batch()
    finally:
        if bar is not None:
            bar.close()
    return members


def population(members, B):
    """The engine's Population of the estimators `members` at state batch B (their configurations, weights,
    states and noise generators), with the members' weights bound to it (see bind)."""
    m0 = members[0]
    pop = Population([mb.config() for mb in members], [mb._weights() for mb in members],
                     [mb.state_ for mb in members], B, m0.device_, m0.dtype_, [mb.gen_cpu_ for mb in members])
    bind(pop, members)
    return pop


def bind(pop, members):
    """Each member's W_, b_, Y_, c_ become views of the population's stacks (so that hooks see the current ones)."""
    for q, mb in enumerate(members):
        v = pop.member(q)
        mb.W_, mb.b_, mb.Y_, mb.c_ = v["W"], v["b"], v["Y"], v["c"]


def write_back(pop, members):
    """Give every member its own copies of its weights and its state."""
    for q, mb in enumerate(members):
        w = pop.weights_of(q)
        mb.W_, mb.b_, mb.Y_, mb.c_ = w["W"], w["b"], w["Y"], w["c"]
        mb.state_ = pop.state_of(q)


class _Run:
    """One member's schedule (epochs of random permutations cut into batches), counters and hook calls."""

    def __init__(self, mb, X, y, epochs):
        self.mb, self.X, self.y, self.n = mb, X, y, len(X)
        self.total = epochs * self.n
        self.remaining, self.done = epochs, False
        self.order, self.pos, self.seen0 = None, self.n, mb.examples_seen_
        if mb.order_ is not None:                            # an unfinished epoch (load_state_dict): finish it
            if len(mb.order_) != self.n:
                raise ValueError(f"the unfinished epoch of this network is over {len(mb.order_)} examples but X has "
                                 f"{self.n}; give the same training data to finish it, or fit afresh")
            self.order, self.pos = mb.order_, mb.position_
        self.last = None                                     # the last batch's loss, accuracy and angles
        if mb.hook is not None:
            mb.hook(mb, dict(epoch=mb.epochs_done_, examples_seen=0, n_train=self.n,
                             train_loss=float("nan"), train_acc=float("nan")))

    def next_batch(self):
        """The next batch's example indices, or None when done (a new permutation at each epoch's start)."""
        if self.done:
            return None
        if self.pos >= self.n:
            if self.order is not None:
                self.mb.epochs_done_ += 1
                self.remaining -= 1
            if self.remaining <= 0:
                self.mb.order_, self.mb.position_ = None, None
                return None
            self.order, self.pos = torch.randperm(self.n, generator=self.mb.gen_cpu_).to(self.mb.device_), 0
        idx = self.order[self.pos:self.pos + self.mb.batch_size]
        self.start, self.epoch = self.pos, self.mb.epochs_done_   # the batch's place: its spikes' keys
        self.pos += len(idx)
        self.mb.order_, self.mb.position_ = self.order, self.pos
        return idx

    def record(self, out, idx, angles):
        """Training loss and accuracy of the batch from its forward-phase output potentials, for the hook as they
        are: averaging over batches is the hook's job (utils.logger.TrainingLogger's)."""
        y = self.y[idx]
        self.last = dict(loss=float(torch.nn.functional.cross_entropy(out, y)),
                         acc=float((out.argmax(1) == y).float().mean()), angles=angles)
        self.before = self.mb.examples_seen_ - self.seen0
        self.mb.examples_seen_ += len(idx)

    def after_batch(self):
        mb, last = self.mb, self.last
        after, k = mb.examples_seen_ - self.seen0, mb.hook_every
        if mb.hook is not None and last is not None and (k is None or after // k > self.before // k):
            info = dict(epoch=mb.epochs_done_, examples_seen=after, n_train=self.n,
                        train_loss=last["loss"], train_acc=last["acc"])
            if mb.record_backprop_angle and last["angles"] is not None:
                info["bp_angle"] = dict(last["angles"])
            mb.hook(mb, info)


def _step(pop, runs, batches):
    """One batch of every member: forward and target phases, updates, records. Returns members that diverged."""
    members, P, B = [r.mb for r in runs], pop.P, pop.B
    m0, n = members[0], members[0].n_
    dev, dty = pop.dev, pop.dty
    x = torch.zeros(P, B, n[0], device=dev, dtype=dty)
    target = torch.zeros(P, B, n[-1], device=dev, dtype=dty)
    w_ex = torch.zeros(P, B, device=dev, dtype=dty)
    Tf, Tt, pos = [], [], []
    for q, (r, idx) in enumerate(zip(runs, batches)):
        k = len(idx)
        x[q, :k] = r.X[idx]
        target[q, :k] = torch.nn.functional.one_hot(r.y[idx], n[-1]).to(dty)
        w_ex[q, :k] = 1.0 / k
        pos.append(torch.cat([torch.arange(r.start, r.start + k), -1 - torch.arange(B - k)]))   # empty slots: < 0
        f_len, t_len = m0.l_f_phase, m0.l_t_phase
        if m0.extra_steps:                                   # random phase lengths (authors: + int(Wald(2, 1)))
            f_len += int(r.mb.rng_np_.wald(2.0, 1.0))
            t_len += int(r.mb.rng_np_.wald(2.0, 1.0))
        Tf.append(f_len)
        Tt.append(t_len)
    active = w_ex > 0
    saved = pop.save_slots() if not bool(active.all()) else None
    it, epochs = m0.integration_time, [r.epoch for r in runs]
    f = pop.phase(x, np.array(Tf), None, it, phase_keys(members, pos, epochs, "forward", dev))
    t = pop.phase(x, np.array(Tt), target, it, phase_keys(members, pos, epochs, "target", dev))
    if saved is not None:
        pop.restore_slots(saved, active)
    angles = pop.update(f, t, w_ex, [r.mb.lr_factor() for r in runs])
    out = f["C"][-1]
    for q, (r, idx) in enumerate(zip(runs, batches)):
        r.record(out[q, :len(idx)], idx, None if angles is None else angles[q])
    return _diverged(pop, f["C"], active)


def _diverged(pop, Cf, active):
    """[(member, why)] of the members whose weights or potentials are NaN/inf, whose weights passed WEIGHT_BOUND, or
    whose every hidden neuron fires at 0 or lambda_max in every example of the batch (window means of C, Cf)."""
    big = torch.stack([torch.maximum(w.flatten(1).amax(1), -w.flatten(1).amin(1))   # max |w|, NaN stays NaN
                       for w in pop.W + pop.b]).amax(0)                              # (faster than aminmax)
    finite = torch.isfinite(big) & torch.isfinite(Cf[-1]).flatten(1).all(1)
    a = active.unsqueeze(-1)
    pinned = torch.stack([((c.abs() > SATURATED) | ~a).flatten(1).all(1) for c in Cf[:-1]]).all(0) \
        if len(Cf) > 1 else torch.zeros_like(finite)
    out = []
    for q, (fin, b, pin) in enumerate(zip(finite.tolist(), big.tolist(), pinned.tolist())):
        if not fin:
            out.append((q, "weights or potentials became NaN/inf"))
        elif b > WEIGHT_BOUND:
            out.append((q, f"weights reached {b:.3g} (beyond {WEIGHT_BOUND:g}, far outside the paper's range)"))
        elif pin:
            out.append((q, f"every hidden rate is pinned at 0 or lambda_max (|mean C| > {SATURATED:g})"))
    return out
