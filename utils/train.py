"""Training: one estimator factory for every kind of model, cross-validation, checkpoints and a command line.

    python -m utils.train --model cnn --dataset mnist --epochs 10          # trains, prints test accuracy
    python -m utils.train --model mlp --dataset fashion --dry-run          # seconds: a tiny subset, one epoch

    from utils.train import make_classifier, cross_validate
    clf = make_classifier("mlp", hidden_sizes=(500,), lr=1e-3, batch_size=100, max_epochs=10, seed=0)
    scores = cross_validate(clf, ds.X_train, ds.y_train, folds=3)        # per-fold accuracies

The backprop nets are skorch classifiers whose batches are slices of a random permutation of tensors that already
live on the device (no Dataset indexing per example, no DataLoader workers).
"""
import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback, PrintLog

from utils.compartmental import CompartmentalClassifier, fit_population
from utils.errors import TrainingDiverged
from utils.models import CNN, MLP
from utils.rules import split_model

KINDS = ("mlp", "cnn", "compartmental")

# ----------------------------------------------------------------------------------------------------------------
# defaults of the backprop nets (the Bayesian optimization searches around them)
COMMON_DEFAULTS = dict(
    lr=1e-3,          # Adam learning rate
    batch_size=100,   # examples per update
    max_epochs=10,    # passes over the training data
    seed=0,           # weights and batch order
    device=None,      # None: the GPU when there is one, else the CPU
    verbose=0,        # 0: silent; 1: a progress bar and skorch's epoch table
    lr_schedule=None, # None: constant lr; "cosine": cosine annealing from lr to 0 over max_epochs (per epoch)
)
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


class EpochProgress(Callback):
    """A tqdm bar over all training batches of a fit, with the running loss (only when interactive())."""

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        from tqdm.auto import tqdm
        n_batches = math.ceil(len(X) / net.batch_size) if net.batch_size > 0 else 1
        self.bar_ = tqdm(total=n_batches * net.max_epochs, desc=type(net.module_).__name__, unit="batch",
                         leave=False, disable=not interactive())

    def on_batch_end(self, net, training=None, **kwargs):
        if training:
            self.bar_.update(1)

    def on_epoch_end(self, net, **kwargs):
        self.bar_.set_postfix(epoch=len(net.history), loss=f"{net.history[-1, 'train_loss']:.4f}")

    def on_train_end(self, net, **kwargs):
        self.bar_.close()


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

    def fit(self, X, y=None, **fit_params):
        """Fit on X (images or feature rows: tensors or numpy arrays, see as_inputs) and integer labels y; the
        input size and the number of classes (largest label + 1) come from the data."""
        check_common_hyperparameters({"lr": self.lr, "batch_size": self.batch_size, "max_epochs": self.max_epochs})
        X = self._inputs(X)
        y = as_labels(y, len(X), X.device)
        n_classes = int(y.max()) + 1
        if n_classes < 2:
            raise ValueError("y holds only the class 0; a classifier needs at least two classes")
        shape = tuple(X.shape[1:])
        key = "module__in_features" if self.module is MLP else "module__in_shape"
        wanted = {key: math.prod(shape) if self.module is MLP else shape, "module__n_classes": n_classes}
        changed = {k: v for k, v in wanted.items() if getattr(self, k, None) != v}
        if changed:
            self.set_params(**changed)
        self.in_shape_ = shape
        return super().fit(X, y, **fit_params)

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


