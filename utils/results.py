"""The committed results of real runs: single trainings on whole splits, recorded with everything that made them.

    python -m utils.results list                              # every piece: done, started or left, its estimate
    python -m utils.results run mnist/mlp mnist/cnn           # train those pieces, write results/single/*.json
    python -m utils.results run --all --max-minutes 110       # the pieces left, in order, within a time budget
    python -m utils.results figures                           # README's figures from the committed records
    python -m utils.results table | study-table               # README's tables (single trainings; the study)

A piece is one training of one model on one dataset's whole training split, less `n_valid` held-out validation
examples that the logger validates on `records_per_epoch` times an epoch, tested on the whole test split
(`test_every` epochs and after the last). Its record, results/single/DATASET_MODEL.json, holds the piece's
configuration, `utils.io.provenance()` (commit, versions, machine, command), the logger's records (learning
curves, weight norms and changes, angles to backprop), the per-epoch training record of `utils.train.train_epochs`,
the test accuracy and the wall time. It is rewritten after every epoch with finished=false, so a stopped piece
shows how far it got; a piece that did not finish starts afresh when run again (pieces are sized to under an hour
of one core here). Checkpoints and datasets are never written under results/.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from utils.classifiers import make_classifier
from utils.compartmental import PAPER_TEST_ERROR, batch_f_etas
from utils.data import load_dataset
from utils.io import jsonable, provenance, write_json
from utils.kinds import get_kind
from utils.logger import TrainingLogger
from utils.plot_study import DATASET_ORDER, plot_rule_angles, plot_study
from utils.plotting import plot_bp_angle, plot_learning_curves, plot_weight_dynamics
from utils.runs import records_frame
from utils.study_log import load_results, summarize
from utils.train import EpochRun, train_epochs

RESULTS = Path(__file__).resolve().parent.parent / "results"

# reference numbers (accuracy, %): the seed study's best 3-fold cross-validated accuracy per row (its committed
# logs, logs/bo_logs_*.json) and the paper's MNIST test accuracy after 60 epochs, 1 hidden layer
SEED_STUDY = {("mlp", "mnist"): 96.8, ("mlp", "fashion"): 87.3, ("mlp", "cifar10"): 45.3,
              ("cnn", "mnist"): 99.0, ("cnn", "fashion"): 90.9, ("cnn", "cifar10"): 53.1,
              ("compartmental", "mnist"): 93.0, ("compartmental", "fashion"): 86.5,
              ("compartmental", "cifar10"): 37.1}
PAPER = {("compartmental", "mnist"): round(100 - PAPER_TEST_ERROR[1], 1)}


@dataclasses.dataclass(frozen=True)
class Piece:
    """One single training on a whole split: what it trains and how it is logged and tested."""
    dataset: str            # "mnist", "fashion" or "cifar10"
    model: str              # a make_classifier kind: "mlp", "cnn", "compartmental", "mlp-fa", ...
    hyperparameters: dict   # make_classifier's keyword arguments (the reference configuration), max_epochs aside
    epochs: int = 10        # passes over the training examples
    n_valid: int = 5000     # held out of the training split (seed 0) for the logger's validation records
    records_per_epoch: int = 10   # logger records per epoch
    max_valid: int = 1000   # validation examples per record (a fixed stratified subset of the held-out ones)
    test_every: int = 1     # test on the whole test split after every this many epochs and after the last
    seed: int = 0           # weights, batch order, feedback matrices, spikes
    minutes: float = 30.0   # the expected wall time on one core here (planning only: `list`, --max-minutes)

    @property
    def name(self):
        return f"{self.dataset}/{self.model}"

    def path(self, root=None):
        return Path(root or RESULTS) / "single" / f"{self.dataset}_{self.model}.json"


# the reference configurations (README's accuracy table; benchmarks/bench_training.py ACCURACY_MODELS, RULE_LR and
# RULE_SETTINGS)
_MLP = {"mnist": dict(hidden_sizes=(1000, 1000), lr=1e-3, batch_size=100),
        "fashion": dict(hidden_sizes=(1000, 1000), lr=1e-3, batch_size=100),
        "cifar10": dict(hidden_sizes=(1024, 512), lr=5e-4, batch_size=100)}
_CNN = {"mnist": dict(channels=(32, 64, 128), kernel_sizes=(3, 3, 3), padding=1, lr=1e-3, batch_size=100,
                      lr_schedule="cosine"),
        "fashion": dict(channels=(32, 64, 128), kernel_sizes=(3, 3, 3), padding=1, lr=1e-3, batch_size=100,
                        lr_schedule="cosine"),
        "cifar10": dict(channels=(64, 128, 256), kernel_sizes=(3, 3, 3), padding=1, lr=1e-3, batch_size=100,
                        lr_schedule="cosine")}
_RULE_LR = {("mnist", "fa"): 3e-4, ("mnist", "dfa"): 3e-4, ("fashion", "fa"): 3e-4, ("fashion", "dfa"): 3e-4,
            ("cifar10", "fa"): 1.25e-4, ("mnist", "sdtp"): 3e-4, ("fashion", "sdtp"): 3e-4, ("cifar10", "sdtp"): 1e-4}
_RULE_SETTINGS = {("cifar10", "sdtp"): dict(noise=1.0), ("cifar10", "pc"): dict(output_weight=0.1)}   # RULE_SETTINGS
_RULE_COST = {"fa": 1, "dfa": 1, "sign": 1, "dtp": 2, "sdtp": 2, "pc": 5}   # epoch time / backprop's, planning only
_COMPARTMENTAL = dict(n_hidden=(500,), batch_size=16, f_etas=batch_f_etas(16), record_backprop_angle=True)
_MINUTES = {("mnist", "mlp"): 9, ("fashion", "mlp"): 9, ("cifar10", "mlp"): 12, ("mnist", "cnn"): 15,
            ("fashion", "cnn"): 15, ("cifar10", "cnn"): 48, ("mnist", "compartmental"): 15,
            ("fashion", "compartmental"): 18, ("cifar10", "compartmental"): 40}


def _pieces():
    out = []
    for ds in ("mnist", "fashion", "cifar10"):   # the three models first, dataset by dataset
        out.append(Piece(ds, "mlp", _MLP[ds], minutes=_MINUTES[ds, "mlp"]))
        out.append(Piece(ds, "cnn", _CNN[ds], minutes=_MINUTES[ds, "cnn"]))
    for ds in ("mnist", "fashion", "cifar10"):   # the rules on the MLP (two hidden layers: FA and DFA differ)
        for rule in ("fa", "dfa", "sign"):
            hp = dict(_MLP[ds], lr=_RULE_LR.get((ds, rule), _MLP[ds]["lr"]))
            out.append(Piece(ds, f"mlp-{rule}", hp, minutes=_MINUTES[ds, "mlp"]))
    for ds in ("mnist", "fashion", "cifar10"):   # the paper's network, at least 5 epochs
        cifar = ds == "cifar10"
        out.append(Piece(ds, "compartmental", _COMPARTMENTAL, epochs=5, max_valid=300,
                         test_every=5 if cifar else 1, minutes=_MINUTES[ds, "compartmental"]))
    for ds in ("mnist", "fashion", "cifar10"):   # target propagation and predictive coding, the same MLP
        for rule in ("dtp", "sdtp", "pc"):
            hp = dict(_MLP[ds], lr=_RULE_LR.get((ds, rule), _MLP[ds]["lr"]), **_RULE_SETTINGS.get((ds, rule), {}))
            out.append(Piece(ds, f"mlp-{rule}", hp, minutes=_MINUTES[ds, "mlp"] * _RULE_COST[rule]))
    return {p.name: p for p in out}


PIECES = _pieces()


def load_record(piece, root=None):
    """The committed record of `piece` (a Piece or its name) under `root` (default results/), or None when it has
    not run."""
    path = (PIECES[piece] if isinstance(piece, str) else piece).path(root)
    return json.loads(path.read_text()) if path.exists() else None


def piece_config(piece, n_train, n_test):
    return jsonable(dict(dataset=piece.dataset, model=piece.model, epochs=piece.epochs, n_train=n_train,
                         n_valid=piece.n_valid, n_test=n_test, records_per_epoch=piece.records_per_epoch,
                         max_valid=piece.max_valid, test_every=piece.test_every, seed=piece.seed,
                         hyperparameters=piece.hyperparameters))


def _held_out(ds, n_valid, seed):
    """(X, y, X_valid, y_valid): `n_valid` random training examples held out (seed), the rest to train on."""
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed)).to(ds.y_train.device)
    valid, train = order[:n_valid], order[n_valid:]
    return ds.X_train[train], ds.y_train[train], ds.X_train[valid], ds.y_train[valid]


def run_piece(piece, ds, root=None, prov=None, log=print):
    """Train `piece` on the Dataset `ds` (its whole splits) and write its record under `root` after every epoch;
    returns it. `prov`: the provenance to record (default: utils.io.provenance() now)."""
    X, y, Xv, yv = _held_out(ds, piece.n_valid, piece.seed)
    logger = TrainingLogger(Xv, yv, records_per_epoch=piece.records_per_epoch, max_valid=piece.max_valid,
                            name=piece.model)
    clf = make_classifier(piece.model, logger=logger, max_epochs=piece.epochs, seed=piece.seed, verbose=0,
                          **piece.hyperparameters)
    config = piece_config(piece, len(y), len(ds.y_test))
    record = dict(piece=piece.name, config=config, provenance=prov or provenance(), finished=False)
    path = piece.path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save(line):
        log(f"{piece.name}: {line}")
        record.update(records=logger.records_, wall_s=time.perf_counter() - t0)
        write_json(path, record)

    _, train = train_epochs(clf, X, y, ds.X_test, ds.y_test, EpochRun(
        piece.epochs, test_every=piece.test_every, config=config, classes=np.arange(len(ds.classes)), log=save))
    record.update(training=train, test_accuracy=train["test_accuracy"], finished=train["finished"],
                  records=logger.records_, wall_s=time.perf_counter() - t0)
    write_json(path, record)
    return record


def _number(v):
    """A logged value back from strict JSON ("nan" strings: utils.io.jsonable) to a float."""
    return float(v) if isinstance(v, str) else v


def frame(record):
    """The logger's long table (utils.runs.records_frame) of one piece's record, with model and dataset columns;
    the run column is "dataset/model", unique across pieces."""
    records = [dict({k: _number(v) if k in ("train_loss", "train_acc", "valid_loss", "valid_acc") else v
                     for k, v in r.items()},
                    layers={n: tuple(map(_number, v)) for n, v in r["layers"].items()},
                    bp_angle={n: _number(v) for n, v in r["bp_angle"].items()}) for r in record["records"]]
    cfg = record["config"]
    return records_frame(records, run=record["piece"]).assign(model=cfg["model"], dataset=cfg["dataset"])


def table(names, root=None):
    """(long table of the finished pieces among `names`, [their record files, relative to `root`]); pieces not
    finished are left out."""
    frames, files = [], []
    for name in names:
        rec = load_record(name, root)
        if rec is not None and rec.get("finished"):
            frames.append(frame(rec))
            files.append(str(PIECES[name].path(root).relative_to(Path(root or RESULTS))))
    return (pd.concat(frames, ignore_index=True) if frames else None), files


DATASETS = ("mnist", "fashion", "cifar10")
MODELS = ("mlp", "cnn", "compartmental")
RULE_MODELS = ("mlp", "mlp-fa", "mlp-dfa", "mlp-sign", "mlp-dtp", "mlp-sdtp", "mlp-pc")


def _models_curves(df, path):
    return plot_learning_curves(df, by="model", col="dataset", path=path,
                                title="MLP, CNN and the compartmental network, whole training splits")


def _rules_curves(df, path):
    return plot_learning_curves(df.assign(model=df["model"].replace({"mlp": "mlp (backprop)"})), by="model",
                                col="dataset", path=path, title="the MLP under each learning rule")


def _weights(df, path):
    return plot_weight_dynamics(df, by="model", path=path, title=f"weight dynamics, {df['dataset'].iloc[0]}")


def _angle(df, path):
    return plot_bp_angle(df, by="dataset", path=path,
                         title="the compartmental network's hidden update against backprop's (the paper's Fig. 7A)")


def _rule_angles(df, path):
    local = df["model"].map(lambda m: get_kind(m).learning != "backprop")   # backprop has no angle to itself
    return plot_rule_angles(df[local], by="dataset", line="model", path=path,
                            title="each rule's hidden-layer updates against backprop's")


# figure -> (the pieces it draws, the function that draws their table); `figures` writes results/manifest.json
FIGURES = {
    "results_learning_curves": ([f"{d}/{m}" for d in DATASETS for m in MODELS], _models_curves),
    **{f"results_weight_dynamics_{d}": ([f"{d}/{m}" for m in MODELS], _weights) for d in DATASETS},
    "results_bp_angle": ([f"{d}/compartmental" for d in DATASETS], _angle),
    "results_rules_curves": ([f"{d}/{m}" for d in DATASETS for m in RULE_MODELS], _rules_curves),
    "results_rules_angles": ([f"{d}/{m}" for d in DATASETS for m in RULE_MODELS], _rule_angles),
}


STUDY_FIGURE = "results_study"   # the study figure (utils.plot_study) of the committed rows under results/study/


def _study_figure(root, out, log):
    """The study figure from the committed study rows under root/study (None when there is none), with the manifest
    entry naming each row's log."""
    folder = Path(root or RESULTS) / "study"
    evals = load_results(folder) if folder.is_dir() else pd.DataFrame()
    if evals.empty:
        log(f"{STUDY_FIGURE}: skipped, no study rows under {folder}")
        return None
    path = out / f"{STUDY_FIGURE}.png"
    plt.close(plot_study(evals, reference={k: v / 100 for k, v in SEED_STUDY.items()}, path=str(path),
                         title="the study (cpu protocol): each evaluation's 3-fold CV accuracy"))
    files = sorted(str(f.relative_to(Path(root or RESULTS))) for f in folder.glob("*/evals.jsonl"))
    log(f"{path}: {len(files)} study rows")
    return dict(files=files, missing=[], command="python -m utils.results figures")


