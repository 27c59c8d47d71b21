"""Bayesian optimization of each model's hyperparameters with k-fold cross-validation (the study of issue 5), with
several evaluations side by side, on every GPU of a machine or of several (issue 18).

Long runs (a GPU server, inside tmux or screen; a run that is killed resumes from its files when started again):

    python -m utils.study --model cnn --dataset cifar10 --iterations 50 --epochs 10 --folds 3 --out logs/
    python -m utils.study --summary --out logs/            # the table of every study under logs/ (also live)
    python -m utils.study ... --scheduler tcp://host:8786  # on a running Dask cluster (see README)
    python -m utils.study --protocol cpu --model mlp --dataset mnist --out results/study --max-minutes 120
                                        # a named protocol (PROTOCOLS), in pieces of 2 hours: the same command resumes

(Always `python -m utils.study` from the repository root.)

In a notebook:

    from utils.study import StudySettings, run_study
    from utils.study_log import load_results, summarize
    run_study("mlp", "mnist", StudySettings(iterations=50, folds=3, epochs=10, out="logs"))
    run_study("mlp", "mnist", iterations=50, out="logs")   # the same: keyword overrides of the settings
    run_study("mlp", "mnist", protocol_settings("cpu", "mlp", "mnist", out="logs"))   # a named protocol's row
    summarize("logs")        # model, dataset, best, worst, mean, std, n_evals, frac_chance, best_params, test_acc

The search spaces, the reference configuration and the parameter conversion are each kind's (utils.kinds, asked
through utils/spaces.py); the proposals
in utils/propose.py; one evaluation in utils/evaluation.py; the study's files and results in utils/study_log.py;
where evaluations run (this process or Dask) in utils/cluster.py.

The first evaluation is a known configuration (reference(): make_classifier's defaults for the MLP and CNN, the
paper's network for the compartmental model; source "start"), so the Gaussian process starts from a point that
learns; `start=None` (`--no-reference`) makes it random like the other init_points. How awkward proposals are
treated (invalid, duplicate): utils/propose.py; failures (diverged, out of memory): utils/evaluation.py; the
compartmental flags' prior: utils/propose.py.

Protocols (PROTOCOLS, beside StudySettings): named sizes per model and dataset, every evaluation of a row at one
fidelity, the best retrained on the whole training split and tested on the whole test split when the row finishes.
A deadline (settings.deadline, the command line's --max-minutes) stops a study between rounds; what finished is
saved and the same call or command resumes it. Every study folder records its configuration and the provenance of
each run (commit, versions, machine, command: utils.io.provenance) with its wall time (utils/study_log.py).

Rounds, and why a resumed study ends as the uninterrupted one would have: _run_rounds.
"""
import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from utils.cluster import ClusterError, Distributed, Local, connect, gpu_count, groups, slots, start_client
from utils.data import Dataset, get_device, load_dataset, stratified_subset
from utils.evaluation import estimator_accepts, retrain_task, seed_kw
from utils.io import append_jsonl, dumps, library_versions, provenance, writable_folder, write_json
from utils.propose import Search, flag_sampler, make_optimizer, propose, register
from utils.kinds import find_kind, get_kind
from utils.rules import rule_models, split_model
from utils.spaces import (FLIP_PROB, SPACES, check_hyperparameters, held_params, make_space, reference_params,
                          start_point, to_hyperparameters)
