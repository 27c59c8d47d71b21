"""Training: logged runs, and the one command line that trains any model for many epochs.

    python -m utils.train --model cnn --dataset mnist --epochs 10          # trains, prints test accuracy per epoch
    python -m utils.train --model compartmental --batch-size 16 --epochs 60 --test-every-epochs 10   # the paper's
    python -m utils.train ... --resume                # after an interruption: same arguments, from the last checkpoint
    python -m utils.train --model mlp --dataset blobs --epochs 3          # a tiny separable problem, no data files
    python -m utils.train --model cnn --channels 32 64 128 --kernel-sizes 3 --lr-schedule cosine --normalize
    python -m utils.train --model mlp-fa --n-hidden 1000 1000 --quiet    # feedback alignment (or --rule fa), no bar

    from utils.classifiers import make_classifier
    from utils.train import EpochRun, train_epochs
    clf = make_classifier("mlp", hidden_sizes=(500,), lr=1e-3, batch_size=100, max_epochs=10, seed=0)
    clf, record = train_epochs(clf, X, y, X_test, y_test, EpochRun(epochs=10))   # cross-validation: utils.evaluation

A run (train_epochs) trains epoch by epoch, tests on the official test split every --test-every-epochs epochs and at
the end, and after every epoch writes its record (runs/NAME.json: configuration, library versions, per-epoch
training time and loss, test errors, wall time) and a checkpoint (runs/NAME.ckpt.pt, utils.checkpoint: weights,
optimizer, data order, record), both atomically, so --resume loses at most one epoch and continues the data order
as if never interrupted. A run holds runs/NAME.lock while it trains (a second run on the same --out is refused);
an --out or --save it could not write, and a run that would not fit in memory, are refused before training.
Estimators: utils.classifiers; checkpoints: utils.checkpoint.
"""
import argparse
import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.checkpoint import CheckpointError, checkpoint_path, read_checkpoint, save_checkpoint, write_checkpoint
from utils.classifiers import CNN_DEFAULTS, COMMON_DEFAULTS, LR_SCHEDULES, interactive, make_classifier
from utils.compartmental import CompartmentalClassifier
from utils.data import Dataset, get_device, load_dataset, standardized, stratified_subset
from utils.errors import InsufficientMemory, TrainingDiverged
from utils.io import file_lock, jsonable, library_versions, writable_folder, write_json
from utils.kinds import get_kind, kind_of, networks
from utils.logger import TrainingLogger
from utils.rules import RULES, rule_models, split_model

DATASETS = ("mnist", "fashion", "cifar10", "blobs")
RUN_FREE = ("epochs", "test_every_epochs", "max_minutes", "threads", "device")   # may change on --resume


# ----------------------------------------------------------------------------------------------------------------
# logged runs


@dataclasses.dataclass(frozen=True)
class LoggedRun:
    """How train_logged records a run: saved to `run_dir` (config.json with every hyperparameter, `config` and
    library versions, plus records.csv) when given; `name` of the logger (default: the kind); `records_per_epoch`;
    `max_valid`: validation examples per record (None: the logger's default)."""
    run_dir: object = None
    name: str = None
    records_per_epoch: int = 10
    max_valid: int = None
    config: dict = None


def train_logged(kind, X, y, X_valid=None, y_valid=None, run=LoggedRun(), **hyperparameters):
    """Fit make_classifier(kind, **hyperparameters) with a TrainingLogger validating on (X_valid, y_valid), recorded
    as `run` (a LoggedRun) says. Returns (estimator, logger)."""
    extra = {} if run.max_valid is None else {"max_valid": run.max_valid}
    logger = TrainingLogger(X_valid, y_valid, records_per_epoch=run.records_per_epoch, name=run.name or kind, **extra)
    clf = make_classifier(kind, logger=logger, **hyperparameters)
    t = time.perf_counter()
    clf.fit(X, y)
    if run.run_dir is not None:
        params = {k: v for k, v in clf.get_params().items()
                  if not k.startswith("callbacks") and k not in ("hook", "module", "criterion", "optimizer")}
        logger.save(run.run_dir, config={"model": kind, **(run.config or {}), "n_train": len(y),
                                         "fit_seconds": time.perf_counter() - t, "hyperparameters": params})
    return clf, logger




# ----------------------------------------------------------------------------------------------------------------
# runs of many epochs: a record and a checkpoint after every epoch, --resume


class ResumeError(ValueError):
    """--resume found a checkpoint of another run, or one it cannot read."""


class RunInUse(RuntimeError):
    """Another process is training into the same --out."""


