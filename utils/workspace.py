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

from utils import results
from utils.compartmental import batch_f_etas
from utils.data import Dataset, stratified_subset
from utils.kinds import find_kind, get_kind, networks
from utils.plotting import set_figures_dir
from utils.rules import RULES, rule_models, rules_for, split_model
from utils.runs import concat_runs
from utils.study import StudySettings, run_study
from utils.study_log import load_results, summarize
from utils.train import LoggedRun, train_logged

KINDS = networks()   # the networks the notebooks train and study ("mlp", "cnn", "compartmental")

# ----------------------------------------------------------------------------------------------------------------
# the small models of quick mode, per kind (full mode trains utils.results' reference configurations per dataset)
MODELS = {
    "mlp": dict(hidden_sizes=(500,), lr=1e-3, batch_size=100),
    "cnn": dict(channels=(32, 64), kernel_sizes=(3, 3), padding=1, lr=1e-3, batch_size=100),
    # the paper's network, spiking, 1 hidden layer of 500; batches of 16 (updates averaged): hidden rate x32, output x2
    # of the paper's online 0.21 (batch against online: docs/results.md, "Measurements moved from the code")
    "compartmental": dict(n_hidden=(500,), batch_size=16, f_etas=batch_f_etas(16), record_backprop_angle=True),
}


# ----------------------------------------------------------------------------------------------------------------
# sizes of everything the notebooks do. Quick mode (the main command) trains every step anew at sizes a quiet 2-core
# CPU runs in under 5 minutes for MNIST and Fashion-MNIST, where each model visibly learns (MNIST floors: MLP 95 %,
# CNN 97 %, compartmental 85 % on 2,000 test examples; benchmarks/bench_quick.py). TINY: the same steps at the
# smallest sizes that run every cell (the test suite's notebook test, WORKSPACE_QUICK=tiny; its accuracies mean
# nothing). FULL: a RERUN at the committed results' scale (utils.results: the reference configurations, whole
# splits) and the study as specified.
QUICK = dict(
    quick=True,
    n_train=20000,           # training examples of the MLP, CNN and rules (a stratified subset)
    n_valid=1000,            # held out of the training split for the logger's validation records
    mlp_epochs=4,            # the MLP of step "train"
    epochs=2,                # the CNN of step "train", and every rule's MLP
    rule_n_train=10000,      # training examples of every rule's MLP (step "rules"; None: the whole split)
    records_per_epoch=4, max_valid=300,   # logger records per epoch, validation examples per record
    compartmental_n_train=20000, compartmental_epochs=1, compartmental_records_per_epoch=4,
    compartmental_max_valid=100,
    compartmental_test_steps=None,  # l_f_phase_test: time steps per test example (None: the paper's 250)
    n_test=2000,                    # test examples (stratified subset of the test split)
    bo_iterations=3, bo_folds=2, bo_epochs=1, bo_subset=300, bo_init_points=2,  # the study: MLP and CNN
    bo_retrain_subset=500, bo_test_subset=200,
    bo_compartmental_iterations=1,  # the paper's network only (the study's reference configuration)
    bo_compartmental_subset=4000,   # 2,000 per fold: about what the paper's network needs to learn visibly
    bo_compartmental_retrain_subset=4000, bo_max_phase=30,
    bo_out="logs/quick",
    figures="runs/figures",        # never the committed README figures
)
TINY = dict(QUICK, quick="tiny", n_train=600, rule_n_train=600, n_valid=300, mlp_epochs=2, records_per_epoch=2, max_valid=40,
            compartmental_n_train=300, compartmental_records_per_epoch=2, compartmental_max_valid=20,
            compartmental_test_steps=100, n_test=200, bo_subset=200, bo_retrain_subset=300, bo_test_subset=100,
            bo_compartmental_subset=100, bo_compartmental_retrain_subset=100, bo_out="logs/tiny")