from utils.study_log import (StudyError, best_record, check_config, load_done, load_results, log_records,
                             read_log, study_lock, summarize)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """How a study runs, all but the model and the dataset (run_study's settings; the command line builds one from
    its options). Those that shape the results are saved in config.json and checked when the study resumes."""
    iterations: int = 50                 # trained evaluations in all (invalid proposals do not count)
    folds: int = 3                       # cross-validation folds of every evaluation
    epochs: int = 10                     # training epochs of every evaluation
    out: str | Path = "logs"             # the study's folder is <out>/<model>_<name>/
    seed: int = 0                        # optimizer and folds; evaluation i trains with seed + i
    subset: int | None = None            # cross-validate on a stratified subset of the training split (None: all)
    device: str | None = None            # "cpu", "cuda", ... (None: the data's device here, each worker's own there)
    init_points: int = 5                 # random configurations before the Gaussian process proposes (the first is
    #                                      `start`)
    fixed: dict | None = None            # extra make_classifier arguments of every evaluation (e.g. {"batch_size": 20}
    #                                      for the compartmental network)
    max_phase: int | None = None         # cap of the compartmental phase lengths in the space (reduced runs)
    hold: str | tuple | None = None      # space parameters held at the reference, not searched: "structure" (the
    #                                      compartmental network's, spaces.STRUCTURE: a round of q candidates then
    #                                      trains as one population) or parameter names
    retrain: bool = True                 # afterwards fit the best on the training split, score it on the test split
    #                                      -> best.json
    retrain_subset: int | None = None    # ... on a stratified subset of this many training examples (None: all)
    test_subset: int | None = None       # ... scored on a stratified subset of the test split (None: all)
    data_root: str | None = None         # where a dataset given by name is loaded from (None: $BIODL_DATA, else ./data)
    name: str | None = None              # the dataset's name in the folder and tables (None: the name given, else
    #                                      "custom" for a utils.data.Dataset)
    evaluate: Callable | None = None     # evaluate(hyperparameters) -> per-fold scores, replacing make_classifier +
    #                                      cross-validation (tests)
    start: str | dict | None = "reference"  # evaluation 0: "reference" (spaces.reference_params: the paper's network
    #                                      for the compartmental model, its rates scaled for a fixed batch size), a
    #                                      dict (that point of the space), None (random)
    q: int | None = None                 # evaluations per round, side by side (None: 1 in this process, the
    #                                      cluster's worker threads on a cluster)
    cluster: object = None               # None (this process), "local" (a Dask cluster started and closed here: one
    #                                      worker per GPU, else CPU workers), "tcp://host:8786", a distributed.Client
    flip_prob: float | None = FLIP_PROB  # compartmental random draws: the paper's flags, each flipped with this
    #                                      probability, the GP picking among such draws; None: uniform flags and
    #                                      bayes_opt's own suggestions (the seed study)
    verbose: int = 1                     # 0: silent; 1: a progress bar per study and a line per evaluation
    protocol: str | None = None          # the named preset (PROTOCOLS) the sizes came from, recorded in config.json
    deadline: float | None = None        # time.time() after which no new round starts: the study stops, resumable
    #                                      (the command line's --max-minutes; not a setting of the results)

    def __post_init__(self):
        if self.q is not None and (not isinstance(self.q, (int, np.integer)) or self.q < 1):
            raise ValueError(f"q={self.q!r}: give a positive number of evaluations per round")
        if self.flip_prob is not None and not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob={self.flip_prob!r}: give a probability in [0, 1], or None for uniform flags")
        fixed = self.fixed or {}
        sizes = dict(iterations=self.iterations, epochs=self.epochs, subset=self.subset, max_phase=self.max_phase,
                     retrain_subset=self.retrain_subset, test_subset=self.test_subset,
                     batch_size=fixed.get("batch_size"), l_f_phase_test=fixed.get("l_f_phase_test"))
        for name, value in sizes.items():
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name}={value!r} (--{name.replace('_', '-')}): give a positive whole number"
                                 + (", or None for all" if "subset" in name else ""))
        if not _positive_int(self.folds) or self.folds < 2:
            raise ValueError(f"folds={self.folds!r} (--folds): cross-validation needs at least 2 folds; give 2 or more")
        if not isinstance(self.init_points, (int, np.integer)) or self.init_points < 0:
            raise ValueError(f"init_points={self.init_points!r} (--init-points): give 0 or more random configurations")


