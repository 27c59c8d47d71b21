"""The segregated-dendrite network of Guerguiev, Lillicrap & Richards (2017), "Towards deep learning with segregated
dendrites", eLife 6:e22901, as a scikit-learn estimator.

    from utils.compartmental import CompartmentalClassifier
    clf = CompartmentalClassifier(n_hidden=(500,), batch_size=1, max_epochs=60, seed=0)   # the paper's setup
    clf.fit(X_train, y_train)          # X: N x C x H x W (or N x D) tensor in [0, 1], y: N labels
    clf.predict(X_test), clf.predict_proba(X_test), clf.score(X_test, y_test)
    clf.named_weights()                # {"W1": ..., "b1": ..., "Y1": ..., "c1": ...}; clf.set_weights(...) inverts it
    clf.state_dict(), clf.load_state_dict(sd)   # everything to go on exactly, also mid-epoch (utils.checkpoint)

The equations: utils/compartmental_reference.py (one function each, and the Config whose defaults these are); the
fast engine: utils/compartmental_engine.py; many networks trained side by side: utils.compartmental_population
.fit_population; the spikes' random numbers: utils/compartmental_random.py.

The model (equations of the paper's Methods): inputs send Poisson spikes at lambda_max x pixel; hidden neurons have
basal B = W PSP + b (Eq. 5), apical A = Y PSP_fb and a soma C (Eqs. 1, 6) firing at lambda_C = lambda_max sigmoid(C)
(Eq. 4); PSPs are spike trains through the truncated kernel kappa (Eq. 2); the output soma receives the teaching
current in the target phase (Eq. 7). Each batch: a forward and a target phase (each lengthened by int(Wald(2, 1))
steps with extra_steps), plateau potentials alpha = sigmoid(mean A) at the end of each (Eq. 8), then the local
updates (Eqs. 10-13) averaged over the batch (batch_size=1: the paper's online algorithm). Testing: from rest, one
forward phase of l_f_phase_test steps; the prediction is the argmax of the output's mean C over its last
l_f_phase_test - (l_f_phase - integration_time) steps, as in the authors' code, which it follows
(jordan-g/Segregated-Dendrite-Deep-Learning): steady-state output somas in the target phase, their learned-feedback
error E_inv and feedback bias c, their initialisation avg + 3.465 sd U(-1, 1) (init="authors").

Where it differs from the authors' code (the option that gives their behaviour, where there is one): rate mode
filters the rate through the PSP kernel (rate_psp="rate": the rate itself); init="paper" is the paper's literal
avg + sqrt(12) sd U(-1/2, 1/2); batch_size > 1 averages a batch's updates, with rates scaled by batch_f_etas; the
example order is a fresh permutation per epoch from `seed`, the state carried from example to example as theirs;
lr_decay_examples (not in the paper) is off by default; sparse learned feedback re-applies only the mask after each
update (theirs multiplies Y by the initialisation's 5 again after every example); noisy symmetric weights without
broadcast draw one N(0, 0.05) per entry (theirs one scalar); spikes come from counter-based random numbers, so a run
matches theirs in distribution, not spike for spike (start both from the same weights with set_weights).
"""
import math

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from utils import compartmental_reference as R
from utils.compartmental_engine import Population, fresh_state
from utils.compartmental_population import _n_features, _train, as_labels, as_pixels, fit_population, phase_keys

PAPER_F_ETAS = {1: (0.21, 0.21), 2: (0.23, 0.23, 0.12)}  # the paper's learning rates for 1 and 2 hidden layers
PAPER_TEST_ERROR = {1: 4.1, 2: 3.2}   # the paper's MNIST test error (%) after 60 epochs, 1 and 2 hidden layers
FLAGS = R.FLAGS       # the option flags (defined once, in the reference's Config)
PREDICT_CHUNK = 128   # examples simulated at once by predict / predict_proba on a CPU (larger: slower there)
PREDICT_CHUNK_GPU = 4096   # ... on a GPU (larger chunks: fewer kernel launches)
_D = R.Config()       # the defaults