FULL = dict(
    quick=False,
    n_train=None, rule_n_train=None, n_valid=5000, mlp_epochs=10, epochs=10, records_per_epoch=10, max_valid=1000,
    compartmental_n_train=None, compartmental_epochs=5, compartmental_records_per_epoch=10,
    compartmental_max_valid=300,
    compartmental_test_steps=None,  # None: the estimator's default (the paper's 250)
    n_test=None,
    bo_iterations=50, bo_folds=3, bo_epochs=10, bo_subset=None, bo_init_points=5,
    bo_retrain_subset=None, bo_test_subset=None,
    bo_compartmental_iterations=None,  # None: bo_iterations
    bo_compartmental_subset=None, bo_compartmental_retrain_subset=None, bo_max_phase=None,
    bo_out="logs/full",
    figures="runs/figures",         # README's figures/ are drawn by python -m utils.results figures only
)


QUICK_VALUES = {"1": True, "true": True, "yes": True, "on": True, "quick": True,
                "0": False, "false": False, "no": False, "off": False, "full": False, "": False, "tiny": "tiny"}


def quick_mode(quick=False):
    """The notebook's QUICK parameter, else the environment variable WORKSPACE_QUICK: False (full), True (1, true,
    yes, on, quick; any case) or "tiny" (the test suite's sizes). Any other value is refused with the valid ones."""
    if quick:
        return quick
    env = os.environ.get("WORKSPACE_QUICK", "")
    key = env.strip().lower()
    if key not in QUICK_VALUES:
        raise ValueError(f"WORKSPACE_QUICK={env!r} is not a mode; valid: {', '.join(repr(k) for k in QUICK_VALUES)} "
                         f"(1 or true: quick mode, 0, false or unset: the committed results and full mode, tiny: "
                         f"the test suite's sizes)")
    return QUICK_VALUES[key]


STEPS = ("train", "rules", "study")   # the notebooks' steps that train: the models, the rules, the studies


def rerun_steps(rerun, quick):
    """The steps a notebook trains anew: all of them in quick or tiny mode (the main command trains its own small
    models), else `rerun`: None (draw the committed results of results/), "all", or some of STEPS."""
    if quick or rerun == "all":
        return frozenset(STEPS)
    steps = frozenset([rerun] if isinstance(rerun, str) else rerun or ())
    if not steps <= set(STEPS):
        raise ValueError(f"RERUN={rerun!r}: valid are None (the committed results), 'all' or some of {STEPS}")
    return steps


def settings(quick, rerun=None):
    """Every size the notebooks use, in one dict (a copy of QUICK, TINY or FULL): quick=True (a 2-core CPU, minutes),
    "tiny" (every cell at the smallest sizes: the notebook test) or False (the study as specified, for a GPU), and
    under "rerun" the steps that train anew (rerun_steps); the others draw the committed results."""
    S = dict(TINY if quick == "tiny" else QUICK if quick else FULL)
    S["rerun"] = rerun_steps(rerun, quick)
    if "study" not in S["rerun"]:
        S["bo_out"] = str(results.RESULTS / "study")   # the committed studies, read only
    return S


def use_figures_dir(S, figures=None):
    """Where the notebook's figures go: `figures`, else $BIODL_FIGURES, else runs/figures/ (a notebook never
    overwrites the committed README figures, which `python -m utils.results figures` draws). Returns the folder."""
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


def model_hyperparameters(model, dataset, S):
    """make_classifier's hyperparameters of `model` ("mlp", "mlp-fa", ...) on `dataset`: quick mode's small model
    (MODELS), else the committed results' reference configuration for that dataset (utils.results.PIECES)."""
    kind, rule = split_model(model)
    piece = results.PIECES.get(f"{dataset}/{model}")
    if S["quick"] or piece is None:
        return dict(MODELS[kind], **({"rule": rule} if rule else {}))
    return dict(piece.hyperparameters)


def _own_sizes(S, kind, prefix=""):
    """key -> the size S gives `kind` itself (S[prefix + kind + "_" + key], e.g. "compartmental_epochs": its
    validation costs 250 steps an example), else the common one (S[prefix + key], None when S has none)."""
    return lambda key: S.get(f"{prefix}{kind}_{key}", S.get(prefix + key))