def draw_figures(root=None, figures_dir=None, names=None, log=print):
    """Draw every figure of FIGURES (or `names`) from the finished pieces' records under `root` into `figures_dir`
    (default: the repository's figures/); a figure with no finished piece is skipped. Returns the manifest
    {figure file: {"files": [records, relative to root], "missing": [pieces], "command": ...}}, also written to root/manifest.json when drawing into the
    repository's figures/."""
    out = Path(figures_dir) if figures_dir else RESULTS.parent / "figures"
    manifest = {}
    for name in names or FIGURES:
        pieces, draw = FIGURES[name]
        df, files = table(pieces, root)
        if df is None:
            log(f"{name}: skipped, none of its pieces has finished")
            continue
        path = out / f"{name}.png"
        try:
            plt.close(draw(df, str(path)))
        except ValueError as e:   # e.g. no angle rows yet: only backprop's pieces have finished
            log(f"{name}: skipped, {e}")
            continue
        manifest[f"figures/{name}.png"] = dict(files=files, missing=[p for p in pieces if status(p, root) != "done"],
                                               command="python -m utils.results figures")
        log(f"{path}: {len(files)} of {len(pieces)} pieces")
    if names is None or STUDY_FIGURE in names:
        entry = _study_figure(root, out, log)
        if entry is not None:
            manifest[f"figures/{STUDY_FIGURE}.png"] = entry
    if figures_dir is None:
        write_json(Path(root or RESULTS) / "manifest.json", manifest)
    return manifest