def _positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The sizes of one study row (model, dataset) under a named protocol of PROTOCOLS: every evaluation of the row
    at this one fidelity, the best retrained on the whole training split and tested on the whole test split."""
    subset: int | None      # examples cross-validated: a stratified subset of the training split (None: all);
    #                         each fold trains on (folds - 1) / folds of them and is scored on the rest
    epochs: int             # training epochs of every evaluation
    iterations: int         # evaluations of the row
    folds: int = 3          # cross-validation folds (3 in every protocol, as the seed study)
    test_phase: int | None = None   # compartmental: l_f_phase_test, time steps per scored example (None: 250,
    #                                 the paper's); the study's cost on CIFAR-10 is mostly this phase
    batch_size: int | None = None   # compartmental: the fixed batch size (None: the estimator's, 1: online)
    hold: str | None = None         # compartmental: "structure" holds the paper's structure (StudySettings.hold)


# Named protocols: (model, dataset) -> Protocol; a rule row ("mlp-fa") takes its own entry, else its network's,
# "*" is every row. "seed": the seed repository's protocol (RobertTLange/Bio-Plausible-DeepLearning: all examples,
# 10 epochs, 50 evaluations, 3 folds). "cpu": sized so that the nine seed rows and mlp-fa, mlp-dfa, mlp-sign on
# MNIST fit in 16 core-hours on a 2-core CPU (benchmarks/bench_protocol.py estimates it from probes); the
# compartmental CIFAR-10 row is sized for the engine's C kernels (docs/results.md, "The study's compartmental
# CIFAR-10 row"), the MNIST and Fashion-MNIST rows for the engine before them.
PROTOCOLS = {
    "seed": {"*": Protocol(subset=None, epochs=10, iterations=50)},
    "cpu": {
        ("mlp", "mnist"): Protocol(subset=30_000, epochs=4, iterations=50),
        ("mlp", "fashion"): Protocol(subset=30_000, epochs=4, iterations=50),
        ("mlp", "cifar10"): Protocol(subset=None, epochs=6, iterations=50),
        ("cnn", "mnist"): Protocol(subset=30_000, epochs=2, iterations=50),
        ("cnn", "fashion"): Protocol(subset=30_000, epochs=2, iterations=50),
        ("cnn", "cifar10"): Protocol(subset=30_000, epochs=2, iterations=50),
        ("compartmental", "mnist"): Protocol(subset=15_000, epochs=2, iterations=50, test_phase=100, batch_size=16,
                                             hold="structure"),
        ("compartmental", "fashion"): Protocol(subset=15_000, epochs=2, iterations=30, test_phase=100,
                                               batch_size=16, hold="structure"),
        ("compartmental", "cifar10"): Protocol(subset=20_000, epochs=2, iterations=30, test_phase=100,
                                               batch_size=16, hold="structure"),
    },
}


def protocol_sizes(name, model, dataset):
    """The Protocol of the row (model, dataset) under PROTOCOLS[name]."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    table = PROTOCOLS[name]
    for key in ((model, dataset), (split_model(model)[0], dataset), "*"):
        if key in table:
            return table[key]
    raise ValueError(f"protocol {name!r} has no sizes for {model} on {dataset}; give them with --subset, --epochs "
                     f"and --iterations instead, or add the row to utils.study.PROTOCOLS")


def protocol_settings(protocol, model, dataset, **overrides):
    """The StudySettings of the row (model, dataset) under the named `protocol` (its sizes, the best retrained on
    the whole splits), `overrides` replacing any field."""
    P = protocol_sizes(protocol, model, dataset)
    kw = dict(iterations=P.iterations, folds=P.folds, epochs=P.epochs, subset=P.subset, protocol=protocol,
              retrain_subset=None, test_subset=None)
    kind = get_kind(model)
    kw.update(fixed=_fixed(kind, P.batch_size, P.test_phase) or None, hold=P.hold if kind.structure else None)
    return StudySettings(**{**kw, **overrides})


def _fixed(kind, batch_size, test_steps):
    """The settings a study of `kind` fixes: the batch size where its space does not search it, the time steps of
    scoring an example where it has them (None values left out)."""
    fixed = {"batch_size": batch_size} if not kind.searches_batch_size else {}
    if kind.test_steps:
        fixed[kind.test_steps] = test_steps
    return {k: v for k, v in fixed.items() if v}


@dataclasses.dataclass(frozen=True)
class _Run:
    """One study as it runs: its settings (resolved: name, q, start, fixed, flip_prob), data and where it trains."""
    model: str
    settings: StudySettings
    ds: Dataset
    study_dir: Path
    space: dict
    held: dict           # parameters held at the reference (settings.hold), merged into every point of `space`
    in_shape: tuple
    chance: float
    dev: object          # the torch.device of this process's data
    base: dict           # make_classifier arguments of every evaluation: max_epochs, device, verbose
    accepts: set         # make_classifier's keyword names beyond the searched ones (evaluation.estimator_accepts)
    executor: object     # utils.cluster.Local or Distributed


