"""Training: cross-validation, logged runs, and the one command line that trains any model for many epochs.

    python -m utils.train --model cnn --dataset mnist --epochs 10          # trains, prints test accuracy per epoch
    python -m utils.train --model compartmental --batch-size 16 --epochs 60 --test-every-epochs 10   # the paper's
    python -m utils.train ... --resume                # after an interruption: same arguments, from the last checkpoint
    python -m utils.train --model mlp --dataset blobs --epochs 3          # a tiny separable problem, no data files

    from utils.train import make_classifier, cross_validate, train_epochs
    clf = make_classifier("mlp", hidden_sizes=(500,), lr=1e-3, batch_size=100, max_epochs=10, seed=0)
    scores = cross_validate(clf, ds.X_train, ds.y_train, folds=3)        # per-fold accuracies

A run (train_epochs) trains epoch by epoch, tests on the official test split every --test-every-epochs epochs and at
the end, and after every epoch writes its record (runs/NAME.json: configuration, library versions, per-epoch
training time and loss, test errors, wall time) and a checkpoint (runs/NAME.ckpt.pt, utils.checkpoint: weights,
optimizer, data order, record), both atomically, so --resume loses at most one epoch and continues the data order
as if never interrupted. Estimators: utils.classifiers; checkpoints: utils.checkpoint (both re-exported here).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from utils.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint,  # noqa: F401
                              write_checkpoint)
from utils.classifiers import (CNN_DEFAULTS, COMMON_DEFAULTS, KINDS, MLP_DEFAULTS, DeviceBatches,  # noqa: F401
                               PlainPrintLog, TorchClassifier, as_inputs, as_labels, check_common_hyperparameters,
                               interactive, make_classifier)
from utils.compartmental import PAPER_F_ETAS, CompartmentalClassifier, batch_f_etas, fit_population
from utils.data import Dataset, get_device, load_dataset, stratified_subset
from utils.errors import InsufficientMemory, TrainingDiverged
from utils.io import jsonable, library_versions, write_json
from utils.logger import TrainingLogger

DATASETS = ("mnist", "fashion", "cifar10", "blobs")
RUN_FREE = ("epochs", "test_every_epochs", "max_minutes", "threads", "device")   # may change on --resume


# ----------------------------------------------------------------------------------------------------------------
# cross-validation and logged runs


def cross_validate(estimator, X, y, folds=3, seed=0):
    """Per-fold test accuracies (numpy array) of a fresh clone of `estimator` under StratifiedKFold(folds)."""
    return cross_validate_many([estimator], X, y, folds=folds, seed=seed)[0]


def cross_validate_many(estimators, X, y, folds=3, seed=0):
    """Per-fold test accuracies (estimators x folds array) of fresh clones of each estimator on the same
    StratifiedKFold(folds) splits. Compartmental estimators and their folds train side by side as one population
    (fit_population: they must share its structure)."""
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
# runs of many epochs: a record and a checkpoint after every epoch, --resume


class ResumeError(ValueError):
    """--resume found a checkpoint of another run."""


def train_epochs(clf, X, y, X_test, y_test, epochs, test_every=1, out=None, config=None, resume=False,
                 max_minutes=None, classes=None, log=print):
    """Train `clf` (from make_classifier, not yet fitted) epoch by epoch up to `epochs`; returns (clf, record).

    The test split is scored after every `test_every`-th epoch and the last. With `out` (a .json path) the record
    is written there and the checkpoint to out.ckpt.pt after every epoch (atomically); `resume` continues from that
    checkpoint (ResumeError when it holds another `config`, RUN_FREE keys aside). `max_minutes`: stop at the first
    test after this much wall time (the record says finished=False; --resume goes on). `classes`: every label
    (compartmental; default: those in y)."""
    out = Path(out) if out is not None else None
    ckpt = out.with_suffix(".ckpt.pt") if out is not None else None
    record = dict(kind="train", config=jsonable(config or {}), versions=library_versions(X.device), epochs=[],
                  curve=[], finished=False, wall_s=0.0, train_s=0.0, test_accuracy=None)
    if resume and ckpt is not None and ckpt.exists():
        try:
            saved, meta = read_checkpoint(ckpt, device=X.device)
        except CheckpointError as e:
            raise ResumeError(f"--resume: {e}; delete it, or leave out --resume, to start afresh") from None
        same = lambda c: {k: v for k, v in c.items() if k not in RUN_FREE}   # noqa: E731
        if same(meta["config"]) != same(record["config"]):
            raise ResumeError(f"--resume: {ckpt} was saved with a different configuration:\n  {meta['config']}\n"
                              f"rerun with the same arguments, or without --resume (or another --out) to start afresh")
        clf, versions = saved, record["versions"]
        record = {**meta["extra"]["record"], "config": record["config"]}
        record["finished"] = len(record["epochs"]) >= epochs
        record.pop("stopped", None)
        record.setdefault("resumed", []).append(dict(after_epoch=len(record["epochs"]), versions=versions))
        log(f"resuming from {ckpt} after epoch {len(record['epochs'])}")
    elif resume:
        log(f"--resume: no checkpoint {ckpt} yet, starting afresh")
    compartmental = isinstance(clf, CompartmentalClassifier)
    if compartmental and classes is None:
        classes = np.unique(y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
    if not compartmental:
        clf.set_params(max_epochs=epochs, callbacks__print_log=None)   # one line per epoch below instead
        if clf.initialized_:   # a restored net: its callbacks again, without the epoch table
            clf.initialize_callbacks()
    t0 = time.perf_counter() - record["wall_s"]
    for epoch in range(len(record["epochs"]) + 1, epochs + 1):
        t = time.perf_counter()
        if compartmental:
            clf.partial_fit(X, y, classes=classes)
        else:
            clf.partial_fit(X, y, epochs=1)
            if "train_loss" not in clf.history[-1]:   # skorch ends an epoch quietly on Ctrl-C
                raise KeyboardInterrupt
        entry = dict(epoch=epoch, train_s=time.perf_counter() - t,
                     train_loss=None if compartmental else float(clf.history[-1, "train_loss"]))
        record["train_s"] += entry["train_s"]
        tested = epoch % test_every == 0 or epoch == epochs
        if tested:
            acc = float(clf.score(X_test, y_test))
            entry.update(test_accuracy=acc, test_error=100 * (1 - acc))
        entry["wall_s"] = time.perf_counter() - t0
        record["epochs"].append(entry)
        record.update(wall_s=entry["wall_s"], finished=epoch == epochs)
        if tested:
            record["test_accuracy"] = entry["test_accuracy"]
            record["curve"].append(dict(epoch=epoch, test_error=entry["test_error"], test_accuracy=acc,
                                        wall_s=entry["wall_s"], train_wall_s=record["train_s"]))
        stop = tested and not record["finished"] and max_minutes and entry["wall_s"] > 60 * max_minutes
        if stop:
            record["stopped"] = f"max_minutes={max_minutes} reached after epoch {epoch}"
        if out is not None:
            write_checkpoint(ckpt, clf, config=record["config"], extra=dict(record=record))
            write_json(out, record)
        loss = "" if entry["train_loss"] is None else f"train_loss {entry['train_loss']:.4f}, "
        test = f"; test accuracy {100 * acc:.2f} % (error {entry['test_error']:.2f} %)" if tested else ""
        log(f"epoch {epoch}/{epochs}: {loss}{entry['train_s']:.1f} s{test}, wall {entry['wall_s']:.0f} s")
        if stop:
            log(f"stopping after epoch {epoch}: {max_minutes} minutes reached (--resume continues)")
            break
    return clf, record


def synthetic_dataset(n_train=1000, n_test=500, device=None):
    """A separable 10-class problem shaped like 1 x 8 x 8 images (noisy copies of 10 random images), for checks
    without data files."""
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(10, 1, 8, 8, generator=g)
    y = torch.arange(n_train + n_test) % 10
    X = (centers[y] + 0.15 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 1)
    X, y = X.to(get_device(device)), y.to(get_device(device))
    return Dataset(X[:n_train], y[:n_train], X[n_train:], y[n_train:], [str(c) for c in range(10)])


def default_f_etas(n_hidden, batch_size):
    """The paper's rates for len(n_hidden) hidden layers, scaled for batches (utils.compartmental.batch_f_etas)."""
    if len(n_hidden) not in PAPER_F_ETAS:
        raise ValueError(f"the paper gives rates for {' or '.join(map(str, PAPER_F_ETAS))} hidden layers, not "
                         f"{len(n_hidden)}; give them with --f-etas (one per hidden layer and one for the output)")
    return batch_f_etas(batch_size, PAPER_F_ETAS[len(n_hidden)])