def train_models(ds, S, kinds=KINDS, device=None, seed=0, out="runs"):
    """Train each kind on the Dataset `ds` with the logger; runs saved to out/<ds.name>_<kind>. Returns (logs,
    models), each keyed by kind."""
    dataset = _checked(ds).name
    X, y, Xv, yv = _split(ds, S["n_train"], S["n_valid"], seed)
    logs, models = {}, {}
    for kind in kinds:
        own = _own_sizes(S, kind)
        hp = dict(model_hyperparameters(kind, dataset, S), max_epochs=own("epochs"), seed=seed, device=device)
        test_steps = get_kind(kind).test_steps
        if test_steps and own("test_steps"):
            hp[test_steps] = own("test_steps")
        n = S.get(f"{kind}_n_train")   # a kind's own subset of the training examples (else all of X)
        Xk, yk = stratified_subset(X, y, n, seed=seed) if n else (X, y)
        run = LoggedRun(run_dir=f"{out}/{dataset}_{kind}", name=kind, records_per_epoch=own("records_per_epoch"),
                        max_valid=own("max_valid"), config={"dataset": dataset, "seed": seed, "quick": S["quick"]})
        clf, log = train_logged(kind, Xk, yk, Xv, yv, run, **hp)
        logs[kind], models[kind] = log, clf
    return logs, models


@dataclasses.dataclass
class Runs:
    """The logged runs of one step on one dataset, trained now or read from the committed results."""
    table: pd.DataFrame       # the loggers' long table (utils.runs), with model and dataset columns
    accuracies: pd.DataFrame  # test accuracy per model (model, dataset, test_acc, n_test, made_by)
    models: dict              # the trained estimators by model name (empty for committed results)


def committed_runs(dataset, models):
    """Runs of `models` on `dataset` from the committed single trainings (utils.results; unfinished pieces left
    out), each accuracy row naming the record and the command that made it."""
    names = [f"{dataset}/{m}" for m in models if f"{dataset}/{m}" in results.PIECES]   # pieces that exist
    table, _ = results.table(names)
    if table is not None:
        table["drawn_from"] = [f"results/single/{r.replace('/', '_')}.json" for r in table["run"]]
    rows = []
    for name in names:
        rec = results.load_record(name)
        if rec is None or not rec.get("finished"):
            continue
        cfg, prov = rec["config"], rec["provenance"]
        rows.append(dict(model=cfg["model"], dataset=dataset, test_acc=round(100 * rec["test_accuracy"], 2),
                         n_test=cfg["n_test"], epochs=cfg["epochs"], minutes=round(rec["wall_s"] / 60, 1),
                         made_by=f"{results.PIECES[name].path().relative_to(results.RESULTS.parent)}: "
                                 f"{prov['command']} at {str(prov['commit'])[:7]}"))
    if table is None:
        table = pd.DataFrame(columns=["run", "model", "dataset"])
    return Runs(table, pd.DataFrame(rows), {})


def model_runs(ds, S, kinds=KINDS, device=None, seed=0, out="runs"):
    """The step "train" on the Dataset `ds`: train_models now when S["rerun"] holds it, else the committed runs."""
    if "train" not in S["rerun"]:
        return committed_runs(_checked(ds).name, kinds)
    logs, models = train_models(ds, S, kinds=kinds, device=device, seed=seed, out=out)
    return _trained(logs, models, ds, S, seed, out)


def _trained(logs, models, ds, S, seed, out):
    table = concat_runs(list(logs.values()))
    table["drawn_from"] = [f"{out}/{ds.name}_{m} (this run)" for m in table["model"]]
    return Runs(table, test_accuracies(models, ds, S, seed=seed), models)


def rule_runs(ds, S, device=None, seed=0, out="runs"):
    """The step "rules" on the Dataset `ds` (the MLP under every rule): train_rules now when S["rerun"] holds it,
    else the committed runs."""
    if "rules" not in S["rerun"]:
        return committed_runs(_checked(ds).name, [f"mlp-{r}" if r != "backprop" else "mlp" for r in RULES])
    logs, models = train_rules(ds, S, device=device, seed=seed, out=out)
    return _trained(logs, models, ds, S, seed, out)