def make_classifier(kind, logger=None, **hyperparameters):
    """The one place that builds estimators: kind "mlp", "cnn" or "compartmental", with keyword hyperparameters.

    Backprop nets take lr, batch_size, max_epochs, seed, device, verbose, plus hidden_sizes (MLP) or channels,
    kernel_sizes, stride, padding (CNN). Their fit takes X as a tensor or numpy array of any real dtype (uint8 pixels
    are scaled to [0, 1]; the CNN wants N x C x H x W or N x H x W images) and y as integer labels 0..K-1; the input
    size and n_classes (largest label + 1) are inferred from them. Unusable values (lr <= 0, batch_size or max_epochs
    < 1, NaN in X, string labels, ...) raise a ValueError that names them. `logger` (a
    utils.logger.TrainingLogger) is attached as a skorch callback or as the compartmental network's hook.
    """
    kind, rule = split_model(kind)   # "mlp-fa": the MLP learning by feedback alignment (utils.rules)
    if rule is not None:
        hyperparameters.setdefault("rule", rule)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    check_common_hyperparameters(hyperparameters)
    if kind == "compartmental":
        valid = set(CompartmentalClassifier().get_params())
        unknown = set(hyperparameters) - valid
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for 'compartmental'"
                             f"{' (it has per-layer rates f_etas, no lr)' if 'lr' in unknown else ''}; valid: "
                             f"{sorted(valid - {'hook'})}")
        if logger is not None:
            hyperparameters["hook"] = logger
        return CompartmentalClassifier(**hyperparameters)
    arch = MLP_DEFAULTS if kind == "mlp" else CNN_DEFAULTS
    unknown = set(hyperparameters) - set(arch) - set(COMMON_DEFAULTS) - {"callbacks"}
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for {kind!r}; valid: "
                         f"{sorted(set(arch) | set(COMMON_DEFAULTS))}")
    hp = {**COMMON_DEFAULTS, **arch, **hyperparameters}
    from utils.data import get_device
    callbacks = list(hp.pop("callbacks", None) or [])
    if hp["verbose"]:
        callbacks.append(("progress", EpochProgress()))
    if logger is not None:
        callbacks.append(("logger", logger))
    schedule = hp.pop("lr_schedule")
    if schedule == "cosine":
        from skorch.callbacks import LRScheduler
        callbacks.append(("lr_schedule", LRScheduler(policy=torch.optim.lr_scheduler.CosineAnnealingLR,
                                                      T_max=int(hp["max_epochs"]))))
    elif schedule is not None:
        raise ValueError(f"unknown lr_schedule {schedule!r}; valid: None (constant) or 'cosine'")
    module_params = {f"module__{k}": tuple(v) if isinstance(v, list) else v for k, v in hp.items() if k in arch}
    return TorchClassifier(
        MLP if kind == "mlp" else CNN,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=hp["lr"], batch_size=int(hp["batch_size"]), max_epochs=int(hp["max_epochs"]), seed=hp["seed"],
        device=str(get_device(hp["device"])), verbose=hp["verbose"],
        train_split=None,  # all of X trains; validation is cross_validate's and the logger's business
        callbacks=callbacks or None,
        **module_params)


def cross_validate(estimator, X, y, folds=3, seed=0):
    """Per-fold test accuracies (numpy array) of a fresh clone of `estimator` under StratifiedKFold(folds)."""
    return cross_validate_many([estimator], X, y, folds=folds, seed=seed)[0]


