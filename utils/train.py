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
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback

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


class EpochProgress(Callback):
    """A tqdm bar over all training batches of a fit, with the running loss."""

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        from tqdm.auto import tqdm
        n_batches = math.ceil(len(X) / net.batch_size) if net.batch_size > 0 else 1
        self.bar_ = tqdm(total=n_batches * net.max_epochs, desc=type(net.module_).__name__, unit="batch",
                         leave=False)

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

    def fit(self, X, y=None, **fit_params):
        if isinstance(X, torch.Tensor):  # the module's input size comes from the data
            shape = tuple(X.shape[1:])
            key = "module__in_features" if self.module is MLP else "module__in_shape"
            value = math.prod(shape) if self.module is MLP else shape
            if getattr(self, key, None) != value:
                self.set_params(**{key: value})
        return super().fit(X, y, **fit_params)

    def score(self, X, y, sample_weight=None):
        """Accuracy; labels may be a tensor on any device (scikit-learn's metric needs them on the host)."""
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
        return super().score(X, y, sample_weight=sample_weight)

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
    kernel_sizes, stride, padding (CNN); n_classes is inferred from y. `logger` (a utils.logger.TrainingLogger) is
    attached as a skorch callback or as the compartmental network's hook.
    """
    kind, rule = split_model(kind)   # "mlp-fa": the MLP learning by feedback alignment (utils.rules)
    if rule is not None:
        hyperparameters.setdefault("rule", rule)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if kind == "compartmental":
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
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold
    y_np = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = []
    for train_idx, test_idx in splitter.split(np.zeros(len(y_np)), y_np):
        to = (lambda i: torch.as_tensor(i, device=X.device)) if isinstance(X, torch.Tensor) else (lambda i: i)
        splits.append((to(train_idx), to(test_idx)))
    models = [clone(estimator) for _ in splits]
    if isinstance(estimator, CompartmentalClassifier):   # the folds train side by side as one population
        fit_population(models, [(X[tr], y[tr]) for tr, _ in splits])
    else:
        for model, (tr, _) in zip(models, splits):
            model.fit(X[tr], y[tr])
    return np.array([float(model.score(X[te], y[te])) for model, (_, te) in zip(models, splits)])


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
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=2, default=str))
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Train one model on one dataset and print its test accuracy.")
    p.add_argument("--model", default="cnn", choices=KINDS)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion", "cifar10"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="folder holding the datasets (default: $BIODL_DATA or ./data)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--subset", type=int, default=None, help="train on a stratified subset of this many examples")
    p.add_argument("--save", default=None, help="checkpoint name under models/")
    p.add_argument("--dry-run", action="store_true", help="1 epoch on 1,000 examples: checks that everything runs")
    args = p.parse_args(argv)

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
    hp = {"max_epochs": epochs, "seed": args.seed, "device": args.device, "verbose": 1}
    if args.batch_size:
        hp["batch_size"] = args.batch_size
    if args.lr:
        hp["lr"] = args.lr
    if args.model == "compartmental" and args.lr:  # it has per-layer rates, no lr
        raise SystemExit("error: --lr does not apply to the compartmental network (it has per-layer f_etas)")
    clf = make_classifier(args.model, **hp)
    print(f"{args.model} on {args.dataset}: {len(y)} training examples, {epochs} epochs, device {X.device}")
    t1 = time.time()
    clf.fit(X, y)
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