def run_study(model, dataset, settings=None, **overrides):
    """Tune `model` ("mlp", "cnn", "compartmental", or one under another rule: "mlp-fa", ...) on `dataset` by
    Bayesian optimization of the mean cross-validated accuracy (settings.folds folds after settings.epochs epochs);
    settings.iterations trained evaluations in all (resumes from <out>/<model>_<name>/ when it exists: the ones
    already logged are not redone). `settings`: a StudySettings (default: StudySettings(); protocol_settings(...)
    for a named protocol), `overrides` replace its fields (run_study("mlp", "mnist", iterations=5)). dataset: a
    name of utils.data.DATASETS, or a utils.data.Dataset. An `out` that cannot be written is refused before the
    data is loaded (StudyError), sizes the data cannot serve before anything trains (ValueError). Returns dict(study_dir,
    evals (DataFrame), summary (one-row DataFrame), best (record), test_acc, complete (False when settings.deadline
    stopped it: run it again to resume), wall_s)."""
    t0 = time.time()
    S, ds, study_dir = _opened(model, dataset, dataclasses.replace(settings or StudySettings(), **overrides))
    X, y = ds.X_train, ds.y_train
    if S.subset:
        X, y = stratified_subset(X, y, int(S.subset), seed=S.seed)
    dev = _data_device(S, X)
    fixed = dict(S.fixed or {})
    held = held_params(model, S.hold, S.max_phase, fixed.get("batch_size"))
    space = make_space(model, S.max_phase, held)
    S = dataclasses.replace(S, fixed=fixed, start=start_point(model, space, S.start, fixed.get("batch_size")),
                            flip_prob=S.flip_prob if get_kind(model).flags else None)
    config = _study_config(model, S, len(ds.classes), X, space, held)
    prov = provenance(device=dev)
    client, own_cluster = connect(S.cluster, S.verbose)
    try:
        with study_lock(study_dir):
            check_config(study_dir, config)
            S = dataclasses.replace(S, q=S.q or (1 if client is None else slots(client)))
            write_json(study_dir / "config.json", {**config, "iterations": S.iterations, "q": S.q,
                                                   "retrain_subset": S.retrain_subset, "test_subset": S.test_subset,
                                                   "versions": library_versions(dev), "provenance": prov})
            run = _make_run(model, S, ds, study_dir, (space, held), (X, y), client, dev)
            n_before = len(load_done(study_dir / "evals.jsonl")[1])
            try:
                records = _run_rounds(run)
                n_evals = len({r["iteration"] for r in records if r["status"] != "invalid"})
                test_acc, best, complete = None, best_record(records), n_evals >= S.iterations
                if S.retrain and best is not None and complete and not _past(S.deadline):
                    test_acc = _retrain(run, best, n_evals, prov)
            finally:
                run.executor.close()
                _log_invocation(study_dir, prov, t0, n_before, study_dir / "evals.jsonl", S.iterations)
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    evals = load_results(study_dir)
    return dict(study_dir=study_dir, evals=evals, summary=summarize(evals), best=best, test_acc=test_acc,
                complete=complete, wall_s=round(time.time() - t0, 1))


def _opened(model, dataset, S):
    """(settings with the dataset's name, the Dataset, the study's folder) once the model and dataset are known, the
    folder writable (else StudyError) and the data large enough for the sizes (else ValueError)."""
    if find_kind(model) is None:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(SPACES)}")
    if not isinstance(dataset, (str, Dataset)):
        raise TypeError(f"dataset must be a dataset name or a utils.data.Dataset, not {type(dataset).__name__}")
    S = dataclasses.replace(S, name=S.name or (dataset if isinstance(dataset, str) else "custom"))
    study_dir = Path(S.out) / f"{model}_{S.name}"
    writable_folder(study_dir, _refused_out(study_dir))
    ds = load_dataset(dataset, root=S.data_root, device=S.device) if isinstance(dataset, str) else dataset
    _check_data_sizes(S, ds)
    return S, ds, study_dir


def _data_device(S, X):
    """The torch.device of this process's data: settings.device when given, else where the data is."""
    return get_device(S.device) if S.device is not None else X.device


def _study_config(model, S, n_classes, X, space, held):
    """config.json's settings that shape the results (check_config refuses to resume a study with others)."""
    config = dict(model=model, dataset=S.name, folds=S.folds, epochs=S.epochs, seed=S.seed, subset=S.subset,
                  n_train=len(X), n_classes=n_classes, in_shape=[int(d) for d in X.shape[1:]],
                  init_points=S.init_points, fixed=S.fixed, max_phase=S.max_phase, space=space, start=S.start,
                  flip_prob=S.flip_prob)
    if held:                                 # (absent when nothing is held: older studies resume unchanged)
        config["held"] = held
    if S.protocol:
        config["protocol"] = S.protocol
    return config


def _check_data_sizes(S, ds):
    """Refuse sizes the data cannot serve: fewer examples than folds x classes (a fold without some class), a
    retraining or test subset without every class."""
    n_classes, n_train = len(ds.classes), len(ds.y_train)
    need = S.folds * n_classes
    have = min(S.subset or n_train, n_train)
    if have < need:
        given = f"subset={S.subset} (--subset {S.subset})" if S.subset else f"the {n_train} training examples"
        raise ValueError(f"{given}: {S.folds}-fold cross-validation of {n_classes} classes needs at least {need} "
                         f"examples (folds x classes, each class in every fold); give --subset {need} or more"
                         + (f", or leave it out to use all {n_train}" if S.subset else ""))
    for name, value in (("retrain_subset", S.retrain_subset), ("test_subset", S.test_subset)):
        if value is not None and value < n_classes:
            raise ValueError(f"{name}={value} (--{name.replace('_', '-')} {value}): give at least {n_classes} "
                             f"(one example of each class), or leave it out to use the whole split")