def batch_f_etas(batch_size, f_etas=PAPER_F_ETAS[1], n_examples=None):
    """Online rates (hidden..., output) scaled for averaged batch updates: hidden x 2 B, output x 2 (batch 16:
    (0.21, 0.21) -> (6.72, 0.42)); unchanged at batch_size=1. (Averaging leaves the paper's rates too small for the
    hidden layers, but the output layer cannot take B times its online step: docs/results.md, "Measurements moved
    from the code".) B is the batch that trains: batch_size, or the n_examples of the training data when there are
    fewer."""
    if n_examples is not None:
        batch_size = max(1, min(batch_size, int(n_examples)))
    if batch_size == 1:
        return tuple(f_etas)
    return tuple(e * 2 * batch_size for e in f_etas[:-1]) + (f_etas[-1] * 2,)


def _sizes(n_hidden):
    """n_hidden as a sequence of hidden layer sizes (an integer is one layer)."""
    return (n_hidden,) if isinstance(n_hidden, (int, np.integer)) else n_hidden


def _at_least(v, least):
    """v is an integer (a bool counts as one) >= least."""
    return isinstance(v, (int, np.integer)) and v >= least


def _is_device(v):
    try:
        torch.device(v) if v is not None else None
    except (RuntimeError, TypeError):
        return False
    return True


# The hyperparameters' validity, checked in this order (the first bad one is reported): (names, valid(value, clf),
# how to fix it: formatted with c=the estimator, hidden=its hidden layer count, layers=hidden + 1).
_VALID = (
    (("n_hidden",), lambda v, c: isinstance(_sizes(v), (tuple, list)) and len(_sizes(v)) > 0,
     "give at least one hidden layer, e.g. n_hidden=(500,)"),
    (("n_hidden",), lambda v, c: all(_at_least(n, 1) for n in _sizes(v)),
     "every hidden layer size must be a positive integer"),
    (("tau_s", "tau_L", "dt", "lambda_max"), lambda v, c: float(v) > 0, "must be > 0"),
    (("tau_s",), lambda v, c: not math.isclose(v, c.tau_L),
     "must differ from tau_L={c.tau_L} (the kernel divides by tau_L - tau_s)"),
    (("g_B", "g_D", "g_L", "g_A"), lambda v, c: float(v) >= 0, "conductances must be >= 0"),
    (("g_L",), lambda v, c: v + c.g_B != 0 and v + c.g_D != 0, "g_L + g_B and g_L + g_D must be > 0"),
    (("mem", "l_f_phase", "l_t_phase", "l_f_phase_test", "integration_time", "batch_size"),
     lambda v, c: _at_least(v, 1) and not isinstance(v, bool), "must be a positive integer"),
    (("max_epochs",), lambda v, c: _at_least(v, 0), "must be a non-negative integer"),
    (("l_f_phase", "l_t_phase"), lambda v, c: v >= c.integration_time,
     "must be >= integration_time={c.integration_time} (the averaging window); lengthen the phase or shorten "
     "integration_time"),
    (("l_f_phase_test",), lambda v, c: v >= c.integration_time, "must be >= integration_time={c.integration_time}"),
    (("f_etas",), lambda v, c: v is None or (isinstance(v, (tuple, list)) and len(v) == len(_sizes(c.n_hidden)) + 1),
     "give {layers} learning rates (one per hidden layer and one for the output), or None"),
    (("f_etas",), lambda v, c: v is None or all(float(e) >= 0 for e in v), "learning rates must be >= 0"),
    (("b_etas",), lambda v, c: v is None or (isinstance(v, (tuple, list)) and len(v) == len(_sizes(c.n_hidden))),
     "give {hidden} learning rates (one per hidden layer), or None"),
    (("b_etas",), lambda v, c: v is None or all(float(e) >= 0 for e in v), "learning rates must be >= 0"),
    (("b_etas",), lambda v, c: v is not None or not c.update_feedback_weights,
     "update_feedback_weights=True needs feedback learning rates, e.g. b_etas=(0.01,)"),
    (("update_feedback_weights",), lambda v, c: not (v and c.use_symmetric_weights),
     "cannot learn Y while use_symmetric_weights=True ties it to W; turn one of them off"),
    (FLAGS, lambda v, c: isinstance(v, (bool, np.bool_)), "must be True or False"),
    (("init",), lambda v, c: v in ("authors", "paper"),
     'use "authors" (their code: avg + 3.465 sd U(-1, 1)) or "paper" (avg + sqrt(12) sd U(-1/2, 1/2))'),
    (("rate_psp",), lambda v, c: v in ("kernel", "rate"),
     'use "kernel" (rates through the PSP kernel) or "rate" (the rate itself, the authors\')'),
    (("dtype",), lambda v, c: v in ("float32", "float64"), 'use "float32" or "float64"'),
    (("lr_decay_examples",), lambda v, c: v is None or _at_least(v, 1),
     "give the number of training examples over which the rates decay (e.g. max_epochs * len(X)), or None for "
     "constant rates"),
    (("hook_every",), lambda v, c: v is None or _at_least(v, 1), "must be a positive integer or None"),
    (("hook",), lambda v, c: v is None or callable(v), "must be callable as hook(clf, info), or None"),
    (("verbose",), lambda v, c: v in (0, 1, 2, True, False), "use 0 (silent) or 1 (progress bar)"),
    (("seed",), lambda v, c: v is None or _at_least(v, 0), "use a non-negative integer, or None for fresh entropy"),
    (("device",), lambda v, c: _is_device(v), 'use None, "cpu", "cuda" or "cuda:N"'),
)