def show(plot, table, **kw):
    """Draw `plot(table, **kw)` and say which runs made it (the table's drawn_from column); when the table lacks what
    the figure needs (a piece of the committed results has not run yet), say so instead of failing."""
    if table is None or table.empty:
        print(f"{plot.__name__}: not drawn, no runs (python -m utils.results list shows what has run)")
        return None
    try:
        fig = plot(table, **kw)
    except ValueError as e:
        print(f"{plot.__name__}: not drawn, {e}")
        return None
    if "drawn_from" in table:
        print("drawn from: " + ", ".join(pd.unique(table["drawn_from"].dropna())))
    return fig


def joined(runs, models=None):
    """One long table of {dataset: Runs} (the seed's figures: one column per dataset), optionally only `models`."""
    table = pd.concat([r.table for r in runs.values()], ignore_index=True)
    return table if models is None else table[table["model"].isin(models)]


def angle_table(rules, runs):
    """The angle rows to draw beside each other: every rule but backprop (its angle is 0 by definition) from the
    {dataset: Runs} of rule_runs, and the compartmental network from those of model_runs."""
    table, nets = joined(rules), joined(runs)
    return pd.concat([table[table["model"].map(_not_backprop)], nets[nets["model"].map(_own_learning)]],
                     ignore_index=True)


def _not_backprop(model):
    kind = find_kind(model)
    return kind is None or kind.learning != "backprop"


def _own_learning(model):
    """Whether the network `model` learns by a rule of its own, not one of utils.rules (the compartmental one)."""
    kind = find_kind(model)
    return kind is not None and kind.learning == kind.network


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
                         test_seconds=round(time.perf_counter() - t, 1), made_by="this run"))
    return pd.DataFrame(rows)


def _study_settings(kind, S, **common):
    """The StudySettings of `kind`'s study under the notebook's sizes S (a kind has its own where S sets them:
    bo_compartmental_subset, ...), written to S["bo_out"]; `common`: further settings (name, seed, device,
    verbose...)."""
    kw = dict(iterations=S["bo_iterations"], folds=S["bo_folds"], epochs=S["bo_epochs"], subset=S["bo_subset"],
              init_points=S["bo_init_points"], retrain_subset=S["bo_retrain_subset"], test_subset=S["bo_test_subset"])
    own = {k: S.get(f"bo_{kind}_{k}") for k in ("iterations", "subset", "retrain_subset")}
    kw.update({k: v for k, v in own.items() if v})
    K, fixed = get_kind(kind), {}
    if not K.searches_batch_size:   # a study holds its batch size at quick mode's
        fixed["batch_size"] = MODELS[K.network]["batch_size"]
    if K.test_steps and S.get(f"{kind}_test_steps"):
        fixed[K.test_steps] = S[f"{kind}_test_steps"]
    if K.phases:
        kw["max_phase"] = S["bo_max_phase"]
    if fixed:
        kw["fixed"] = fixed
    return dataclasses.replace(StudySettings(out=S["bo_out"], **kw), **common)


def study(datasets, S, kinds=KINDS, device=None, seed=0, verbose=1):
    """Run (or resume, or just load when finished) the Bayesian optimization of each kind on each dataset
    (`datasets`: {name: Dataset}, or a list of Datasets) when S["rerun"] holds "study", else read the committed
    studies of S["bo_out"] as far as they have run; returns the summary table of utils.study_log.summarize for these
    studies, with the folder each row was read from (drawn_from)."""
    named = _named(datasets)
    if "study" not in S["rerun"]:
        found = study_evaluations(S, [n for n, _ in named], kinds)
        if found.empty:
            return pd.DataFrame(columns=["model", "dataset", "best", "mean", "std", "test_acc", "n_evals"])
        summary = summarize(found)
    else:
        summary = pd.concat([run_study(kind, ds, _study_settings(kind, S, name=name, seed=seed, device=device,
                                                                  verbose=verbose))["summary"]
                             for name, ds in named for kind in kinds], ignore_index=True)
    return summary.assign(drawn_from=[f"{S['bo_out']}/{m}_{d}" for m, d in zip(summary["model"], summary["dataset"])])