def _make_run(model, S, ds, study_dir, searched, data, client, dev):
    """The _Run of a study: the base arguments of every evaluation and the executor where they run. `searched`:
    (the space, the parameters held at the reference), `data` (X, y) cross-validated on `dev` (_data_device)."""
    (space, held), (X, y) = searched, data
    n_classes = len(ds.classes)
    accepts = estimator_accepts(model)
    device = str(dev) if client is None else S.device
    base = {k: v for k, v in dict(max_epochs=S.epochs, device=device, verbose=0).items() if k in accepts}
    ctx = dict(model=model, folds=S.folds, seed=S.seed, chance=1.0 / n_classes, token=f"{study_dir}:{len(y)}",
               device=device)
    executor = Local((X, y), ctx, S.evaluate) if client is None else Distributed(client, (X, y), ctx, S.evaluate)
    in_shape = tuple(int(d) for d in X.shape[1:])
    return _Run(model, S, ds, study_dir, space, held, in_shape, 1.0 / n_classes, dev, base, accepts, executor)


def _past(deadline):
    return deadline is not None and time.time() >= deadline


def _log_invocation(study_dir, prov, t0, n_before, log_path, iterations):
    """One line of invocations.jsonl per run of the study (a resumed study has several): its provenance, wall time
    and the evaluations logged before and after."""
    n_after = len({r["iteration"] for r in read_log(log_path, repair=False) if r["status"] != "invalid"}) \
        if log_path.exists() else 0
    append_jsonl(study_dir / "invocations.jsonl", dict(provenance=prov, wall_s=round(time.time() - t0, 1),
                                                       evals_before=n_before, evals_after=n_after,
                                                       complete=n_after >= iterations))


def _next_round(done, iterations, q):
    """(first iteration, size) of the round to run: the unfinished round that holds the first missing evaluation,
    as it was started (its records carry round and round_size), else the next q evaluations."""
    first = min(i for i in range(iterations + len(done) + 1) if i not in done)
    for r in done.values():
        start, size = int(r.get("round", r["iteration"])), int(r.get("round_size", 1))
        if start <= first < start + size:
            return start, size
    return first, max(1, min(q, iterations - first))


def _run_rounds(run):
    """The study's loop: rounds of q proposals evaluated side by side, each logged when it finishes; returns the
    log's records.

    Rounds: each round proposes q points at once (the points proposed earlier in the round enter the Gaussian process
    at a lie, the lowest score so far: with_lies, the constant liar) and evaluates them side by side: in this process
    one after the other (cluster=None; the compartmental candidates of one structure still train as one population),
    or as tasks on Dask distributed (cluster="local": a LocalCluster, or one worker per GPU with dask_cuda; a scheduler
    address or a Client: a running cluster). Every evaluation is appended to the log when it finishes, by this process
    only; the next round starts when the whole round is in. q = 1 in this process is the study as it was before rounds.

    Evaluation number i (the record's "iteration", 0-based) trains with seed + i, wherever it runs; the folds are fixed
    by `seed`; the proposals of the round that starts at evaluation i are made from the evaluations before i, with the
    optimizer's random state re-seeded from (seed, i): a study killed half-way through a round, resumed, proposes that
    round again exactly as it was (its records carry the round and its size, even if q changed) and runs only its
    unfinished evaluations, so that it ends as the uninterrupted study would have.
    """
    model, S = run.model, run.settings
    log_path = run.study_dir / "evals.jsonl"
    rng = np.random.RandomState(S.seed)
    optimizer = make_optimizer(run.space, rng)
    search = _search(run, optimizer, rng)
    records, done = load_done(log_path)
    registered = set()

    def register_below(limit):
        for it in sorted(done):
            if it < limit and it not in registered:
                register(optimizer, done[it]["params"], done[it]["target"])
                registered.add(it)

    tag = f"[{model}/{S.name}]"
    bar = tqdm(total=S.iterations, initial=len(done), desc=f"{model}/{S.name}", unit="eval", disable=not S.verbose,
               leave=False, mininterval=0)
    if S.verbose and done:
        bar.write(f"{tag} resuming {run.study_dir}: {len(done)} evaluations done", file=sys.stdout)
    while len(done) < S.iterations and not _past(S.deadline):
        first, size = _next_round(done, S.iterations, S.q)
        register_below(first)
        meta, jobs = _round_jobs(run, propose(optimizer, rng, search, first, size), first, done)
        for _, results in run.executor.run(groups(model, jobs, S.evaluate)):
            for it, result in results:
                new = log_records(model, it, first, size, S.seed, meta[it], result)
                append_jsonl(log_path, *new)
                records += [json.loads(dumps(r)) for r in new]
                done[it] = records[-1]
                _progress(bar, tag, result, done, meta[it][1])
        register_below(first + size)
    bar.close()
    return records


