"""The notebooks' steps: each function here is the work of one notebook cell, so the notebooks stay thin.

    from utils.data import load_dataset
    from utils.workspace import settings, train_models, test_accuracies, study, results_table
    S = settings(quick=True)                          # sizes of everything: subsets, epochs, study iterations
    ds = load_dataset("mnist", device=None)           # loaded once, passed to every step (ds.name: "mnist")
    logs, models = train_models(ds, S, device=None, seed=0)   # MLP, CNN, compartmental, each with the logger
    test_accuracies(models, ds, S)                    # on the official test split
    summary = study({"mnist": ds}, S)                 # Bayesian optimization (resumes / loads finished studies)
    results_table(summary)                            # this project's numbers beside the seed study's and the paper's

Quick mode (subsets, few epochs, few study iterations; see QUICK below) runs a notebook in minutes on a 2-core CPU;
full mode is the study as specified (50 iterations, 10 epochs, 3 folds), for a GPU.
"""
import dataclasses
import os
import time
from collections.abc import Mapping

import pandas as pd
import torch

from utils.compartmental import PAPER_TEST_ERROR, batch_f_etas
from utils.data import Dataset, stratified_subset
from utils.plotting import set_figures_dir
from utils.rules import rule_models, rules_for
from utils.study import StudySettings, run_study
from utils.train import KINDS, train_logged

# ----------------------------------------------------------------------------------------------------------------
# reference numbers (accuracy, %)
SEED_STUDY = {  # the seed study's best 3-fold cross-validated accuracies
    ("mlp", "mnist"): 96.8, ("mlp", "fashion"): 87.3, ("mlp", "cifar10"): 45.3,
    ("cnn", "mnist"): 99.0, ("cnn", "fashion"): 90.9, ("cnn", "cifar10"): 53.1,
    ("compartmental", "fashion"): 84.8, ("compartmental", "cifar10"): 34.0,
}
PAPER = {  # Guerguiev et al. 2017, MNIST test accuracy after 60 epochs, 1 hidden layer (utils.compartmental)
    ("compartmental", "mnist"): round(100 - PAPER_TEST_ERROR[1], 1),
}

# ----------------------------------------------------------------------------------------------------------------
# the logged training runs of the section "training each model" (hyperparameters per kind)
MODELS = {
    "mlp": dict(hidden_sizes=(500,), lr=1e-3, batch_size=100),
    "cnn": dict(channels=(32, 64), kernel_sizes=(3, 3), padding=1, lr=1e-3, batch_size=100),
    # the paper's network, spiking, 1 hidden layer of 500; batches of 16 (updates averaged): hidden rate x32, output x2
    # of the paper's online 0.21 (short MNIST sweeps: 75.7 % after 10k examples vs 77.0 % online, 3x faster)
    "compartmental": dict(n_hidden=(500,), batch_size=16, f_etas=batch_f_etas(16), record_backprop_angle=True),
}


# ----------------------------------------------------------------------------------------------------------------
# sizes of everything the notebooks do. Quick mode is bounded by design, for a 2-core CPU that other jobs share:
# stratified subsets, few epochs and records, and a compartmental study of the paper's network alone (a random
# configuration of up to 6 layers took minutes there). The compartmental network needs about 2,000 examples in
# batches of 16 before it learns visibly (at most n_train: it trains on a subset of theirs). Logger settings keep
# validation below the LoggerOverheadWarning threshold (small validation sets: noisy curves). TINY: the same steps
# at the smallest sizes that run every cell (the test suite's notebook test, WORKSPACE_QUICK=tiny; its accuracies
# mean nothing).
QUICK = dict(
    quick=True,
    n_train=2000, n_valid=300, epochs=2, records_per_epoch=4, max_valid=100,  # MLP and CNN, training with the logger
    compartmental_n_train=2000, compartmental_epochs=1, compartmental_records_per_epoch=4,
    compartmental_max_valid=60,
    compartmental_test_steps=100,  # l_f_phase_test: time steps per test example (the paper's 250 in full mode)
    n_test=500,                    # test examples (stratified subset of the test split)
    bo_iterations=3, bo_folds=2, bo_epochs=1, bo_subset=300, bo_init_points=2,  # the study: MLP and CNN
    bo_retrain_subset=500, bo_test_subset=200,
    bo_compartmental_iterations=1,  # the paper's network only (the study's reference configuration)
    bo_compartmental_subset=150, bo_compartmental_retrain_subset=200, bo_max_phase=30,
    bo_out="logs/quick",
    figures="runs/figures",        # never the committed README figures
)
TINY = dict(QUICK, quick="tiny", n_train=600, records_per_epoch=2, max_valid=40, compartmental_n_train=300,
            compartmental_records_per_epoch=2, compartmental_max_valid=20, n_test=200, bo_subset=200,
            bo_retrain_subset=300, bo_test_subset=100, bo_compartmental_subset=100,
            bo_compartmental_retrain_subset=100, bo_out="logs/tiny")
