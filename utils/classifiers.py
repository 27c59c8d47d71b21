"""Estimators: one factory for every kind of model, and the skorch classifier behind the MLP and CNN.

    from utils.classifiers import make_classifier
    clf = make_classifier("mlp", hidden_sizes=(500,), lr=1e-3, batch_size=100, max_epochs=10, seed=0)
    clf = make_classifier("compartmental", n_hidden=(500,), batch_size=16, max_epochs=1)

This module describes the MLP and the CNN under every learning rule that applies to them (utils.kinds): their
estimator, search spaces, reference points, checks, checkpoint state and command-line options.

The backprop nets are skorch classifiers whose batches are slices of a random permutation of tensors that already
live on the device (no Dataset indexing per example, no DataLoader workers). Checks of what users pass (hyperparameters,
X, y) raise a ValueError naming the problem.
"""
import functools
import inspect
import math
import re
import sys

import numpy as np
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import LRScheduler, PrintLog, ProgressBar
from skorch.history import History

import utils.memory as memory
from utils.checkpoint import as_tuples, restore_device
from utils.data import get_device
from utils.errors import TrainingDiverged
from utils.kinds import MAX_BLOCKS, MAX_LAYERS, Kind, find_kind, networks, register
from utils.models import CNN, MLP, cnn_feature_shape, whole_numbers
from utils.rules import check_rule, rule_settings, rules_for

# ----------------------------------------------------------------------------------------------------------------
# defaults of the backprop nets (the Bayesian optimization searches around them)
COMMON_DEFAULTS = dict(
    lr=1e-3,          # Adam learning rate
    batch_size=100,   # examples per update
    max_epochs=10,    # passes over the training data
    seed=0,           # weights and batch order
    device=None,      # None: the GPU when there is one, else the CPU
    verbose=0,        # 0: silent; 1: a progress bar and skorch's epoch table
    lr_schedule=None, # None or "constant": constant lr; "cosine": cosine annealing from lr to 0 over max_epochs
)
LR_SCHEDULES = ("constant", "cosine")   # lr_schedule's names (None is "constant")
MLP_DEFAULTS = dict(hidden_sizes=(500,), rule="backprop")  # rule: "backprop", "fa", "dfa", "sign" (utils.rules)
CNN_DEFAULTS = dict(channels=(32, 64), kernel_sizes=(3, 3), stride=1, padding=1, rule="backprop")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes of skorch's epoch table, dropped when stdout is not a terminal


# ----------------------------------------------------------------------------------------------------------------
# checks of what users pass: hyperparameters, X and y


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_common_hyperparameters(hp):
    """ValueError naming the problem when lr, batch_size or max_epochs (those of `hp` that are set) are unusable."""
    lr = hp.get("lr")
    if "lr" in hp and (isinstance(lr, bool) or not isinstance(lr, (int, float, np.number)) or not math.isfinite(lr)
                       or lr <= 0):
        raise ValueError(f"lr={lr!r}: the learning rate must be a positive number (e.g. lr=1e-3)")
    bs = hp.get("batch_size")
    if "batch_size" in hp and not (_is_int(bs) and (bs >= 1 or bs == -1)):
        raise ValueError(f"batch_size={bs!r}: give a whole number of examples per update >= 1 (e.g. 100), or -1 "
                         f"for all examples at once")
    epochs = hp.get("max_epochs")
    if "max_epochs" in hp and not (_is_int(epochs) and epochs >= 1):
        raise ValueError(f"max_epochs={epochs!r}: give a whole number of passes over the data >= 1 (e.g. 10)")