def single_table(root=None):
    """README's table of the single trainings: one markdown row per finished piece (test accuracy on the whole test
    split, epochs, wall time, the record) beside the seed study's best CV accuracy and the paper's test accuracy."""
    lines = ["| model | dataset | test accuracy % | epochs | wall time | seed study best CV % | paper % | record |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, piece in PIECES.items():
        rec = load_record(name, root)
        if rec is None or not rec.get("finished"):
            continue
        kind = piece.model.partition("-")[0]
        ref = SEED_STUDY.get((piece.model, piece.dataset), "")
        lines.append(f"| {piece.model} | {piece.dataset} | **{100 * rec['test_accuracy']:.2f}** | {piece.epochs} | "
                     f"{rec['wall_s'] / 60:.0f} min | {ref} | {PAPER.get((kind, piece.dataset), '')} | "
                     f"`{piece.path(root).relative_to(Path(root or RESULTS).parent)}` |")
    return "\n".join(lines)


STUDY_ROWS = ("mlp", "cnn", "compartmental", "mlp-fa", "mlp-dfa", "mlp-sign")   # the study table's order per dataset


def study_table(root=None):
    """README's study table: one markdown row per committed study row under root/study (utils.study_log.summarize):
    the evaluations, the best, worst, mean and sd of their 3-fold CV accuracy, the best retrained on the whole
    training split and tested on the whole test split, beside the seed study's best, and the row's folder."""
    folder = Path(root or RESULTS) / "study"
    lines = ["| model | dataset | evaluations | examples x epochs | best CV % | worst | mean +- sd | best retrained, "
             "test % | seed's best CV % | wall time | log |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if not folder.is_dir():
        return "\n".join(lines)
    rows = summarize(folder)
    rank = lambda v, order: order.index(v) if v in order else len(order)   # noqa: E731
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: (rank(rows["dataset"].iloc[i], DATASET_ORDER),
                                                            rank(rows["model"].iloc[i], STUDY_ROWS)))]
    for r in rows.itertuples():
        config = json.loads((folder / f"{r.model}_{r.dataset}" / "config.json").read_text())
        size = f"{config['subset']:,}" if config.get("subset") else "all"   # examples cross-validated per evaluation
        test = "" if r.test_acc != r.test_acc else f"{100 * r.test_acc:.2f}"
        hours = "" if r.wall_s != r.wall_s else f"{r.wall_s / 3600:.1f} h"
        lines.append(f"| {r.model} | {r.dataset} | {r.n_evals} of {config['iterations']} | {size} x "
                     f"{config['epochs']} | **{100 * r.best:.2f}** | "
                     f"{100 * r.worst:.2f} | {100 * r.mean:.2f} +- {100 * r.std:.2f} | {test} | "
                     f"{SEED_STUDY.get((r.model, r.dataset), '')} | {hours} | "
                     f"`results/study/{r.model}_{r.dataset}/` |")
    return "\n".join(lines)