class CompartmentalClassifier(ClassifierMixin, BaseEstimator):
    """The segregated-dendrite network as a scikit-learn classifier (see the module docstring; the meaning of each
    number is in utils/compartmental_reference.Config, whose defaults these are)."""

    # long by necessity: scikit-learn's get_params / clone need every hyperparameter as a named argument of __init__
    def __init__(self, n_hidden=(500,), f_etas=None, b_etas=None, batch_size=1, max_epochs=1, lr_decay_examples=None,
                 lambda_max=_D.lambda_max, tau_s=_D.tau_s, tau_L=_D.tau_L, dt=_D.dt, mem=_D.mem, g_B=_D.g_B,
                 g_A=_D.g_A, g_D=_D.g_D, g_L=_D.g_L, E_E=_D.E_E, E_I=_D.E_I, l_f_phase=_D.l_f_phase,
                 l_t_phase=_D.l_t_phase, l_f_phase_test=_D.l_f_phase_test, integration_time=_D.integration_time,
                 extra_steps=_D.extra_steps, use_conductances=_D.use_conductances, use_broadcast=_D.use_broadcast,
                 use_spiking_feedback=_D.use_spiking_feedback, use_spiking_feedforward=_D.use_spiking_feedforward,
                 use_symmetric_weights=_D.use_symmetric_weights, noisy_symmetric_weights=_D.noisy_symmetric_weights,
                 use_sparse_feedback=_D.use_sparse_feedback, update_feedback_weights=_D.update_feedback_weights,
                 use_apical_conductance=_D.use_apical_conductance, use_weight_optimization=_D.use_weight_optimization,
                 use_feedback_bias=_D.use_feedback_bias, record_backprop_angle=_D.record_backprop_angle,
                 init=_D.init, rate_psp=_D.rate_psp, seed=None, device=None, dtype="float32", verbose=0, hook=None,
                 hook_every=None):
        # n_hidden: hidden layer sizes; f_etas / b_etas: forward rates per layer (hidden..., output) / feedback rates
        # per hidden layer (None: the paper's); batch_size: examples simulated at once, updates averaged (1: the
        # paper); lr_decay_examples: None (constant rates) or N (cosine decay to 0 over N examples); seed: weights,
        # spikes, order, extra steps (None: fresh entropy); device: None (the device of X); verbose: 1 for a tqdm
        # bar; hook(clf, info) is called after the batch crossing each multiple of hook_every examples (None: every
        # batch) with that batch's train_loss and train_acc (and bp_angle), once before the first batch with
        # examples_seen=0. Everything else: see Config.
        for name, value in list(locals().items()):
            if name != "self":
                setattr(self, name, value)

    # ------------------------------------------------------------------------------------------------------------
    # validation and set-up

    def _check_params(self):
        """Raise ValueError naming the first bad hyperparameter (in the order of _VALID) and how to fix it; returns
        the hidden sizes."""
        sizes = _sizes(self.n_hidden)
        hidden = len(sizes) if isinstance(sizes, (tuple, list)) else 0
        for names, valid, fix in _VALID:
            for name in names:
                if not valid(getattr(self, name), self):
                    raise ValueError(f"{name}={getattr(self, name)!r} is invalid: "
                                     + fix.format(c=self, hidden=hidden, layers=hidden + 1))
        return tuple(int(n) for n in sizes)

    def config(self):
        """The network's configuration as the reference's frozen Config (after fit or initialize)."""
        names = {f.name for f in R.fields(R.Config)} - {"sizes", "f_etas", "b_etas", "seed"}
        return R.Config(sizes=self.n_, f_etas=self.f_etas_, b_etas=self.b_etas_, seed=self.seed_,
                        **{k: getattr(self, k) for k in names})

    def _setup(self, n_in, n_out, device):
        """Constants, random generators, weights and state of a fresh network."""
        n_hidden = self._check_params()
        self.n_ = (int(n_in),) + n_hidden + (int(n_out),)   # layer sizes, input first
        self.M_ = len(self.n_) - 1                          # layers with weights (hidden + output)
        self.device_ = torch.device(self.device) if self.device is not None else torch.device(device)
        self.dtype_ = getattr(torch, self.dtype)
        self.seed_ = int(self.seed) if self.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self.rng_np_ = np.random.default_rng(self.seed_)                            # extra steps (Wald)
        self.gen_cpu_ = torch.Generator().manual_seed(self.seed_ % 2**63)           # weights, order, noise
        self.f_etas_ = tuple(float(e) for e in (self.f_etas if self.f_etas is not None
                                                 else PAPER_F_ETAS.get(self.M_ - 1, (0.21,) * self.M_)))
        self.b_etas_ = tuple(float(e) for e in self.b_etas) if self.b_etas is not None else (0.0,) * (self.M_ - 1)
        cfg = self.config()
        W, b, Y, c = R.initial_weights(cfg, self.gen_cpu_)
        masks = R.sparse_masks(Y, self.gen_cpu_) if self.use_sparse_feedback else None
        if self.use_symmetric_weights:
            Y = R.symmetric_feedback(W, cfg, self.gen_cpu_)
        if masks is not None:
            Y = [y * mk * 5 for y, mk in zip(Y, masks)]
        to = dict(device=self.device_, dtype=self.dtype_)
        self.W_, self.b_ = [w.to(**to) for w in W], [v.to(**to) for v in b]
        self.Y_, self.c_ = [y.to(**to) for y in Y], [v.to(**to) for v in c]
        self.Y_mask_ = None if masks is None else [mk.to(**to) for mk in masks]
        self.state_ = None                                  # made for the first batch (see _fresh_state)
        self.examples_seen_ = 0
        self.epochs_done_ = 0
        self.order_, self.position_ = None, None             # an unfinished epoch: its example order and position

    def _fresh_state(self, B):
        """Rest: zero potentials and signal histories (the last mem steps) for B examples (engine.fresh_state)."""
        return fresh_state(self.config(), B, self.device_, self.dtype_)

    def _weights(self):
        """The weights as the engine takes them: dict(W, b, Y, c, mask) of lists of tensors."""
        return dict(W=self.W_, b=self.b_, Y=self.Y_, c=self.c_, mask=self.Y_mask_)

    # ------------------------------------------------------------------------------------------------------------
    # the scikit-learn API

    def _to_tensor(self, X):
        """X as an (N, features) tensor of the network's dtype and device, by the workspace's one input rule
        (utils.classifiers.as_inputs: uint8 pixels scaled to [0, 1]); the pixels must lie in [0, 1] (they are rates)."""
        X = as_pixels(X)
        if hasattr(self, "n_") and X.shape[1] != self.n_[0]:
            raise ValueError(f"X has {X.shape[1]} features per example but this network was fitted on {self.n_[0]}; "
                             f"give inputs of the training data's shape")
        dev = self.device_ if hasattr(self, "device_") else (torch.device(self.device) if self.device else X.device)
        return X.to(device=dev, dtype=getattr(torch, self.dtype))

    def _start(self, X, classes):
        """A fresh network for the training inputs X (its feature count and device) and the class labels."""
        self._check_params()                                # bad hyperparameters are named before the data's faults
        self.classes_ = np.asarray(classes)
        self._setup(_n_features(X), len(self.classes_), torch.as_tensor(X).device)

    def initialize(self, n_features, classes):
        """A fresh network for n_features inputs and the given class labels (fit does this itself)."""
        self.classes_ = np.asarray(classes)
        self._setup(n_features, len(self.classes_), torch.device(self.device) if self.device else torch.device("cpu"))
        return self

    def fit(self, X, y):
        """Train a fresh network for max_epochs epochs."""
        return fit_population([self], [(X, y)])[0]

    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y), continuing from the current weights and state."""
        if not hasattr(self, "W_"):
            self._start(X, classes if classes is not None else np.unique(as_labels(y)))
        _train([self], [(X, y)], [1])
        return self

    def lr_factor(self):
        """The multiplier of every learning rate for the next batch: 1, or the cosine decay of lr_decay_examples."""
        if self.lr_decay_examples is None:
            return 1.0
        progress = min(getattr(self, "examples_seen_", 0), self.lr_decay_examples) / self.lr_decay_examples
        return 0.5 * (1 + math.cos(math.pi * progress))

    def _check_fitted(self):
        if not hasattr(self, "W_"):
            raise RuntimeError("this CompartmentalClassifier is not fitted yet; call fit (or initialize) first")

    def decision_function(self, X):
        """Mean output somatic potential over the test window of a forward phase from rest (N x n_classes numpy)."""
        self._check_fitted()
        X = self._to_tensor(X)
        T = self.l_f_phase_test
        window = int(min(T, max(1, T - (self.l_f_phase - self.integration_time))))
        chunk = PREDICT_CHUNK if self.device_.type == "cpu" else PREDICT_CHUNK_GPU
        outs = []
        for i in range(0, X.shape[0], chunk):
            xb = X[i:i + chunk]
            k = xb.shape[0]
            pop = Population([self.config()], [self._weights()], [self._fresh_state(k)], k, self.device_, self.dtype_)
            keys = phase_keys([self], [torch.arange(i, i + xb.shape[0])], [0], "test", self.device_)
            res = pop.phase(xb.unsqueeze(0), np.array([T]), None, window, keys, record=False)   # the fast test path
            outs.append(res["C"][-1][0].cpu())
        return torch.cat(outs).double().numpy() if outs else np.zeros((0, len(self.classes_)))

    def predict_proba(self, X):
        return torch.softmax(torch.as_tensor(self.decision_function(X)), dim=1).numpy()

    def predict(self, X):
        scores = self.decision_function(X)
        return self.classes_[scores.argmax(1)]

    def score(self, X, y, sample_weight=None):
        y = as_labels(y)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} examples but y has {len(y)} labels")
        return float(np.average(self.predict(X) == y, weights=sample_weight))

    def state_dict(self):
        """Everything training needs to go on exactly where it stands (also mid-epoch): the weights (W, b, Y, c and
        the sparse feedback's masks, as named_weights), the simulation state (potentials, signal histories, input
        events), the unfinished epoch's example order and position, the counters and the generators' states. Plain
        values under "meta" (JSON-able), tensors under "tensors"; load_state_dict is its inverse."""
        self._check_fitted()
        meta = dict(n_features=self.n_[0], classes=self.classes_.tolist(), seed=self.seed_,
                    examples_seen=self.examples_seen_, epochs_done=self.epochs_done_, position=self.position_,
                    rng_np=self.rng_np_.bit_generator.state)
        tensors = dict(weights=dict(self.named_weights()), generator=self.gen_cpu_.get_state())
        if self.order_ is not None:
            tensors["order"] = self.order_.cpu()
        if self.state_ is not None:
            st = self.state_
            tensors["state"] = dict(C=list(st["C"]), sig=[dict(d) for d in st["sig"]], hist=list(st["hist"]))
        return dict(meta=meta, tensors=tensors)

    def load_state_dict(self, state):
        """Restore what state_dict gave (on this estimator's device and dtype); training goes on from there:
        partial_fit first finishes an unfinished epoch."""
        meta, tensors = state["meta"], state["tensors"]
        self.initialize(meta["n_features"], np.asarray(meta["classes"]))
        self.set_weights(tensors["weights"])
        self.seed_, self.examples_seen_, self.epochs_done_ = meta["seed"], meta["examples_seen"], meta["epochs_done"]
        self.rng_np_.bit_generator.state = meta["rng_np"]
        self.gen_cpu_.set_state(tensors["generator"].cpu())
        self.position_ = meta["position"]
        self.order_ = tensors["order"].to(self.device_) if "order" in tensors else None
        if "state" in tensors:
            s, to = tensors["state"], dict(device=self.device_, dtype=self.dtype_)
            hist = [h.to(self.device_) for h in s["hist"]]
            self.state_ = dict(C=[c.to(**to) for c in s["C"]], sig=[{k: v.to(**to) for k, v in d.items()}
                                                                     for d in s["sig"]],
                               hist=tuple(hist[:3]) + (hist[3].to(**to),))
        return self

    def named_weights(self):
        """Feedforward W1..WM (output last), biases b1..bM, feedback Y1..Y(M-1) and apical biases c1..c(M-1), by name
        (with use_sparse_feedback also the feedback masks mask1..mask(M-1))."""
        self._check_fitted()
        out = {f"W{m + 1}": w for m, w in enumerate(self.W_)}
        out.update({f"b{m + 1}": v for m, v in enumerate(self.b_)})
        out.update({f"Y{m + 1}": y for m, y in enumerate(self.Y_)})
        out.update({f"c{m + 1}": v for m, v in enumerate(self.c_)})
        if self.Y_mask_ is not None:
            out.update({f"mask{m + 1}": k for m, k in enumerate(self.Y_mask_)})
        return out

    def set_weights(self, weights):
        """Replace weights of an initialised (or fitted) network by name, as named_weights gives them (W1.., b1..,
        Y1.., c1.., mask1..: the sparse feedback's masks, 1 where Y is kept), from tensors or arrays of the same shapes
        (e.g. the authors' code's, or a checkpoint's). A new mask zeroes Y outside it (use_sparse_feedback); with
        use_symmetric_weights, new W without Y re-derive Y from W (as after every update)."""
        self._check_fitted()
        M = self.M_
        mask_shape = [tuple(y.shape) for y in self.Y_]
        slots = {**{f"W{m + 1}": (self.W_, m) for m in range(M)}, **{f"b{m + 1}": (self.b_, m) for m in range(M)},
                 **{f"Y{m + 1}": (self.Y_, m) for m in range(M - 1)},
                 **{f"c{m + 1}": (self.c_, m) for m in range(M - 1)}}
        masks = list(self.Y_mask_) if self.Y_mask_ is not None else [None] * (M - 1)
        if self.use_sparse_feedback:
            slots.update({f"mask{m + 1}": (masks, m) for m in range(M - 1)})
        for name, value in weights.items():
            if name not in slots:
                raise ValueError(f"unknown weight {name!r}; this network has {', '.join(slots)}")
            lst, m = slots[name]
            value = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            shape = mask_shape[m] if name.startswith("mask") else tuple(lst[m].shape)
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
            lst[m] = value.to(device=self.device_, dtype=self.dtype_).clone()
        if self.use_sparse_feedback:
            self.Y_mask_ = masks
        if self.use_symmetric_weights and any(k.startswith("W") for k in weights) and \
                not any(k.startswith("Y") for k in weights):
            self.Y_ = [y.to(self.dtype_) for y in R.symmetric_feedback(self.W_, self.config(), self.gen_cpu_)]
            if self.Y_mask_ is not None:
                self.Y_ = [y * mk * 5 for y, mk in zip(self.Y_, self.Y_mask_)]
        elif self.use_sparse_feedback and any(k.startswith("mask") for k in weights):
            self.Y_ = [y * mk for y, mk in zip(self.Y_, self.Y_mask_)]
        return self