@dataclasses.dataclass(frozen=True)
class EpochRun:
    """How train_epochs runs: up to `epochs`, the test split scored after every `test_every`-th epoch and the last.
    With `out` (a .json path) the record is written there and the checkpoint to out.ckpt.pt after every epoch
    (atomically), while the run holds the lock out.lock (RunInUse when another process holds it; a dead one's is
    gone); `resume` continues from that checkpoint (ResumeError when it holds another `config`, RUN_FREE keys
    aside). `max_minutes`: stop at the first test after this much wall time (the record says finished=False;
    --resume goes on). `classes`: every label (compartmental; default: those in y). `log`: takes each line."""
    epochs: int
    test_every: int = 1
    out: object = None
    config: dict = None
    resume: bool = False
    max_minutes: float = None
    classes: object = None
    log: object = print


def train_epochs(clf, X, y, X_test, y_test, run):
    """Train `clf` (from make_classifier, not yet fitted) epoch by epoch as `run` (an EpochRun) says; returns
    (clf, record)."""
    out = Path(run.out) if run.out is not None else None
    with _run_lock(out):
        return _train_epochs(clf, (X, y, X_test, y_test), dataclasses.replace(run, out=out))


def _run_lock(out):
    """The lock of the run whose record is `out` (out.lock beside it; nothing without `out`)."""
    if out is None:
        return contextlib.nullcontext()
    return file_lock(writable_folder(out.parent) / (out.stem + ".lock"), lambda holder: RunInUse(
        f"{out} is in use by another run ({holder}); two runs on one --out would overwrite each other's record and "
        f"checkpoint. Wait for it to finish or stop it, or use another --out"))


ADDED_DEFAULTS = jsonable(dict(rule="backprop", lr_schedule="constant", normalize=False, stride=1, padding=1,
                               channels=CNN_DEFAULTS["channels"], kernel_sizes=CNN_DEFAULTS["kernel_sizes"]))


def same_run(old, new):
    """Whether configurations `old` (a checkpoint's) and `new` describe the same run: equal but for RUN_FREE keys,
    and keys `old` predates (ADDED_DEFAULTS) at their defaults."""
    old, new = ({k: v for k, v in c.items() if k not in RUN_FREE} for c in (old, new))
    added = {k: new.pop(k) for k in set(new) - set(old) if k in ADDED_DEFAULTS}
    return old == new and all(ADDED_DEFAULTS[k] == v for k, v in added.items())


def _resume(ckpt, record, epochs, X, log):
    """(the estimator, the record) saved in `ckpt` to go on from; ResumeError when it is another run's or damaged."""
    try:
        clf, meta = read_checkpoint(ckpt, device=X.device)
    except CheckpointError as e:
        raise ResumeError(f"--resume: {e}; delete it, or leave out --resume, to start afresh") from None
    if not same_run(meta["config"], record["config"]):
        raise ResumeError(f"--resume: {ckpt} was saved with a different configuration:\n  {meta['config']}\n"
                          f"rerun with the same arguments, or without --resume (or another --out) to start afresh")
    versions = record["versions"]
    record = {**meta["extra"]["record"], "config": record["config"]}
    record["finished"] = len(record["epochs"]) >= epochs
    record.pop("stopped", None)
    record.setdefault("resumed", []).append(dict(after_epoch=len(record["epochs"]), versions=versions))
    log(f"resuming from {ckpt} after epoch {len(record['epochs'])}")
    return clf, record