# ----------------------------------------------------------------------------------------------------------------
# command line


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
        description="Train one model on the training split of one dataset for many epochs, testing on the test "
                    "split; a JSON record and a checkpoint after every epoch (--out), --resume after an interruption.",
        epilog="The Bayesian optimization study has its own command, python -m utils.study; the notebooks load "
               "the finished full studies from logs/full.")
    p.add_argument("--model", default="cnn", choices=KINDS, help="the model kind")
    p.add_argument("--dataset", default="mnist", choices=DATASETS,
                   help="the dataset (blobs: a tiny separable synthetic problem, no data files)")
    p.add_argument("--epochs", type=_positive(int), default=10, help="passes over the training data")
    p.add_argument("--test-every-epochs", type=_positive(int), default=1, metavar="N",
                   help="test on the test split after every Nth epoch and after the last")
    p.add_argument("--batch-size", type=_positive(int), default=None,
                   help=f"examples per update (default: the model's own, {bs} for the MLP and CNN, {comp_bs} for "
                        f"the compartmental network)")
    p.add_argument("--lr", type=_positive(float), default=None,
                   help=f"Adam learning rate of the MLP and CNN (default: {COMMON_DEFAULTS['lr']}); the "
                        f"compartmental network has per-layer rates instead")
    p.add_argument("--n-hidden", type=_positive(int), nargs="+", default=None,
                   help="hidden layer sizes of the MLP or the compartmental network (default: 500)")
    p.add_argument("--f-etas", type=_positive(float), nargs="+", default=None,
                   help="compartmental: forward rates, one per hidden layer and one for the output (default: the "
                        "paper's, scaled for the batch size: utils.compartmental.batch_f_etas)")
    p.add_argument("--lr-decay-epochs", type=_positive(float), default=None,
                   help="compartmental: cosine decay of every rate to 0 over this many epochs (default: constant, "
                        "the paper)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weights, batch order and subsets")
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $BIODL_DATA, else ./data)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--subset", type=_positive(int), default=None,
                   help="train on a stratified subset of this many examples (default: the whole training split)")
    p.add_argument("--test-subset", type=_positive(int), default=None,
                   help="test on a stratified subset of this many examples (default: the whole test split)")
    p.add_argument("--out", default=None, help="the run's JSON record, with its checkpoint beside it (.ckpt.pt) "
                   "(default: runs/MODEL_DATASET_bBATCH_sSEED.json; none for --dry-run)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out (same arguments; "
                   "--epochs may grow); without it a run starts afresh")
    p.add_argument("--max-minutes", type=_positive(float), default=None,
                   help="stop at the first test after this many minutes of wall time (--resume goes on)")
    p.add_argument("--save", default=None, help="checkpoint name: writes models/NAME.pt and models/NAME.json")
    p.add_argument("--dry-run", action="store_true", help="1 epoch on 1,000 examples: checks that everything runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar per epoch on stderr when "
                   "it is a terminal)")
    return p