def cross_validate_many(estimators, X, y, folds=3, seed=0):
    """Per-fold test accuracies (estimators x folds array) of fresh clones of each estimator on the same
    StratifiedKFold(folds) splits. Compartmental estimators and their folds train side by side as one population
    (fit_population: they must share its structure)."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold
    y_np = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = []
    for train_idx, test_idx in splitter.split(np.zeros(len(y_np)), y_np):
        to = (lambda i: torch.as_tensor(i, device=X.device)) if isinstance(X, torch.Tensor) else (lambda i: i)
        splits.append((to(train_idx), to(test_idx)))
    pairs = [(clone(est), tr, te) for est in estimators for tr, te in splits]
    if all(isinstance(est, CompartmentalClassifier) for est in estimators):
        fit_population([m for m, _, _ in pairs], [(X[tr], y[tr]) for _, tr, _ in pairs])
    else:
        for model, tr, _ in pairs:
            model.fit(X[tr], y[tr])
    scores = [float(model.score(X[te], y[te])) for model, _, te in pairs]
    return np.array(scores).reshape(len(estimators), folds)


def train_logged(kind, X, y, X_valid=None, y_valid=None, run_dir=None, name=None, records_per_epoch=10,
                 max_valid=None, config=None, **hyperparameters):
    """Fit make_classifier(kind, **hyperparameters) with a TrainingLogger validating on (X_valid, y_valid).

    The run is saved to `run_dir` (config.json with every hyperparameter, `config` and library versions, plus
    records.csv) when given. `max_valid`: validation examples per record (None: the logger's default). Returns
    (estimator, logger).
    """
    from utils.logger import TrainingLogger
    extra = {} if max_valid is None else {"max_valid": max_valid}
    logger = TrainingLogger(X_valid, y_valid, records_per_epoch=records_per_epoch, name=name or kind, **extra)
    clf = make_classifier(kind, logger=logger, **hyperparameters)
    t = time.perf_counter()
    clf.fit(X, y)
    if run_dir is not None:
        params = {k: v for k, v in clf.get_params().items()
                  if not k.startswith("callbacks") and k not in ("hook", "module", "criterion", "optimizer")}
        logger.save(run_dir, config={"model": kind, **(config or {}), "n_train": len(y),
                                     "fit_seconds": time.perf_counter() - t, "hyperparameters": params})
    return clf, logger


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: the pickled estimator (weights included) and a JSON sidecar with its configuration


def atomic_save(obj, path):
    """torch.save through a temporary file, so that an interrupted save never leaves a half-written file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(estimator, name, directory="models", config=None):
    """Save `estimator` to directory/name.pt and its configuration to directory/name.json; returns the .pt path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pt"
    atomic_save(estimator, path)
    params = {k: v for k, v in estimator.get_params().items() if not k.startswith("callbacks") and k != "hook"}
    meta = {"estimator": type(estimator).__name__, "params": params, "config": config or {},
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    from utils.logger import _jsonable  # plain JSON: NaN and infinities as strings, never bare NaN / Infinity
    (directory / f"{name}.json").write_text(json.dumps(_jsonable(meta), indent=2, allow_nan=False))
    return path


def load_checkpoint(name, directory="models", device=None):
    """The estimator saved by save_checkpoint (tensors mapped to `device`, default: CPU when there is no GPU)."""
    path = Path(directory) / f"{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}; saved ones: "
                                f"{sorted(p.stem for p in Path(directory).glob('*.pt')) or 'none'}")
    from utils.data import get_device
    return torch.load(path, map_location=get_device(device), weights_only=False)


# ----------------------------------------------------------------------------------------------------------------
# command line


def _positive(kind):
    """An argparse type: a number of `kind` (int or float) above zero, else a clear usage error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: ...)" to every option whose help does not already say it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser():
    """The command line of `python -m utils.train` (every option with its help and default)."""
    bs = COMMON_DEFAULTS["batch_size"]
    comp_bs = CompartmentalClassifier().get_params()["batch_size"]
    p = argparse.ArgumentParser(
        prog="python -m utils.train", formatter_class=_HelpWithDefaults,
        description="Train one model on the training split of one dataset and print its test accuracy.",
        epilog="The Bayesian optimization study has its own command, python -m utils.bayes_opt; the notebooks load "
               "the finished full studies from logs/full.")
    p.add_argument("--model", default="cnn", choices=KINDS, help="the model kind")
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion", "cifar10"), help="the dataset")
    p.add_argument("--epochs", type=_positive(int), default=10, help="passes over the training data")
    p.add_argument("--batch-size", type=_positive(int), default=None,
                   help=f"examples per update (default: the model's own, {bs} for the MLP and CNN, {comp_bs} for "
                        f"the compartmental network)")
    p.add_argument("--lr", type=_positive(float), default=None,
                   help=f"Adam learning rate of the MLP and CNN (default: {COMMON_DEFAULTS['lr']}); the "
                        f"compartmental network has per-layer rates instead")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weights, batch order and subsets")
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $BIODL_DATA, else ./data)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--subset", type=_positive(int), default=None,
                   help="train on a stratified subset of this many examples (default: the whole training split)")
    p.add_argument("--save", default=None, help="checkpoint name: writes models/NAME.pt and models/NAME.json")
    p.add_argument("--dry-run", action="store_true", help="1 epoch on 1,000 examples: checks that everything runs")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.model == "compartmental" and args.lr is not None:  # it has per-layer rates, no lr
        p.error("--lr does not apply to the compartmental network (it has per-layer rates, f_etas)")

    from utils.data import load_dataset, stratified_subset
    t0 = time.time()
    try:
        ds = load_dataset(args.dataset, root=args.data_root, device=args.device)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    X, y, X_test, y_test = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    subset, epochs = (1000, 1) if args.dry_run else (args.subset, args.epochs)
    if subset:
        X, y = stratified_subset(X, y, subset, seed=args.seed)
        X_test, y_test = stratified_subset(X_test, y_test, max(subset // 5, 200), seed=args.seed)
    # verbose: skorch's epoch table (colourless unless at a terminal) and progress bars (only when interactive)
    verbose = int(args.model != "compartmental" or interactive())
    hp = {"max_epochs": epochs, "seed": args.seed, "device": args.device, "verbose": verbose}
    if args.batch_size is not None:
        hp["batch_size"] = args.batch_size
    if args.lr is not None:
        hp["lr"] = args.lr
    print(f"{args.model} on {args.dataset}: {len(y)} training examples, {epochs} epoch{'s' * (epochs != 1)}, "
          f"device {X.device}")
    t1 = time.time()
    try:
        clf = make_classifier(args.model, **hp).fit(X, y)
    except (ValueError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")
    t2 = time.time()
    acc = clf.score(X_test, y_test)
    print(f"test accuracy {100 * acc:.2f} % on {len(y_test)} examples (training {t2 - t1:.1f} s, "
          f"total {time.time() - t0:.1f} s)")
    if args.save:
        print("saved", save_checkpoint(clf, args.save, config={"model": args.model, "dataset": args.dataset,
                                                                "epochs": epochs, "test_accuracy": acc}))
    return acc


if __name__ == "__main__":
    main()