def _train_epochs(clf, data, run):
    """train_epochs under its lock: `data` is (X, y, X_test, y_test), `run` the EpochRun (`out` a Path or None)."""
    X, y, X_test, y_test = data
    epochs, test_every, out, max_minutes, classes, log = (
        run.epochs, run.test_every, run.out, run.max_minutes, run.classes, run.log)
    ckpt = out.with_suffix(".ckpt.pt") if out is not None else None
    record = dict(kind="train", config=jsonable(run.config or {}), versions=library_versions(X.device), epochs=[],
                  curve=[], finished=False, wall_s=0.0, train_s=0.0, test_accuracy=None)
    if run.resume and ckpt is not None and ckpt.exists():
        clf, record = _resume(ckpt, record, epochs, X, log)
    elif run.resume:
        log(f"--resume: no checkpoint {ckpt} yet, starting afresh")
    if classes is None:
        classes = np.unique(y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
    kind = kind_of(clf)
    kind.prepare_epochs(clf, epochs)
    t0 = time.perf_counter() - record["wall_s"]
    for epoch in range(len(record["epochs"]) + 1, epochs + 1):
        t = time.perf_counter()
        loss = kind.train_epoch(clf, X, y, classes)
        entry = dict(epoch=epoch, train_s=time.perf_counter() - t, train_loss=loss)
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


def _architecture_options(p):
    """The options of the networks' structure and learning rates (each applies to some kinds only, _usage)."""
    p.add_argument("--n-hidden", type=_positive(int), nargs="+", default=None,
                   help="hidden layer sizes of the MLP or the compartmental network (default: 500)")
    p.add_argument("--channels", type=_positive(int), nargs="+", default=None,
                   help=f"CNN: channels of each convolution block (default: "
                        f"{' '.join(map(str, CNN_DEFAULTS['channels']))})")
    p.add_argument("--kernel-sizes", type=_positive(int), nargs="+", default=None,
                   help=f"CNN: kernel size of each block, or one for all (default: {CNN_DEFAULTS['kernel_sizes'][0]}; "
                        f"padding {CNN_DEFAULTS['padding']}, stride {CNN_DEFAULTS['stride']})")
    p.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                   help="MLP and CNN: the learning rate constant, or decayed to 0 over --epochs on a cosine (default: "
                        "constant)")
    p.add_argument("--normalize", action="store_true", default=None,
                   help="MLP and CNN: standardize every input channel by the training split's mean and deviation "
                        "(default: pixels in [0, 1], which the compartmental network takes as rates)")
    p.add_argument("--f-etas", type=_positive(float), nargs="+", default=None,
                   help="compartmental: forward rates, one per hidden layer and one for the output (default: the "
                        "paper's, scaled for the batch size: utils.compartmental.batch_f_etas)")
    p.add_argument("--lr-decay-epochs", type=_positive(float), default=None,
                   help="compartmental: cosine decay of every rate to 0 over this many epochs (default: constant, "
                        "the paper)")


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
    p.add_argument("--model", default="cnn", choices=networks() + tuple(rule_models()),
                   help="the model kind; mlp-fa, cnn-sign, ...: the MLP or CNN learning by that rule")
    p.add_argument("--rule", default=None, choices=RULES,
                   help="the learning rule of the MLP or CNN (utils.rules; default: backprop)")
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
    _architecture_options(p)
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weights, batch order and subsets")
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $BIODL_DATA, else ./data)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--subset", type=_positive(int), default=None,
                   help="train on a stratified subset of this many examples (default: the whole training split)")
    p.add_argument("--test-subset", type=_positive(int), default=None,
                   help="test on a stratified subset of this many examples (default: the whole test split)")
    p.add_argument("--out", default=None, help="the run's JSON record, with its checkpoint (.ckpt.pt) and its lock "
                   "(.lock: one run at a time) beside it (default: runs/MODEL_DATASET_bBATCH_sSEED.json; none for "
                   "--dry-run)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out (same arguments; "
                   "--epochs may grow); without it a run starts afresh")
    p.add_argument("--max-minutes", type=_positive(float), default=None,
                   help="stop at the first test after this many minutes of wall time (--resume goes on)")
    p.add_argument("--save", default=None, help="checkpoint name: writes models/NAME.pt and models/NAME.json "
                   "(NAME stays inside models/)")
    p.add_argument("--dry-run", action="store_true", help="1 epoch on 1,000 examples: checks that everything runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar per epoch on stderr when "
                   "it is a terminal)")
    return p


KIND_OPTIONS = ("f_etas", "lr_decay_epochs", "lr_schedule", "normalize", "channels", "kernel_sizes", "n_hidden")


def _usage(p, args):
    """p.error for options that do not apply to the model; returns (its Kind, the rule)."""
    kind, (network, rule) = get_kind(args.model), split_model(args.model)
    if args.rule is not None and rule is not None and args.rule != rule:
        p.error(f"--model {args.model} learns by {rule}, --rule says {args.rule}: give the rule once")
    rule = args.rule or rule or "backprop"
    having = {option: [k for k in networks() if option in get_kind(k).cli_options]
              for option in ("lr", "rule", *KIND_OPTIONS)}
    why = lambda option: kind.cli_refusals.get(option, f"the {' and the '.join(having[option])} only")  # noqa: E731
    if args.lr is not None and "lr" not in kind.cli_options:
        p.error(f"--lr does not apply to the {network} network ({why('lr')})")
    for option in KIND_OPTIONS:
        if getattr(args, option) is not None and option not in kind.cli_options:
            p.error(f"--{option.replace('_', '-')} applies to the {' and the '.join(having[option])} only")
    if rule != "backprop" and "rule" not in kind.cli_options:
        p.error(f"--rule applies to the {' and the '.join(k.upper() for k in having['rule'])} ({why('rule')})")
    return kind, rule