def _hyperparameters(run, params):
    """make_classifier's arguments at a point of the space (the held parameters added)."""
    return to_hyperparameters(run.model, {**run.held, **params})


def _search(run, optimizer, rng):
    """The study's Search: its validity check, start point and random draws (the flag prior where flip_prob is set)."""
    S, model = run.settings, run.model
    sample = None
    if S.flip_prob is not None:
        ref = reference_params(model, run.space)
        sample = flag_sampler(optimizer, rng, {f: ref[f] for f in get_kind(model).flags if f in run.space},
                              S.flip_prob)

    def check(params):
        return check_hyperparameters(model, _hyperparameters(run, params), run.in_shape)

    return Search(S.seed, S.init_points, check, S.start, sample)


def _round_jobs(run, picked, first, done):
    """What the round of points `picked` (from propose, the round starting at evaluation `first`) runs: ({iteration:
    (params, source, rejected, invalid, hyperparameters, the invalid suggestion's)}, [(iteration, make_classifier
    arguments)]) for the evaluations not yet `done`."""
    S, meta, jobs = run.settings, {}, []
    for it, (params, source, rejected, invalid) in enumerate(picked, start=first):
        if it in done:
            continue
        hp = _hyperparameters(run, params)
        invalid_hp = None if invalid is None else _hyperparameters(run, invalid[0])
        meta[it] = (params, source, rejected, invalid, hp, invalid_hp)
        jobs.append((it, {**run.base, **seed_kw(run.accepts, S.seed + it), **hp, **S.fixed}))
    return meta, jobs


def _progress(bar, tag, result, done, source):
    """One more evaluation on the study's bar (the best so far in its postfix) and, when the bar is on (verbose),
    a line above it: score, best so far, time, and the bar's own estimate of the time left."""
    best = max(r["target"] for r in done.values())
    bar.set_postfix(best=f"{best:.4f}", refresh=False)
    bar.update(1)
    if bar.disable:
        return
    d = bar.format_dict
    eta = tqdm.format_interval((d["total"] - d["n"]) / d["rate"]) if d["rate"] else "?"
    what = (f"cv {result['target']:.4f}" if result["status"] == "ok"
            else f"{result['status']} at chance ({(result['reason'] or '')[:80]})")
    bar.write(f"{tag} {len(done)}/{d['total']} {what}  best {best:.4f}  {result['time_s']:.1f} s  ETA {eta}  "
              f"({source})", file=sys.stdout)


def _retrain(run, best, n_evals, prov):
    """Fit the best configuration on the training split, score it on the test split, write best.json."""
    S, ds = run.settings, run.ds
    path = run.study_dir / "best.json"
    if path.exists():
        old = json.loads(path.read_text())
        if (old.get("iteration"), old.get("n_evals"), old.get("retrain_subset"), old.get("test_subset")) == \
                (best["iteration"], n_evals, S.retrain_subset, S.test_subset):
            return old.get("test_acc")
    X, y, Xt, yt = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    if S.retrain_subset:
        X, y = stratified_subset(X, y, int(S.retrain_subset), seed=S.seed)
    if S.test_subset:
        Xt, yt = stratified_subset(Xt, yt, int(S.test_subset), seed=S.seed)
    kw = {**run.base, **seed_kw(run.accepts, S.seed), **best["hyperparameters"], **S.fixed}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    if S.verbose:
        print(f"[{run.model}/{S.name}] retraining the best (#{best['iteration']}, cv {best['target']:.4f}) on "
              f"{len(y)} examples", flush=True)
    result = run.executor.call(retrain_task, run.model, kw, (X, y), (Xt, yt), run.chance,
                               str(run.dev) if run.base.get("device") is not None else None)
    test_acc = result["target"] if result["status"] == "ok" else None
    write_json(path, dict(iteration=best["iteration"], n_evals=n_evals, cv_mean=best["target"],
                          hyperparameters=best["hyperparameters"], params=best["params"], test_acc=test_acc,
                          status=result["status"], reason=result["reason"], n_train=len(y), n_test=len(yt),
                          retrain_subset=S.retrain_subset, test_subset=S.test_subset, time_s=result["time_s"],
                          peak_mem_mb=result["peak_mem_mb"], mem_kind=result["mem_kind"],
                          study=dict(protocol=S.protocol, folds=S.folds, epochs=S.epochs, subset=S.subset,
                                     fixed=S.fixed, seed=S.seed), provenance=prov))
    return test_acc