def as_inputs(X, device=None):
    """X as a float32 tensor with one example per row (numpy arrays, lists and tensors of any real dtype; uint8 is
    read as image bytes and scaled to [0, 1]); ValueError when it is empty, 1-d, not numeric or holds NaN/inf."""
    if not isinstance(X, torch.Tensor):
        X = np.asarray(X)
        if X.dtype.kind not in "biuf":
            raise ValueError(f"X has dtype {X.dtype}; expected numbers (float images in [0, 1] or uint8 pixels)")
        X = torch.from_numpy(np.ascontiguousarray(X))
    if X.dtype.is_complex:
        raise ValueError(f"X has dtype {X.dtype}; expected real numbers")
    if X.ndim < 2 or len(X) == 0:
        raise ValueError(f"X has shape {tuple(X.shape)}; expected one example per row, e.g. N x C x H x W images or "
                         f"N x features (a single example: X[None])")
    X = X.float().div_(255.0) if X.dtype == torch.uint8 else X.float()
    if device is not None:
        X = X.to(device)
    bad = ~torch.isfinite(X.flatten(1).sum(1))  # NaN and inf propagate into the sum (one number per example)
    if bad.any():
        raise ValueError(f"X holds NaN or infinite values in {int(bad.sum())} of {len(X)} examples (the first: "
                         f"index {int(bad.nonzero()[0])}); remove or impute them before training or predicting")
    return X


def as_labels(y, n, device=None):
    """y as an int64 tensor of n class indices 0..K-1; ValueError naming the problem otherwise."""
    if y is None:
        raise ValueError("y is missing: fit needs the labels, one class index per example")
    t = y if isinstance(y, torch.Tensor) else None
    if t is None:
        a = np.asarray(y)
        if a.dtype.kind not in "biuf":
            raise ValueError(f"y has dtype {a.dtype}; expected integer class indices 0..K-1 (encode other labels "
                             f"with sklearn.preprocessing.LabelEncoder)")
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"y has shape {tuple(t.shape)} but X has {n} examples; expected one label per example")
    if t.dtype.is_floating_point and not bool((t == t.round()).all()):
        raise ValueError("y holds non-integer values; expected integer class indices 0..K-1 (encode other labels "
                         "with sklearn.preprocessing.LabelEncoder)")
    t = t.long()
    if int(t.min()) < 0:
        raise ValueError(f"y holds the negative label {int(t.min())}; expected class indices 0..K-1 (encode other "
                         f"labels with sklearn.preprocessing.LabelEncoder)")
    return t.to(device) if device is not None else t


# ----------------------------------------------------------------------------------------------------------------
# skorch plumbing


class DeviceBatches:
    """Batches as slices of a random permutation of (X, y) tensors, which stay where they are (the device)."""

    def __init__(self, X, y, batch_size, shuffle=False, generator=None):
        self.X, self.y, self.batch_size, self.shuffle, self.generator = X, y, batch_size, shuffle, generator

    def __len__(self):
        return math.ceil(len(self.X) / self.batch_size)

    def __iter__(self):
        n = len(self.X)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.X.device)
            for i in range(0, n, self.batch_size):
                idx = order[i:i + self.batch_size]
                yield self.X[idx], self.y[idx]
        else:
            for i in range(0, n, self.batch_size):
                yield self.X[i:i + self.batch_size], (None if self.y is None else self.y[i:i + self.batch_size])


def interactive():
    """True in a running notebook kernel or at a terminal; False when output goes to a file or a pipe (no progress
    bars there). An imported ipykernel alone (e.g. by nbclient) is no notebook."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return hasattr(shell, "kernel") or sys.stderr.isatty()


class PlainPrintLog(PrintLog):
    """skorch's epoch table (verbose): printed as it is at a terminal, without its colour codes anywhere else."""

    def _sink(self, text, verbose):
        if verbose:
            print(text if sys.stdout.isatty() else ANSI.sub("", text))