FULL = dict(
    quick=False,
    n_train=None, n_valid=5000, epochs=10, records_per_epoch=10, max_valid=1000,
    compartmental_n_train=None, compartmental_epochs=10, compartmental_records_per_epoch=10,
    compartmental_max_valid=300,
    compartmental_test_steps=None,  # None: the estimator's default (the paper's 250)
    n_test=None,
    bo_iterations=50, bo_folds=3, bo_epochs=10, bo_subset=None, bo_init_points=5,
    bo_retrain_subset=None, bo_test_subset=None,
    bo_compartmental_iterations=None,  # None: bo_iterations
    bo_compartmental_subset=None, bo_compartmental_retrain_subset=None, bo_max_phase=None,
    bo_out="logs/full",
    figures=None,                   # None: $BIODL_FIGURES, else the repository's figures/
)


def quick_mode(quick=False):
    """The notebook's QUICK parameter, else the environment variable WORKSPACE_QUICK: False (full), True ("1") or
    "tiny" (the test suite's sizes)."""
    env = os.environ.get("WORKSPACE_QUICK", "")
    return quick or ("tiny" if env == "tiny" else env == "1")


def settings(quick):
    """Every size the notebooks use, in one dict (a copy of QUICK, TINY or FULL): quick=True (a 2-core CPU, minutes),
    "tiny" (every cell at the smallest sizes: the notebook test) or False (the study as specified, for a GPU)."""
    return dict(TINY if quick == "tiny" else QUICK if quick else FULL)


def use_figures_dir(S, figures=None):
    """Where the notebook's figures go: `figures`, else $BIODL_FIGURES, else runs/figures/ in quick mode (quick runs
    never overwrite the committed README figures) and the repository's figures/ in full mode. Returns the folder."""
    return set_figures_dir(figures or os.environ.get("BIODL_FIGURES") or S["figures"])


def _checked(ds):
    """`ds` when it is a utils.data.Dataset (its name names the run folders), else a TypeError: the steps take the
    dataset the notebook loaded once (load_dataset), never a name to load again."""
    if not isinstance(ds, Dataset):
        raise TypeError(f"expected a utils.data.Dataset (load_dataset(name, ...)), got {type(ds).__name__}")
    return ds


def _named(datasets):
    """(name, Dataset) pairs of a {name: Dataset} dict or a list of Datasets (named by their name field)."""
    if isinstance(datasets, Mapping):
        return [(name, _checked(ds)) for name, ds in datasets.items()]
    return [(ds.name, ds) for ds in map(_checked, datasets)]


