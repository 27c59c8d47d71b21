"""The notebooks' steps: each function here is the work of one notebook cell, so the notebooks stay thin.

    from utils.workspace import settings, train_models, test_accuracies, study, results_table
    S = settings(quick=True)                          # sizes of everything: subsets, epochs, study iterations
    logs, models = train_models("mnist", S, device=None, seed=0)   # MLP, CNN, compartmental, each with the logger
    summary = study(["mnist"], S)                     # Bayesian optimization (resumes / loads finished studies)
    results_table(summary)                            # this project's numbers beside the seed study's and the paper's

Quick mode (subsets, few epochs, few study iterations) runs a notebook in minutes on a 2-core CPU; full mode is the
study as specified (50 iterations, 10 epochs, 3 folds), for a GPU.
"""
import time

import pandas as pd

from utils.compartmental import batch_f_etas
from utils.data import load_dataset, stratified_subset
from utils.train import KINDS, train_logged

# ----------------------------------------------------------------------------------------------------------------
# reference numbers (accuracy, %)
SEED_STUDY = {  # the seed study's best 3-fold cross-validated accuracies
    ("mlp", "mnist"): 96.8, ("mlp", "fashion"): 87.3, ("mlp", "cifar10"): 45.3,
    ("cnn", "mnist"): 99.0, ("cnn", "fashion"): 90.9, ("cnn", "cifar10"): 53.1,
    ("compartmental", "fashion"): 84.8, ("compartmental", "cifar10"): 34.0,
}
PAPER = {  # Guerguiev et al. 2017, MNIST test accuracy after 60 epochs (1 hidden layer: 4.1 % error; 2: 3.2 %)
    ("compartmental", "mnist"): 95.9,
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


def settings(quick):
    """Every size the notebooks use, in one dict: quick (a 2-core CPU, minutes) or full (the study, a GPU)."""
    if quick:
        return dict(quick=True, n_train=5000, n_valid=500, epochs=2, compartmental_epochs=1,
                    compartmental_n_train=5000, records_per_epoch=10, compartmental_records_per_epoch=6,
                    max_valid=300, compartmental_max_valid=200, n_test=1000,
                    bo_iterations=3, bo_folds=2, bo_epochs=1, bo_subset=500, bo_compartmental_subset=200,
                    bo_init_points=2, bo_max_phase=30, bo_retrain_subset=1000, bo_test_subset=500, bo_out="logs/quick")
    return dict(quick=False, n_train=None, n_valid=5000, epochs=10, compartmental_epochs=10,
                compartmental_n_train=None, records_per_epoch=10, compartmental_records_per_epoch=10,
                max_valid=1000, compartmental_max_valid=300, n_test=None,
                bo_iterations=50, bo_folds=3, bo_epochs=10, bo_subset=None, bo_compartmental_subset=None,
                bo_init_points=5, bo_max_phase=None, bo_retrain_subset=None, bo_test_subset=None, bo_out="logs/full")


def _split(ds, n_train, n_valid, seed):
    """A random validation set held out of the training split, and (a stratified subset of) the rest for training."""
    import torch
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.y_train), generator=g).to(ds.y_train.device)
    valid, train = order[:n_valid], order[n_valid:]
    X, y = ds.X_train[train], ds.y_train[train]
    if n_train:
        X, y = stratified_subset(X, y, n_train, seed=seed)
    return X, y, ds.X_train[valid], ds.y_train[valid]


def train_models(dataset, S, kinds=KINDS, root=None, device=None, seed=0, out="runs"):
    """Train each kind on `dataset` with the logger; runs saved to out/<dataset>_<kind>. Returns (logs, models)."""
    ds = load_dataset(dataset, root=root, device=device)
    X, y, Xv, yv = _split(ds, S["n_train"], S["n_valid"], seed)
    logs, models = {}, {}
    for kind in kinds:
        hp = dict(MODELS[kind])
        if kind == "compartmental":
            hp.update(max_epochs=S["compartmental_epochs"], seed=seed, device=device)
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


def test_accuracies(models, dataset, S, root=None, device=None, seed=0):
    """Test accuracy (%) of each trained model on the official test split (a stratified subset in quick mode)."""
    ds = load_dataset(dataset, root=root, device=device)
    X, y = ds.X_test, ds.y_test
    if S["n_test"]:
        X, y = stratified_subset(X, y, S["n_test"], seed=seed)
    rows = []
    for kind, clf in models.items():
        t = time.perf_counter()
        acc = 100 * clf.score(X, y)
        rows.append(dict(model=kind, dataset=dataset, test_acc=round(acc, 2), n_test=len(y),
                         test_seconds=round(time.perf_counter() - t, 1)))
    return pd.DataFrame(rows)


def study(datasets, S, kinds=KINDS, root=None, device=None, seed=0, verbose=1):
    """Run (or resume, or just load when finished) the Bayesian optimization of each kind on each dataset; returns
    the summary table of utils.bayes_opt.summarize for these studies."""
    from utils.bayes_opt import run_study, summarize
    results = []
    for dataset in datasets:
        for kind in kinds:
            compartmental = kind == "compartmental"
            subset = S["bo_compartmental_subset"] if compartmental and S["bo_compartmental_subset"] else S["bo_subset"]
            out = run_study(kind, dataset, iterations=S["bo_iterations"], folds=S["bo_folds"], epochs=S["bo_epochs"],
                            out=S["bo_out"], seed=seed, subset=subset, device=device, data_root=root,
                            init_points=S["bo_init_points"], max_phase=S["bo_max_phase"] if compartmental else None,
                            fixed={"batch_size": MODELS[kind]["batch_size"]} if compartmental else None,
                            retrain_subset=S["bo_retrain_subset"], test_subset=S["bo_test_subset"], verbose=verbose)
            results.append(out["summary"])
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
RULE_KINDS = {True: ("mlp",), False: ("mlp", "cnn")}  # the networks trained and studied under every rule (quick/full)


def train_rules(dataset, S, root=None, device=None, seed=0, out="runs"):
    """Each network of RULE_KINDS under every rule (same architecture, seed and data as train_models), with the
    logger; runs saved to out/<dataset>_<model> ("mlp-backprop", "mlp-fa", "mlp-dfa", "mlp-sign", ...). Returns (logs,
    models) keyed by those model names."""
    from utils.rules import RULES
    ds = load_dataset(dataset, root=root, device=device)
    X, y, Xv, yv = _split(ds, S["n_train"], S["n_valid"], seed)
    logs, models = {}, {}
    for kind in RULE_KINDS[S["quick"]]:
        for rule in RULES:
            name = f"{kind}-{rule}"
            hp = dict(MODELS[kind], rule=rule, max_epochs=S["epochs"], seed=seed, device=device)
            models[name], logs[name] = train_logged(
                name, X, y, Xv, yv, run_dir=f"{out}/{dataset}_{name}", name=name,
                records_per_epoch=S["records_per_epoch"], max_valid=S["max_valid"],
                config={"dataset": dataset, "seed": seed, "quick": S["quick"], "rule": rule}, **hp)
    return logs, models


def rule_study(datasets, S, summary=None, root=None, device=None, seed=0, verbose=1):
    """The study (`study`) of each network of RULE_KINDS under FA, DFA and sign symmetry ("mlp-fa", ...), appended
    to `summary` (the other models' table) for the comparison figure and the results table."""
    from utils.rules import rule_models
    rules = study(datasets, S, kinds=rule_models(RULE_KINDS[S["quick"]]), root=root, device=device, seed=seed,
                  verbose=verbose)
    return rules if summary is None else pd.concat([summary, rules], ignore_index=True)