def status(piece, root=None):
    """"done", "started" (a record with finished=false: it stopped) or "left"."""
    rec = load_record(piece, root)
    return "left" if rec is None else "done" if rec.get("finished") else "started"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m utils.results", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every piece with its state and expected minutes")
    fig = sub.add_parser("figures", help="draw README's figures from the finished pieces (figures/, manifest)")
    fig.add_argument("--out", default=None, help="folder for the PNGs (default: the repository's figures/)")
    sub.add_parser("table", help="README's table of the finished pieces (markdown)")
    sub.add_parser("study-table", help="README's table of the committed study rows (markdown)")
    run = sub.add_parser("run", help="train pieces (whole splits) and write their records")
    run.add_argument("pieces", nargs="*", help=f"piece names ({', '.join(list(PIECES)[:3])}, ...)")
    run.add_argument("--all", action="store_true", help="every piece not done, in the listed order")
    run.add_argument("--only", nargs="+", default=None, help="with --all: only pieces whose model is one of these")
    run.add_argument("--max-minutes", type=float, default=None,
                     help="with --all: start no piece whose expected minutes would pass this budget")
    run.add_argument("--redo", action="store_true", help="run named pieces again even when done")
    run.add_argument("--data-root", default=None, help="folder holding the datasets (default: $BIODL_DATA)")
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args(argv)
    if args.command == "list":
        for name, piece in PIECES.items():
            rec = load_record(piece)
            acc = "" if not rec or rec.get("test_accuracy") is None else f"  test {100 * rec['test_accuracy']:.2f} %"
            print(f"{name:24s} {status(piece):8s} ~{piece.minutes:.0f} min{acc}")
        return 0
    if args.command == "table":
        print(single_table())
        return 0
    if args.command == "study-table":
        print(study_table())
        return 0
    if args.command == "figures":
        draw_figures(figures_dir=args.out)
        return 0
    unknown = [n for n in args.pieces if n not in PIECES]
    if unknown:
        p.error(f"unknown piece(s) {unknown}; `python -m utils.results list` names them")
    todo = [PIECES[n] for n in args.pieces if args.redo or status(n) != "done"]
    if args.all:
        todo += [q for q in PIECES.values() if status(q) != "done" and q not in todo
                 and (args.only is None or q.model in args.only)]
    torch.set_num_threads(args.threads)
    datasets, spent = {}, 0.0
    prov = provenance()   # once: the code that runs is the code of this start, whatever HEAD does meanwhile
    for piece in todo:
        if args.max_minutes is not None and spent + piece.minutes > args.max_minutes:
            print(f"{piece.name}: not started (~{piece.minutes:.0f} min would pass --max-minutes "
                  f"{args.max_minutes:g}); run the same command again", flush=True)
            continue
        if piece.dataset not in datasets:
            datasets[piece.dataset] = load_dataset(piece.dataset, root=args.data_root, device="cpu")
        t = time.perf_counter()
        command = f"python -m utils.results run {piece.name} --threads {args.threads}"
        rec = run_piece(piece, datasets[piece.dataset], prov=dict(prov, command=command),
                        log=lambda line: print(line, flush=True))
        spent += (time.perf_counter() - t) / 60
        print(f"{piece.name}: test accuracy {100 * rec['test_accuracy']:.2f} % in {rec['wall_s']:.0f} s; "
              f"{piece.path()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