# ----------------------------------------------------------------------------------------------------------------
# command line


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where its help does not already say it and there is one to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m utils.study",
                                description="Bayesian optimization of a model's hyperparameters with k-fold "
                                            "cross-validation; resumes from --out when started again.",
                                epilog="The notebooks read finished full studies from logs/full: run the full study "
                                       "with --out logs/full (README, 'The full replication'). --protocol cpu: "
                                       "the study sized for a 2-core CPU, in pieces of --max-minutes.",
                                formatter_class=_Help)
    p.add_argument("--model", nargs="+", default=["mlp"], choices=tuple(dict.fromkeys((*SPACES, *rule_models()))),
                   help="models to tune (mlp-fa, cnn-sign, ...: the MLP or CNN under another learning rule)")
    p.add_argument("--dataset", nargs="+", default=["mnist"], choices=("mnist", "fashion", "cifar10"),
                   help="datasets, one study per model and dataset")
    p.add_argument("--protocol", default=None, choices=tuple(PROTOCOLS),
                   help="named sizes per model and dataset (utils.study.PROTOCOLS): 'seed', the seed study's (all "
                        "examples, 10 epochs, 50 evaluations, 3 folds); 'cpu', sized for a 2-core CPU. The best is "
                        "retrained on the whole training split and tested on the whole test split; size options "
                        "given beside it override its sizes")
    _add_size_options(p)
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting evaluations after this many "
                   "minutes: the running one finishes and is saved; run the same command again to resume")
    p.add_argument("--out", default="logs", help="studies go to OUT/<model>_<dataset>/")
    p.add_argument("--seed", type=int, default=0, help="seed of the optimizer, folds and models")
    p.add_argument("--hold", nargs="+", default=None, metavar="PARAM",
                   help="search-space parameters held at the reference configuration instead of searched; "
                        "'structure': the compartmental network's flags, time step, phases and layers, so that each "
                        "round's candidates train as one population (compartmental studies only)")
    p.add_argument("--init-points", type=int, default=5, help="random configurations before the GP proposes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data-root", default=None, help="default: $BIODL_DATA, else ./data")
    p.add_argument("--flip-prob", type=float, default=FLIP_PROB, help="compartmental: probability of flipping each "
                   "option flag of the paper's configuration in random draws (0.5: uniform, as the seed study)")
    p.add_argument("--q", type=int, default=None, help="evaluations per round, run side by side (default: 1 in "
                   "this process, else the cluster's worker threads)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786 "
                   "(see README: dask scheduler + one dask worker per GPU)")
    p.add_argument("--workers", type=int, default=None, help="start a local Dask cluster of this many workers "
                   "(0: evaluate in this process; default: one worker per GPU when there are GPUs, else 0)")
    p.add_argument("--threads", type=int, default=None, help="evaluations at once per local worker (default: "
                   "1 per CPU worker, 2 per GPU worker)")
    p.add_argument("--no-retrain", action="store_true", help="skip retraining the best on the training split")
    p.add_argument("--no-reference", action="store_true", help="make the first evaluation random instead of the "
                                                                "reference configuration (reference())")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no line per evaluation")
    p.add_argument("--summary", action="store_true", help="only print the table of the studies under --out (also "
                                                          "while they run)")
    return p


def _add_size_options(p):
    """The options that size a study (each given one overrides the protocol's size)."""
    p.add_argument("--iterations", type=int, default=None, help="trained evaluations per study (default: 50, or "
                                                                 "the protocol's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of every evaluation (default: 10, or "
                                                             "the protocol's)")
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds per evaluation (default: 3)")
    p.add_argument("--subset", type=int, default=None, help="cross-validate on a stratified subset of this many "
                   "training examples (default: all, or the protocol's; at least folds x classes)")
    p.add_argument("--batch-size", type=int, default=None, help="fixed batch size (compartmental; the backprop "
                                                                "nets search theirs; default: 1, or the protocol's)")
    p.add_argument("--test-phase", type=int, default=None, help="compartmental: time steps per scored example "
                   "(l_f_phase_test; default: the paper's 250, or the protocol's)")
    p.add_argument("--max-phase", type=int, default=None, help="cap the compartmental phase lengths (reduced runs; "
                   "default: none)")
    p.add_argument("--retrain-subset", type=int, default=None, help="retrain the best on a stratified subset of "
                   "this many training examples (default: the whole training split)")
    p.add_argument("--test-subset", type=int, default=None, help="test the retrained best on a stratified subset "
                   "of this many test examples (default: the whole test split)")