def _split(ds, n_train, n_valid, seed):
    """A random validation set held out of the training split, and (a stratified subset of) the rest for training."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.y_train), generator=g).to(ds.y_train.device)
    valid, train = order[:n_valid], order[n_valid:]
    X, y = ds.X_train[train], ds.y_train[train]
    if n_train:
        X, y = stratified_subset(X, y, n_train, seed=seed)
    return X, y, ds.X_train[valid], ds.y_train[valid]


def train_models(ds, S, kinds=KINDS, device=None, seed=0, out="runs"):
    """Train each kind on the Dataset `ds` with the logger; runs saved to out/<ds.name>_<kind>. Returns (logs,
    models), each keyed by kind."""
    dataset = _checked(ds).name
    X, y, Xv, yv = _split(ds, S["n_train"], S["n_valid"], seed)
    logs, models = {}, {}
    for kind in kinds:
        hp = dict(MODELS[kind])
        if kind == "compartmental":
            hp.update(max_epochs=S["compartmental_epochs"], seed=seed, device=device)
            if S["compartmental_test_steps"]:
                hp.update(l_f_phase_test=S["compartmental_test_steps"])
            n = S["compartmental_n_train"]
            Xk, yk = stratified_subset(X, y, n, seed=seed) if n else (X, y)
        else:
            hp.update(max_epochs=S["epochs"], seed=seed, device=device)
            Xk, yk = X, y
        prefix = "compartmental_" if kind == "compartmental" else ""  # its validation costs 250 steps an example
        clf, log = train_logged(kind, Xk, yk, Xv, yv, run_dir=f"{out}/{dataset}_{kind}", name=kind,
                                records_per_epoch=S[prefix + "records_per_epoch"], max_valid=S[prefix + "max_valid"],
                                config={"dataset": dataset, "seed": seed, "quick": S["quick"]}, **hp)
        logs[kind], models[kind] = log, clf
    return logs, models


def test_accuracies(models, ds, S, seed=0):
    """Test accuracy (%) of each trained model on the Dataset's official test split (a stratified subset in quick
    mode)."""
    X, y = _checked(ds).X_test, ds.y_test
    if S["n_test"]:
        X, y = stratified_subset(X, y, S["n_test"], seed=seed)
    rows = []
    for kind, clf in models.items():
        t = time.perf_counter()
        acc = 100 * clf.score(X, y)
        rows.append(dict(model=kind, dataset=ds.name, test_acc=round(acc, 2), n_test=len(y),
                         test_seconds=round(time.perf_counter() - t, 1)))
    return pd.DataFrame(rows)


def _study_settings(kind, S, **common):
    """The StudySettings of `kind`'s study under the notebook's sizes S (the compartmental network has its own where
    S sets them), written to S["bo_out"]; `common`: further settings (name, seed, device, verbose...)."""
    kw = dict(iterations=S["bo_iterations"], folds=S["bo_folds"], epochs=S["bo_epochs"], subset=S["bo_subset"],
              init_points=S["bo_init_points"], retrain_subset=S["bo_retrain_subset"], test_subset=S["bo_test_subset"])
    if kind == "compartmental":
        own = dict(iterations=S["bo_compartmental_iterations"], subset=S["bo_compartmental_subset"],
                   retrain_subset=S["bo_compartmental_retrain_subset"])
        fixed = {"batch_size": MODELS[kind]["batch_size"]}
        if S["compartmental_test_steps"]:
            fixed["l_f_phase_test"] = S["compartmental_test_steps"]
        kw.update({k: v for k, v in own.items() if v}, max_phase=S["bo_max_phase"], fixed=fixed)
    return dataclasses.replace(StudySettings(out=S["bo_out"], **kw), **common)


def study(datasets, S, kinds=KINDS, device=None, seed=0, verbose=1):
    """Run (or resume, or just load when finished) the Bayesian optimization of each kind on each dataset
    (`datasets`: {name: Dataset}, or a list of Datasets); returns the summary table of utils.study_log.summarize
    for these studies."""
    results = []
    for name, ds in _named(datasets):
        for kind in kinds:
            settings = _study_settings(kind, S, name=name, seed=seed, device=device, verbose=verbose)
            results.append(run_study(kind, ds, settings)["summary"])
    return pd.concat(results, ignore_index=True)


def results_table(summary):
    """This project's study results (best / mean CV accuracy and the retrained best's test accuracy, %) beside the
    seed study's best CV accuracy and the paper's test accuracy."""
    rows = []
    for r in summary.itertuples():
        key = (r.model, r.dataset)
        rows.append({"model": r.model, "dataset": r.dataset, "best CV %": round(100 * r.best, 2),
                     "mean CV %": round(100 * r.mean, 2), "std CV %": round(100 * r.std, 2),
                     "test % (best, retrained)": round(100 * r.test_acc, 2),
                     "seed study best CV %": SEED_STUDY.get(key), "paper test %": PAPER.get(key),
                     "evaluations": r.n_evals})
    return pd.DataFrame(rows)


def reference_columns(summary):
    """The summary with the seed study's best CV accuracy as column seed_best (fraction), for plot_comparison."""
    ref = [SEED_STUDY.get((m, d)) for m, d in zip(summary["model"], summary["dataset"])]
    return summary.assign(seed_best=[None if v is None else v / 100 for v in ref])


# ----------------------------------------------------------------------------------------------------------------
# other plausible rules (utils.rules): feedback alignment, direct feedback alignment, sign symmetry beside backprop
# the networks trained and studied under every rule, by mode (quick, the test suite's tiny, full)
RULE_KINDS = {True: ("mlp",), "tiny": ("mlp",), False: ("mlp", "cnn")}


def train_rules(ds, S, device=None, seed=0, out="runs"):
    """Each network of RULE_KINDS under every rule (same architecture, seed and data as train_models) on the
    Dataset `ds`, with the logger; runs saved to out/<ds.name>_<model> ("mlp-backprop", "mlp-fa", "mlp-dfa",
    "mlp-sign", ...). Returns (logs, models) keyed by those model names."""
    dataset = _checked(ds).name
    X, y, Xv, yv = _split(ds, S["n_train"], S["n_valid"], seed)
    logs, models = {}, {}
    for kind in RULE_KINDS[S["quick"]]:
        for rule in rules_for(kind):
            name = f"{kind}-{rule}"
            hp = dict(MODELS[kind], rule=rule, max_epochs=S["epochs"], seed=seed, device=device)
            models[name], logs[name] = train_logged(
                name, X, y, Xv, yv, run_dir=f"{out}/{dataset}_{name}", name=name,
                records_per_epoch=S["records_per_epoch"], max_valid=S["max_valid"],
                config={"dataset": dataset, "seed": seed, "quick": S["quick"], "rule": rule}, **hp)
    return logs, models


def rule_study(datasets, S, summary=None, device=None, seed=0, verbose=1):
    """The study (`study`) of each network of RULE_KINDS under FA, DFA and sign symmetry ("mlp-fa", ...) on
    `datasets` (as in `study`), appended to `summary` (the other models' table) for the comparison figure and the
    results table."""
    rules = study(datasets, S, kinds=rule_models(RULE_KINDS[S["quick"]]), device=device, seed=seed,
                  verbose=verbose)
    return rules if summary is None else pd.concat([summary, rules], ignore_index=True)