def _model(p, args, kind, rule, n_examples=None):
    """(batch size, make_classifier's architecture and rates) from the command line (the kind's from_args; with
    n_examples, those that depend on the training examples)."""
    try:
        return kind.from_args(args, n_examples)
    except ValueError as e:
        p.error(str(e))


def _writable(folder, option):
    """Exit with one error line unless `folder` can be created and written (utils.io.writable_folder)."""
    writable_folder(folder, lambda why: SystemExit(f"error: {option}: cannot write into {folder} ({why}); choose a "
                                                   f"folder this user can write"))


def _data(args):
    """(X, y, X_test, y_test, classes) as the command line asks: dataset, --dry-run, subsets, --normalize."""
    try:
        ds = synthetic_dataset(device=args.device) if args.dataset == "blobs" else \
            load_dataset(args.dataset, root=args.data_root, device=args.device, normalize=bool(args.normalize))
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if args.normalize and args.dataset == "blobs":
        ds = standardized(ds)
    X, y, X_test, y_test = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    subset, test_subset = (1000, 200) if args.dry_run else (args.subset, args.test_subset)
    if subset and subset < len(y):
        X, y = stratified_subset(X, y, subset, seed=args.seed)
    if test_subset and test_subset < len(y_test):
        X_test, y_test = stratified_subset(X_test, y_test, test_subset, seed=args.seed)
    return X, y, X_test, y_test, ds.classes


def main(argv=None):
    """Parse the command line, train, print the test accuracy per test and at the end; returns the last one."""
    p = parser()
    args = p.parse_args(argv)
    kind, rule = _usage(p, args)
    batch_size, model = _model(p, args, kind, rule)
    epochs = 1 if args.dry_run else args.epochs
    name = kind.network if rule == "backprop" else f"{kind.network}-{rule}"
    out = args.out or (None if args.dry_run else f"runs/{name}_{args.dataset}_b{batch_size}_s{args.seed}.json")
    try:
        saved = checkpoint_path(args.save) if args.save is not None else None
    except ValueError as e:
        p.error(f"--save: {e}")
    for path, option in ((out, "--out"), (saved, "--save")):   # before loading or training anything
        if path is not None:
            _writable(Path(path).parent, option)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    X, y, X_test, y_test, classes = _data(args)
    batch_size, model = _model(p, args, kind, rule, n_examples=len(y))   # rates scaled for the batch that trains
    decay = "lr_decay_epochs" in kind.cli_options
    config = dict(model=kind.network, dataset=args.dataset, n_train=len(y), n_test=len(y_test), epochs=epochs,
                  test_every_epochs=args.test_every_epochs, batch_size=batch_size, seed=args.seed,
                  **{k: v for k, v in model.items() if k != "lr_decay_examples"},
                  **({"lr_decay_epochs": args.lr_decay_epochs} if decay else {}), normalize=bool(args.normalize),
                  threads=torch.get_num_threads(), device=str(X.device))
    hp = {"max_epochs": epochs, "seed": args.seed, "device": args.device, "batch_size": batch_size,
          "verbose": int(interactive() and not args.quiet)}   # progress bars only where someone watches them
    print(f"{name} on {args.dataset}: {len(y)} training examples, {epochs} epoch{'s' * (epochs != 1)}, "
          f"device {X.device}" + (f", f_etas {model['f_etas']}" if "f_etas" in model else ""), flush=True)
    try:
        clf = make_classifier(kind.network, **hp, **model)
        clf, record = train_epochs(clf, X, y, X_test, y_test, EpochRun(
            epochs, test_every=args.test_every_epochs, out=out, config=config, resume=args.resume,
            max_minutes=args.max_minutes, classes=np.arange(len(classes)), log=lambda line: print(line, flush=True)))
    except (ValueError, TrainingDiverged, InsufficientMemory, RunInUse) as e:
        sys.exit(f"error: {e}")
    acc = record["test_accuracy"]
    print(f"test accuracy {100 * acc:.2f} % on {len(y_test)} examples after {len(record['epochs'])} epochs "
          f"(training {record['train_s']:.1f} s, total {time.time() - t0:.1f} s)" + (f"; record {out}" if out else ""))
    if saved is not None:
        print("saved", save_checkpoint(clf, args.save, config={**config, "test_accuracy": acc}))
    return acc


if __name__ == "__main__":
    main()