POSITIVE = ("iterations", "epochs", "subset", "retrain_subset", "test_subset", "batch_size", "test_phase",
            "max_phase", "q", "threads", "max_minutes")   # size options that must be > 0 when given
NON_NEGATIVE = ("workers", "init_points")


def _check_args(p, args):
    """Refuse impossible sizes before anything is loaded, naming the option and what to give instead."""
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(args, name)
        low = 0 if name in NON_NEGATIVE else 1 if name != "max_minutes" else 1e-9
        if value is not None and value < low:
            option = "--" + name.replace("_", "-")
            p.error(f"{option} {value}: give a positive number" + (" (or 0)" if name in NON_NEGATIVE else "")
                    + (" or leave it out for all" if "subset" in name else ""))
    if args.folds is not None and args.folds < 2:
        p.error(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    if not 0 <= args.flip_prob <= 1:
        p.error(f"--flip-prob {args.flip_prob}: give a probability in [0, 1]")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        if not args.summary:
            writable_folder(args.out, _refused_out(args.out))
            _run_cli_studies(args, argv)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
            print(summarize(args.out))
    except (ValueError, StudyError) as e:
        sys.exit(f"error: {e}")


def settings_from_args(args, client=None, model="mlp", dataset="mnist"):
    """The StudySettings of the command line's options for the row (model, dataset): the protocol's sizes (or
    StudySettings' defaults), replaced by the size options given."""
    kind = get_kind(model)
    P = protocol_sizes(args.protocol, model, dataset) if args.protocol else Protocol(None, 10, 50)
    pick = lambda given, preset: preset if given is None else given   # noqa: E731
    fixed = _fixed(kind, pick(args.batch_size, P.batch_size), pick(args.test_phase, P.test_phase))
    hold = None if not args.hold else "structure" if args.hold == ["structure"] else tuple(args.hold)
    hold = pick(hold, P.hold if kind.structure else None)
    return StudySettings(iterations=pick(args.iterations, P.iterations), folds=pick(args.folds, P.folds),
                         epochs=pick(args.epochs, P.epochs), out=args.out, seed=args.seed,
                         subset=pick(args.subset, P.subset), device=args.device, init_points=args.init_points,
                         retrain=not args.no_retrain, retrain_subset=args.retrain_subset,
                         test_subset=args.test_subset, data_root=args.data_root, q=args.q, cluster=client,
                         flip_prob=args.flip_prob, start=None if args.no_reference else "reference",
                         verbose=0 if args.quiet else 1, protocol=args.protocol,
                         max_phase=args.max_phase if kind.phases else None,
                         hold=hold if kind.structure or hold != "structure" else None, fixed=fixed or None,
                         deadline=None if args.max_minutes is None else time.time() + 60 * args.max_minutes)


def _refused_out(path):
    """The StudyError of an --out `path` that cannot be written (utils.io.writable_folder's refusal)."""
    return lambda why: StudyError(f"--out {path}: cannot write there ({why}); give --out a folder you can write to "
                                  f"(it is created when missing)")


def _run_cli_studies(args, argv=None):
    client = own = None
    workers = args.workers if args.workers is not None else (1 if gpu_count() and args.scheduler is None else 0)
    try:
        if args.scheduler is not None or workers > 0:
            client, own = start_client(args.scheduler, workers=workers or None, threads=args.threads,
                                       verbose=0 if args.quiet else 1)
    except ClusterError as e:
        raise StudyError(str(e)) from None
    try:
        deadline = settings_from_args(args).deadline
        for model in args.model:
            for dataset in args.dataset:
                settings = dataclasses.replace(settings_from_args(args, client, model, dataset), deadline=deadline)
                res = run_study(model, dataset, settings) if not _past(deadline) else None
                if res is None or not res["complete"]:
                    _say_how_to_resume(args, argv, model, dataset, res)
                    return
    finally:
        if own is not None:
            client.close()
            own.close()


def _say_how_to_resume(args, argv, model, dataset, res):
    where = "" if res is None else f" ({int(res['summary'].n_evals.iloc[0]) if len(res['summary']) else 0} " \
                                   f"evaluations logged in {res['study_dir']})"
    command = "python -m utils.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"stopped after --max-minutes {args.max_minutes:g} at {model}/{dataset}{where}; everything finished is "
          f"saved. Resume with the same command: {command}", flush=True)


if __name__ == "__main__":
    main()