def main(argv=None):
    """Parse the command line, train, print the test accuracy per test and at the end; returns the last one."""
    p = parser()
    args = p.parse_args(argv)
    comp = args.model == "compartmental"
    if comp and args.lr is not None:  # it has per-layer rates, no lr
        p.error("--lr does not apply to the compartmental network (it has per-layer rates, f_etas)")
    for option in ("f_etas", "lr_decay_epochs"):
        if not comp and getattr(args, option) is not None:
            p.error(f"--{option.replace('_', '-')} applies to the compartmental network only")
    if args.model == "cnn" and args.n_hidden is not None:
        p.error("--n-hidden applies to the MLP and the compartmental network (the CNN has channels)")
    batch_size = args.batch_size or (CompartmentalClassifier().batch_size if comp else COMMON_DEFAULTS["batch_size"])
    n_hidden = tuple(args.n_hidden or (500,))
    try:
        f_etas = tuple(args.f_etas) if args.f_etas else default_f_etas(n_hidden, batch_size) if comp else None
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    try:
        ds = synthetic_dataset(device=args.device) if args.dataset == "blobs" else \
            load_dataset(args.dataset, root=args.data_root, device=args.device)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    X, y, X_test, y_test = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    subset, test_subset = (1000, 200) if args.dry_run else (args.subset, args.test_subset)
    epochs = 1 if args.dry_run else args.epochs
    if subset and subset < len(y):
        X, y = stratified_subset(X, y, subset, seed=args.seed)
    if test_subset and test_subset < len(y_test):
        X_test, y_test = stratified_subset(X_test, y_test, test_subset, seed=args.seed)

    hp = {"max_epochs": epochs, "seed": args.seed, "device": args.device, "batch_size": batch_size,
          "verbose": int(interactive() and not args.quiet)}   # progress bars only where someone watches them
    if comp:
        decay = round(args.lr_decay_epochs * len(y)) if args.lr_decay_epochs else None
        model = dict(n_hidden=n_hidden, f_etas=f_etas, lr_decay_examples=decay)
    else:
        model = {"lr": args.lr or COMMON_DEFAULTS["lr"], **({"hidden_sizes": n_hidden} if args.model == "mlp" else {})}
    config = dict(model=args.model, dataset=args.dataset, n_train=len(y), n_test=len(y_test), epochs=epochs,
                  test_every_epochs=args.test_every_epochs, batch_size=batch_size, seed=args.seed,
                  **{k: v for k, v in model.items() if k != "lr_decay_examples"},
                  **({"lr_decay_epochs": args.lr_decay_epochs} if comp else {}),
                  threads=torch.get_num_threads(), device=str(X.device))
    out = args.out or (None if args.dry_run else
                       f"runs/{args.model}_{args.dataset}_b{batch_size}_s{args.seed}.json")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    print(f"{args.model} on {args.dataset}: {len(y)} training examples, {epochs} epoch{'s' * (epochs != 1)}, "
          f"device {X.device}" + (f", f_etas {f_etas}" if comp else ""), flush=True)
    try:
        clf = make_classifier(args.model, **hp, **model)
        clf, record = train_epochs(clf, X, y, X_test, y_test, epochs, test_every=args.test_every_epochs, out=out,
                                   config=config, resume=args.resume, max_minutes=args.max_minutes,
                                   classes=np.arange(len(ds.classes)) if comp else None,
                                   log=lambda line: print(line, flush=True))
    except (ValueError, TrainingDiverged, InsufficientMemory) as e:
        sys.exit(f"error: {e}")
    acc = record["test_accuracy"]
    print(f"test accuracy {100 * acc:.2f} % on {len(y_test)} examples after {len(record['epochs'])} epochs "
          f"(training {record['train_s']:.1f} s, total {time.time() - t0:.1f} s)" + (f"; record {out}" if out else ""))
    if args.save:
        print("saved", save_checkpoint(clf, args.save, config={**config, "test_accuracy": acc}))
    return acc


if __name__ == "__main__":
    main()