class TorchClassifier(NeuralNetClassifier):
    """skorch's NeuralNetClassifier with device-resident batches, a seed, input shape inferred from X, and a check
    that stops training with TrainingDiverged when the loss is NaN or infinite."""

    def __init__(self, module, *args, seed=0, **kwargs):
        super().__init__(module, *args, **kwargs)
        self.seed = seed

    def initialize(self):
        torch.manual_seed(self.seed)  # the same seed gives the same initial weights ...
        self.shuffle_generator_ = torch.Generator().manual_seed(self.seed)  # ... and the same batch order
        return super().initialize()

    def _inputs(self, X):
        """X checked and converted (as_inputs); N x H x W grey images get their channel axis for the CNN."""
        X = as_inputs(X, self.device)
        if self.module is CNN and X.ndim == 3:
            X = X[:, None]
        if self.module is CNN and X.ndim != 4:
            raise ValueError(f"the CNN takes images, N x C x H x W (or N x H x W); X has shape {tuple(X.shape)} "
                             f"(flat images: reshape them, e.g. X.reshape(-1, 1, 28, 28))")
        return X

    def _prepare(self, X, y, infer):
        """X and y checked and converted; with `infer` (a fresh network follows), the input size and the number of
        classes (largest label + 1) set from them."""
        check_common_hyperparameters({"lr": self.lr, "batch_size": self.batch_size, "max_epochs": self.max_epochs})
        X = self._inputs(X)
        y = as_labels(y, len(X), X.device)
        n_classes = int(y.max()) + 1
        if n_classes < 2:
            raise ValueError("y holds only the class 0; a classifier needs at least two classes")
        if infer:
            shape = tuple(X.shape[1:])
            key = "module__in_features" if self.module is MLP else "module__in_shape"
            wanted = {key: math.prod(shape) if self.module is MLP else shape, "module__n_classes": n_classes}
            changed = {k: v for k, v in wanted.items() if getattr(self, k, None) != v}
            if changed:
                self.set_params(**changed)
            self.in_shape_ = shape
            self._check_fits(len(X))
        return X, y

    def _training_bytes(self, arch, batch):
        """Bytes (float32) a training step of the network `arch` (the module's keyword arguments) takes at `batch`:
        weights, their gradients, Adam's two moments and its step's temporaries (one more copy), the fixed feedback,
        and the step's activations (the module's footprint)."""
        counted = inspect.signature(self.module.footprint).parameters   # a rule's own settings are not sizes
        params, feedback, activations = self.module.footprint(**{k: v for k, v in arch.items() if k in counted})
        return 4 * (5 * params + feedback + batch * activations)

    def _check_fits(self, n):
        """InsufficientMemory (utils.memory.check_fits) before a fresh network is built when training it on n
        examples would not fit, naming the largest batch size that fits or, when none does, the largest widths."""
        arch = {k[len("module__"):]: v for k, v in vars(self).items() if k.startswith("module__")}
        batch = n if self.batch_size == -1 else min(self.batch_size, n)
        need, budget = self._training_bytes(arch, batch), memory.HEADROOM * memory.available_bytes(self.device)
        if need <= budget:
            return
        width = "hidden_sizes" if self.module is MLP else "channels"
        shape = f"{width} {tuple(whole_numbers(arch[width], width))} on inputs {self.in_shape_}"
        what = f"training {'an MLP' if self.module is MLP else 'a CNN'} with {shape} at batch {batch}"
        fits = lambda arch, b: self._training_bytes(arch, b) <= budget   # noqa: E731
        if fits(arch, 1):
            b = _largest(lambda b: fits(arch, b), batch)
            largest = f"--batch-size {b} (batch_size={b})"
        else:
            sizes = whole_numbers(arch[width], width)
            scaled = lambda x: tuple(max(1, h * x // max(sizes)) for h in sizes)   # noqa: E731
            x = _largest(lambda x: fits({**arch, width: scaled(x)}, batch), max(sizes))
            cli = "--n-hidden" if self.module is MLP else "--channels"
            largest = (f"{cli} {' '.join(map(str, scaled(x)))} ({width}={scaled(x)})" if x else
                       "none at this input size")
        memory.check_fits(need, what, largest=largest, device=self.device)

    def fit(self, X, y=None, **fit_params):
        """Fit a fresh network on X (images or feature rows: tensors or numpy arrays, see as_inputs) and integer
        labels y; the input size and the number of classes (largest label + 1) come from the data."""
        X, y = self._prepare(X, y, infer=not self.warm_start or not self.initialized_)
        return super().fit(X, y, **fit_params)

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        """Continue training from the current weights, optimizer state and batch order (a fresh network the first
        time); `epochs=1` trains one epoch, the default max_epochs."""
        X, y = self._prepare(X, y, infer=not self.initialized_)
        return super().partial_fit(X, y, classes=classes, **fit_params)

    def predict_proba(self, X):
        """Class probabilities, N x n_classes; X as in fit, of the shape the network was fitted on."""
        X = self._inputs(X)
        fitted = getattr(self, "in_shape_", None)
        if fitted is not None and tuple(X.shape[1:]) != fitted and not (
                self.module is MLP and math.prod(X.shape[1:]) == math.prod(fitted)):
            raise ValueError(f"X has examples of shape {tuple(X.shape[1:])} but this network was fitted on "
                             f"{fitted}; pass data shaped like the training data")
        return super().predict_proba(X)

    def score(self, X, y, sample_weight=None):
        """Accuracy; labels may be a tensor on any device (scikit-learn's metric needs them on the host)."""
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
        return super().score(X, y, sample_weight=sample_weight)

    def initialize_optimizer(self, triggered_directly=None):
        """skorch's optimizer, over the module's own parameter groups where it has them (`param_groups(lr)`: a
        learning rule that trains some parameters at its own rate, utils.rules)."""
        groups = getattr(self.module_, "param_groups", lambda lr: None)(self.lr)
        if groups is None:
            return super().initialize_optimizer()
        _, kwargs = self.get_params_for_optimizer("optimizer", self.get_all_learnable_params())
        self.optimizer_ = self.optimizer(groups, **kwargs)
        return self

    def get_default_callbacks(self):
        return [(name, PlainPrintLog() if name == "print_log" else cb) for name, cb in super().get_default_callbacks()]

    def get_iterator(self, dataset, training=False):
        X, y = getattr(dataset, "X", None), getattr(dataset, "y", None)
        if not isinstance(X, torch.Tensor):  # anything else takes skorch's usual path
            return super().get_iterator(dataset, training)
        bs = len(X) if self.batch_size == -1 else self.batch_size
        return DeviceBatches(X, y, bs, shuffle=training, generator=self.shuffle_generator_)

    def on_batch_end(self, net, batch=None, training=None, loss=None, **kwargs):
        if training and loss is not None and not math.isfinite(net.history[-1, "batches", -1, "train_loss"]):
            raise TrainingDiverged(f"the training loss became {loss.item()} after "
                                   f"{sum(len(h['batches']) for h in net.history)} batches (lr={net.lr}); "
                                   f"lower the learning rate")


def _largest(fits, top):
    """The largest x in 1..top with fits(x) (fits falls as x grows); 0 when none."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def make_classifier(kind, logger=None, **hyperparameters):
    """The one place that builds estimators: a model name of utils.kinds ("mlp", "cnn", "compartmental", "mlp-fa",
    ...), with keyword hyperparameters.

    Backprop nets take lr, batch_size, max_epochs, seed, device, verbose, plus hidden_sizes (MLP) or channels,
    kernel_sizes, stride, padding (CNN). Their fit takes X as a tensor or numpy array of any real dtype (uint8 pixels
    are scaled to [0, 1]; the CNN wants N x C x H x W or N x H x W images) and y as integer labels 0..K-1; the input
    size and n_classes (largest label + 1) are inferred from them. Unusable values (lr <= 0, batch_size or max_epochs
    < 1, NaN in X, string labels, ...) raise a ValueError that names them. `logger` (a
    utils.logger.TrainingLogger) is attached as a skorch callback or as the compartmental network's hook.
    """
    found = find_kind(kind)   # "mlp-fa": the MLP learning by feedback alignment (utils.rules)
    if found is None:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {', '.join(networks())}")
    check_common_hyperparameters(hyperparameters)
    return found.build(logger=logger, **hyperparameters)


# ----------------------------------------------------------------------------------------------------------------
# the MLP and the CNN as kinds (utils.kinds): estimator, search space, reference, checkpoint state, command line

NETWORKS = {"mlp": (MLP, MLP_DEFAULTS), "cnn": (CNN, CNN_DEFAULTS)}   # network -> (module, its defaults)


def _build(network, name_rule, /, logger=None, **hyperparameters):
    """The TorchClassifier of `network` ("mlp", "cnn") learning by `name_rule` (unless hyperparameters name one)."""
    if name_rule is not None:
        hyperparameters.setdefault("rule", name_rule)
    module, arch = NETWORKS[network]
    arch = {**arch, **rule_settings(check_rule(hyperparameters.get("rule", arch["rule"]), network))}   # DTP's...
    unknown = set(hyperparameters) - set(arch) - set(COMMON_DEFAULTS) - {"callbacks"}
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for {network!r}; valid: "
                         f"{sorted(set(arch) | set(COMMON_DEFAULTS))}")
    hp = {**COMMON_DEFAULTS, **arch, **hyperparameters}
    callbacks = list(hp.pop("callbacks", None) or [])
    if hp["verbose"] and interactive():  # tqdm bars only where someone watches them
        callbacks.append(("progress", ProgressBar(batches_per_epoch="auto" if hp["batch_size"] > 0 else 1)))
    if logger is not None:   # the logger's hook: a skorch callback
        callbacks.append(("logger", logger))
    schedule = hp.pop("lr_schedule")
    if schedule == "cosine":
        callbacks.append(("lr_schedule", LRScheduler(policy=torch.optim.lr_scheduler.CosineAnnealingLR,
                                                      T_max=int(hp["max_epochs"]))))
    elif schedule not in (None, "constant"):
        raise ValueError(f"unknown lr_schedule {schedule!r}; valid: {', '.join(map(repr, LR_SCHEDULES))} (None is "
                         f"'constant')")
    module_params = {f"module__{k}": tuple(v) if isinstance(v, list) else v for k, v in hp.items() if k in arch}
    return TorchClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=hp["lr"], batch_size=int(hp["batch_size"]), max_epochs=int(hp["max_epochs"]), seed=hp["seed"],
        device=str(get_device(hp["device"])), verbose=hp["verbose"],
        train_split=None,  # all of X trains; validation is cross_validate's and the logger's business
        callbacks=callbacks or None,
        **module_params)


LOG10_LR = (-4.0, math.log10(5e-2))  # Adam learning rate 1e-4 .. 5e-2
SPACES = {
    "mlp": {
        "batch_size": (10, 500, int),
        "log10_lr": LOG10_LR,
        "n_layers": (1, MAX_LAYERS, int),
        **{f"units_{i}": (30, 500, int) for i in range(1, MAX_LAYERS + 1)},
    },
    "cnn": {
        "batch_size": (10, 500, int),
        "log10_lr": LOG10_LR,
        "n_blocks": (1, MAX_BLOCKS, int),
        **{f"channels_{i}": (3, 64, int) for i in range(1, MAX_BLOCKS + 1)},
        **{f"kernel_{i}": (2, 10, int) for i in range(1, MAX_BLOCKS + 1)},
        "stride": (1, 3, int),   # one stride and one padding for all blocks, as in the seed study
        "padding": (1, 3, int),
    },
}
RULE_SPACES = {  # a learning rule's own numbers, searched beside its network's (log10_x: the setting x as log10)
    "dtp": {"log10_noise": (-2.0, 0.0),          # sigma: corruption the inverses learn on
            "log10_inverse_lr": (-4.0, -2.0),    # the inverses' Adam rate
            "log10_target_step": (-2.0, 0.0)},   # eta: the first target's step along -dL/dh
    "sdtp": {"log10_noise": (-2.0, 0.0), "log10_inverse_lr": (-4.0, -2.0),
             "log10_target_step": (-1.0, 0.0)},  # eta: the output target's step towards the label (1: the label)
    "pc": {"inference_steps": (5, 50, int),      # T: inference steps per batch (the cost: ~T passes)
           "log10_inference_rate": (-2.0, -0.3),    # gamma: the relaxation's step size (halved where it overshoots)
           "log10_output_weight": (-2.0, 0.0)},     # beta: the energy's output term (small: nearer backprop)
}


def _rule_values(own, values):
    """The rule's own numbers (its space `own`) of a point `values` -> make_classifier's keyword arguments."""
    return {k.removeprefix("log10_"): 10.0 ** float(values[k]) if k.startswith("log10_") else
            int(round(values[k])) if b[-1] is int else values[k] for k, b in own.items()}


def _rule_reference(rule, own):
    """The rule's defaults (utils.rules.rule_settings) in the coordinates of its space `own`."""
    d = rule_settings(rule) if rule else {}
    return {k: math.log10(d[k.removeprefix("log10_")]) if k.startswith("log10_") else d[k] for k in own}


def _common_reference():
    return dict(batch_size=COMMON_DEFAULTS["batch_size"], log10_lr=math.log10(COMMON_DEFAULTS["lr"]))


def _mlp_reference(rule, own, batch_size=None):
    sizes = MLP_DEFAULTS["hidden_sizes"]
    return {**_common_reference(), **_rule_reference(rule, own), "n_layers": len(sizes),
            **{f"units_{i}": n for i, n in enumerate(sizes, 1)}}


def _cnn_reference(rule, own, batch_size=None):
    d = CNN_DEFAULTS
    return {**_common_reference(), **_rule_reference(rule, own), "n_blocks": len(d["channels"]),
            "stride": d["stride"], "padding": d["padding"],
            **{f"channels_{i}": c for i, c in enumerate(d["channels"], 1)},
            **{f"kernel_{i}": k for i, k in enumerate(d["kernel_sizes"], 1)}}


def _mlp_hyperparameters(own, p):
    return dict(hidden_sizes=tuple(int(p[f"units_{i}"]) for i in range(1, int(p["n_layers"]) + 1)),
                lr=10.0 ** float(p["log10_lr"]), batch_size=int(p["batch_size"]), **_rule_values(own, p))


def _cnn_hyperparameters(own, p):
    n = int(p["n_blocks"])
    return dict(channels=tuple(int(p[f"channels_{i}"]) for i in range(1, n + 1)),
                kernel_sizes=tuple(int(p[f"kernel_{i}"]) for i in range(1, n + 1)),
                stride=int(p["stride"]), padding=int(p["padding"]),
                lr=10.0 ** float(p["log10_lr"]), batch_size=int(p["batch_size"]), **_rule_values(own, p))


def _mlp_check(hp, in_shape):
    """Every MLP the space proposes can train."""


def _cnn_check(hp, in_shape):
    """ValueError for a block whose output is empty or fractional."""
    cnn_feature_shape(in_shape, hp["channels"], hp["kernel_sizes"], hp["stride"], hp["padding"])


def _torch_state(network, clf):
    arch = NETWORKS[network][1]
    module = {k[len("module__"):]: v for k, v in clf.get_params().items() if k.startswith("module__")}
    hp = {k: getattr(clf, k) for k in ("lr", "batch_size", "max_epochs", "seed", "verbose", "device")}
    hp.update({k: module[k] for k in arch if k in module})
    hp["lr_schedule"] = "cosine" if any(name == "lr_schedule" for name, _ in clf.callbacks or []) else None
    meta = dict(estimator="TorchClassifier", kind=network, hyperparameters=hp,
                inferred={k: v for k, v in module.items() if k not in arch})   # in_features / in_shape, n_classes
    if not clf.initialized_:
        return meta, {}
    meta["state"] = dict(history=clf.history_.to_list(), in_shape=getattr(clf, "in_shape_", None),
                         classes=getattr(clf, "classes_inferred_", None))
    return meta, dict(module=clf.module_.state_dict(), optimizer=clf.optimizer_.state_dict(),
                      generator=clf.shuffle_generator_.get_state())


def _restore_torch(network, meta, tensors, device):
    hp = as_tuples(meta["hyperparameters"])
    hp["device"] = restore_device(hp["device"], device)
    clf = _build(network, None, **hp)
    clf.set_params(**{f"module__{k}": v for k, v in as_tuples(meta["inferred"]).items()})
    state = meta.get("state")
    if state is None:
        return clf
    clf.initialize()
    clf.module_.load_state_dict(tensors["module"])
    clf.optimizer_.load_state_dict(tensors["optimizer"])
    clf.shuffle_generator_.set_state(tensors["generator"].cpu())
    clf.history_ = History(state["history"])
    if state["in_shape"] is not None:
        clf.in_shape_ = tuple(state["in_shape"])
    if state["classes"] is not None:
        clf.classes_inferred_ = np.asarray(state["classes"])
    return clf


def _prepare_epochs(clf, epochs):
    """skorch's settings for training epoch by epoch (utils.train.train_epochs), also for a restored net."""
    clf.set_params(max_epochs=epochs, callbacks__print_log=None)   # one line per epoch there instead
    if any(name == "lr_schedule" for name, _ in clf.callbacks or []):   # cosine to 0 at `epochs`, also resumed
        clf.set_params(callbacks__lr_schedule__T_max=epochs)
    if clf.initialized_:   # a restored net: its callbacks again, without the epoch table
        clf.initialize_callbacks()


def _train_epoch(clf, X, y, classes=None):
    """One more epoch from where training stopped; returns its training loss."""
    clf.partial_fit(X, y, epochs=1)
    if "train_loss" not in clf.history[-1]:   # skorch ends an epoch quietly on Ctrl-C
        raise KeyboardInterrupt
    return float(clf.history[-1, "train_loss"])


def _common_args(args, rule):
    return dict(lr=args.lr or COMMON_DEFAULTS["lr"], rule=rule, lr_schedule=args.lr_schedule or "constant")


def _mlp_args(rule, args, n_examples=None):
    """(batch size, make_classifier's arguments) of the MLP from the command line (utils.train)."""
    model = dict(_common_args(args, args.rule or rule or "backprop"),
                 hidden_sizes=tuple(args.n_hidden or MLP_DEFAULTS["hidden_sizes"]))
    return args.batch_size or COMMON_DEFAULTS["batch_size"], model


def _cnn_args(rule, args, n_examples=None):
    """(batch size, make_classifier's arguments) of the CNN from the command line; ValueError for its kernels."""
    channels = tuple(args.channels or CNN_DEFAULTS["channels"])
    kernels = tuple(args.kernel_sizes or CNN_DEFAULTS["kernel_sizes"][:1])
    if len(kernels) not in (1, len(channels)):
        raise ValueError(f"--kernel-sizes: give one for all {len(channels)} blocks or one per block, not "
                         f"{len(kernels)}")
    model = dict(_common_args(args, args.rule or rule or "backprop"), channels=channels,
                 kernel_sizes=kernels * (len(channels) // len(kernels)), stride=CNN_DEFAULTS["stride"],
                 padding=CNN_DEFAULTS["padding"])
    return args.batch_size or COMMON_DEFAULTS["batch_size"], model


DESCRIPTIONS = {   # network -> (reference, to_hyperparameters, check, command line, its options)
    "mlp": (_mlp_reference, _mlp_hyperparameters, _mlp_check, _mlp_args, {"n_hidden"}),
    "cnn": (_cnn_reference, _cnn_hyperparameters, _cnn_check, _cnn_args, {"channels", "kernel_sizes"}),
}
COMMON_OPTIONS = {"lr", "lr_schedule", "normalize", "rule"}


def _register(network, rule):
    reference, to_hp, check, from_args, options = DESCRIPTIONS[network]
    module = NETWORKS[network][0]
    own = RULE_SPACES.get(rule, {})
    return register(Kind(
        name=network if rule is None else f"{network}-{rule}", network=network, rule=rule,
        learning=rule or "backprop",
        build=functools.partial(_build, network, rule), space={**SPACES[network], **own}, rule_space=own,
        owns=lambda est: isinstance(est, TorchClassifier) and est.module is module,
        reference=functools.partial(reference, rule, own), to_hyperparameters=functools.partial(to_hp, own),
        check=check, accepts=lambda: {"max_epochs", "seed", "device", "verbose"},
        save_state=functools.partial(_torch_state, network), restore=functools.partial(_restore_torch, network),
        prepare_epochs=_prepare_epochs, train_epoch=_train_epoch,
        cli_options=frozenset(options | COMMON_OPTIONS), from_args=functools.partial(from_args, rule)), __name__)


for _network in NETWORKS:
    _register(_network, None)
for _network in NETWORKS:
    for _rule in rules_for(_network)[1:]:   # backprop is the network's own
        _register(_network, _rule)