def study_evaluations(S, datasets, kinds=None):
    """Every logged evaluation of the studies under S["bo_out"] on `datasets` (names) and `kinds` (None: all), with
    the log each was read from (drawn_from): the table of plot_bo_trace."""
    found = load_results(S["bo_out"])
    found = found[found["dataset"].isin(list(datasets)) & (found["model"].isin(kinds) if kinds else True)]
    return found.assign(drawn_from=[f"{S['bo_out']}/{m}_{d}/evals.jsonl"
                                    for m, d in zip(found["model"], found["dataset"])])


def results_table(summary):
    """This project's study results (best / mean CV accuracy and the retrained best's test accuracy, %) beside the
    seed study's best CV accuracy and the paper's test accuracy."""
    rows = []
    for r in summary.itertuples():
        key = (r.model, r.dataset)
        rows.append({"model": r.model, "dataset": r.dataset, "best CV %": round(100 * r.best, 2),
                     "mean CV %": round(100 * r.mean, 2), "std CV %": round(100 * r.std, 2),
                     "test % (best, retrained)": round(100 * r.test_acc, 2),
                     "seed study best CV %": results.SEED_STUDY.get(key), "paper test %": results.PAPER.get(key),
                     "evaluations": r.n_evals})
    return pd.DataFrame(rows)


def reference_columns(summary):
    """The summary with the seed study's best CV accuracy as column seed_best (fraction), for plot_comparison."""
    ref = [results.SEED_STUDY.get((m, d)) for m, d in zip(summary["model"], summary["dataset"])]
    return summary.assign(seed_best=[None if v is None else v / 100 for v in ref])


# ----------------------------------------------------------------------------------------------------------------
# other plausible rules (utils.rules): feedback alignment, direct feedback alignment, sign symmetry beside backprop
# the networks trained and studied under every rule, by mode (quick, the test suite's tiny, full)
RULE_KINDS = {True: ("mlp",), "tiny": ("mlp",), False: ("mlp",)}


def train_rules(ds, S, device=None, seed=0, out="runs"):
    """Each network of RULE_KINDS under every rule (same architecture and seed as train_models, S["rule_n_train"]
    training examples) on the Dataset `ds`, with the logger; runs saved to out/<ds.name>_<model> ("mlp-backprop",
    "mlp-fa", "mlp-dfa", "mlp-sign", ...). Returns (logs, models) keyed by those model names."""
    dataset = _checked(ds).name
    X, y, Xv, yv = _split(ds, S["rule_n_train"], S["n_valid"], seed)
    logs, models = {}, {}
    for kind in RULE_KINDS[S["quick"]]:
        for rule in rules_for(kind):
            name = f"{kind}-{rule}"
            reference = kind if rule == "backprop" else name   # the committed results name backprop's MLP "mlp"
            hp = dict(model_hyperparameters(reference, dataset, S), rule=rule, max_epochs=S["epochs"], seed=seed,
                      device=device)
            run = LoggedRun(run_dir=f"{out}/{dataset}_{name}", name=name, records_per_epoch=S["records_per_epoch"],
                            max_valid=S["max_valid"],
                            config={"dataset": dataset, "seed": seed, "quick": S["quick"], "rule": rule})
            models[name], logs[name] = train_logged(name, X, y, Xv, yv, run, **hp)
    return logs, models


def rule_study(datasets, S, summary=None, device=None, seed=0, verbose=1):
    """The study (`study`) of each network of RULE_KINDS under FA, DFA and sign symmetry ("mlp-fa", ...) on
    `datasets` (as in `study`), appended to `summary` (the other models' table) for the comparison figure and the
    results table."""
    rules = study(datasets, S, kinds=rule_models(RULE_KINDS[S["quick"]]), device=device, seed=seed,
                  verbose=verbose)
    return rules if summary is None else pd.concat([summary, rules], ignore_index=True)
