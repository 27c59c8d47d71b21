"""The reduced Bayesian-optimization study: every model on every dataset, small enough for a 2-core CPU (< 25 min).

    BIODL_DATA=/path/to/datasets python benchmarks/bench_study.py                    # 3 models x 3 datasets
    BIODL_DATA=/path/to/datasets python benchmarks/bench_study.py --models mlp --datasets mnist --iterations 5

Same code path as the full study (utils.study.run_study), scaled down: `--iterations` evaluations of `--folds`-fold
cross-validation after `--epochs` epochs on a stratified `--subset` of the training split. The slow compartmental
network has its own `--compartmental-iterations` and its own sizes per dataset (COMPARTMENTAL_SIZES below: enough
examples for it to learn, as it needs several thousand updates before it leaves chance; `--compartmental-subset`,
`--compartmental-epochs` and `--compartmental-retrain-subset` set them for every dataset), a fixed
`--compartmental-batch-size`, a test phase of `--test-phase` steps (250 in the paper) and its searched phase lengths
capped at `--max-phase` time steps (still searched, in [20, max_phase]); its option flags are drawn from the paper's
configuration with `--flip-prob`. By default (`--compartmental-search numbers`) its structure is held at the
paper's (flags, time step, phases, one hidden layer of 500) and only its numbers are searched (rates, conductances,
time constants, reversal potentials, lambda_max), so that each round's `--compartmental-q` candidates train with
their folds as one population (`fit_population`); `--compartmental-search all` searches the whole space. The best
of each study is retrained on a stratified `--retrain-subset` (not the full split) and scored on a stratified
`--test-subset` of the test split. The nine studies run `--parallel` at a time (default 2, one per core here), each
in a worker process of a local Dask cluster, the compartmental ones first (CIFAR-10's, the longest, at once); with
`--parallel 1` they run one after the other in this process, and their evaluations `--q` at a time on a local Dask
cluster of `--workers` processes (`--workers 0`: in this process). Prints each study's wall time, the total, and the
results table.
Studies are written to `--out` (default logs/bench_study, git-ignored); a rerun resumes them, `--fresh` starts over.
torch runs single-threaded by default (`--threads`): on the shared 2-core machine two threads per process
oversubscribed the cores and made a small MLP cross-validation 16x slower (15.8 s against 0.96 s).
"""
import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from distributed import as_completed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.cluster import start_client, undo_dask_malloc_trim  # noqa: E402
from utils.study import StudySettings, run_study  # noqa: E402
from utils.study_log import load_results, summarize  # noqa: E402

# the compartmental network's sizes per dataset: (examples cross-validated in 2 folds, epochs, examples the best is
# retrained on, evaluations). 10,000 examples and 4 epochs are what it needs to pass 80 % CV on MNIST (the target)
# and to leave chance on CIFAR-10 (at 5,000 examples and 2 epochs all three CIFAR-10 candidates stayed at chance).
# CIFAR-10 (3,072 dense inputs: about 5x MNIST's time per example) evaluates the paper's network alone, so that its
# study, the longest, fits in 25 minutes on one core while the other studies run on the other (--parallel 2).
# --compartmental-subset / -epochs / -retrain-subset / -iterations override them for every dataset.
COMPARTMENTAL_SIZES = {"mnist": (10000, 4, 5000, 3), "fashion": (10000, 4, 5000, 3), "cifar10": (10000, 4, 5000, 1)}


def study_task(model, dataset, settings, threads):
    """One study in a worker process (--parallel): its wall time."""
    torch.set_num_threads(threads)
    undo_dask_malloc_trim()
    t = time.perf_counter()
    run_study(model, dataset, settings)
    return time.perf_counter() - t


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn", "compartmental"])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion", "cifar10"])
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--init-points", type=int, default=3)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=1000, help="training examples cross-validated (MLP, CNN)")
    p.add_argument("--compartmental-iterations", type=int, default=None, help="default: COMPARTMENTAL_SIZES")
    p.add_argument("--compartmental-subset", type=int, default=None,
                   help="examples cross-validated (default: COMPARTMENTAL_SIZES, e.g. MNIST 10,000: 2 folds of 5,000 "
                        "to train and 5,000 to test)")
    p.add_argument("--compartmental-epochs", type=int, default=None, help="default: COMPARTMENTAL_SIZES")
    p.add_argument("--test-phase", type=int, default=100, help="compartmental test phase, time steps (paper: 250)")
    p.add_argument("--flip-prob", type=float, default=None, help="compartmental flag flips (default: the study's)")
    p.add_argument("--compartmental-batch-size", type=int, default=16, help="fixed (not searched) batch size")
    p.add_argument("--max-phase", type=int, default=60, help="cap of the compartmental phase lengths (time steps)")
    p.add_argument("--retrain-subset", type=int, default=2000, help="examples the best is retrained on (MLP, CNN)")
    p.add_argument("--compartmental-retrain-subset", type=int, default=None, help="default: COMPARTMENTAL_SIZES")
    p.add_argument("--test-subset", type=int, default=500, help="test examples scoring the retrained best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="logs/bench_study")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared 2-core machine two "
                                                          "threads oversubscribe and run many times slower)")
    p.add_argument("--workers", type=int, default=0, help="local Dask workers (0: evaluate in this process; on this "
                                                          "CPU a cluster was slower, see README)")
    p.add_argument("--parallel", type=int, default=2, help="studies run side by side, each in a worker process of "
                   "--threads threads on a local Dask cluster, the longest first (1: one after the other here)")
    p.add_argument("--q", type=int, default=None, help="MLP/CNN evaluations per round (default: one per worker)")
    p.add_argument("--compartmental-q", type=int, default=3, help="compartmental evaluations per round: with the "
                   "structure held they train, with their folds, as one population")
    p.add_argument("--quiet", action="store_true", help="no progress line per evaluation")
    p.add_argument("--compartmental-search", choices=("numbers", "all"), default="numbers",
                   help="numbers: the paper's structure held (flags, time step, phases, layers), its rates, "
                        "conductances and time constants searched, a round's candidates trained as one population; "
                        "all: the whole space (the structure drawn too)")
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    if args.workers and args.parallel > 1:
        p.error("--workers (evaluations on a Dask cluster) and --parallel > 1 (studies on one) exclude each other: "
                "give --parallel 1 with --workers")
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    t0, times = time.perf_counter(), []
    client = own = None
    if args.workers:
        client, own = start_client(workers=args.workers, threads=1, verbose=0 if args.quiet else 1)
    compartmental_on, studies = _studies(args, out, client)
    try:
        _run(args, studies, t0, times)
    finally:
        if own is not None:
            client.close()
            own.close()
    return _report(args, out, times, time.perf_counter() - t0, compartmental_on)


def _studies(args, out, client):
    """(compartmental_on: dataset -> the compartmental StudySettings, [(model, dataset, settings), ...])."""
    settings = StudySettings(folds=args.folds, out=out, seed=args.seed, device=args.device,
                             init_points=args.init_points, test_subset=args.test_subset, q=args.q, cluster=client,
                             verbose=0 if args.quiet else 1)
    if args.flip_prob is not None:
        settings = dataclasses.replace(settings, flip_prob=args.flip_prob)
    backprop = dataclasses.replace(settings, iterations=args.iterations, epochs=args.epochs, subset=args.subset,
                                   retrain_subset=args.retrain_subset)
    compartmental = dataclasses.replace(
        settings, max_phase=args.max_phase,
        fixed={"batch_size": args.compartmental_batch_size, "l_f_phase_test": args.test_phase},
        hold="structure" if args.compartmental_search == "numbers" else None)

    def compartmental_on(dataset):   # the per-dataset sizes, unless given on the command line
        default = COMPARTMENTAL_SIZES.get(dataset, COMPARTMENTAL_SIZES["mnist"])
        given = (args.compartmental_subset, args.compartmental_epochs, args.compartmental_retrain_subset,
                 args.compartmental_iterations)
        subset, epochs, retrain, iterations = (g if g is not None else d for g, d in zip(given, default))
        return dataclasses.replace(compartmental, subset=subset, epochs=epochs, retrain_subset=retrain,
                                   iterations=iterations, q=min(args.compartmental_q, iterations))
    studies = [(m, d, compartmental_on(d) if m == "compartmental" else backprop)
               for m in args.models for d in args.datasets]
    return compartmental_on, studies


def _run(args, studies, t0, times):
    """Run the studies (side by side on a local cluster with --parallel > 1), appending their wall times."""
    if args.parallel > 1 and len(studies) > 1:   # the compartmental ones (CIFAR-10 first) start first
        order = sorted(studies, key=lambda s_: (s_[0] != "compartmental", s_[1] != "cifar10"))
        pool, pool_cluster = start_client(workers=args.parallel, threads=args.threads)
        try:
            futures = {pool.submit(study_task, m, d, st, args.threads, pure=False): (m, d) for m, d, st in order}
            for fut in as_completed(futures):
                m, d = futures[fut]
                times.append(dict(model=m, dataset=d, wall_s=round(fut.result(), 1)))
                print(f"== {m} / {d}: {times[-1]['wall_s']:.1f} s (in a worker, since the start "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            pool.close()
            pool_cluster.close()
    else:
        for model, dataset, st in studies:
            t = time.perf_counter()
            run_study(model, dataset, st)
            times.append(dict(model=model, dataset=dataset, wall_s=round(time.perf_counter() - t, 1)))
            print(f"== {model} / {dataset}: {times[-1]['wall_s']:.1f} s", flush=True)


def _report(args, out, times, total, compartmental_on):
    """Print and return the table of the studies' results and times."""
    evals = load_results(out)
    evals = evals[evals.model.isin(args.models) & evals.dataset.isin(args.datasets)]
    table = summarize(evals)
    trained = evals[evals.status != "invalid"].groupby(["model", "dataset"], sort=False).time_s.sum()
    table = table.merge(pd.DataFrame(times), on=["model", "dataset"], how="left")
    table["train_s"] = [round(float(trained.get((m, d), 0.0)), 1) for m, d in zip(table.model, table.dataset)]
    sizes = {d: (c.subset, c.epochs, c.retrain_subset, c.iterations) for d in args.datasets
             for c in [compartmental_on(d)]}
    print(f"\nreduced study: {args.iterations} iterations, {args.folds} folds, {args.epochs} epochs, subset "
          f"{args.subset} (compartmental: (subset, epochs, retrain subset, iterations) {sizes}, batch "
          f"{args.compartmental_batch_size}, phases <= "
          f"{args.max_phase} steps, test phase {args.test_phase}, search {args.compartmental_search}, q "
          f"{args.compartmental_q}); studies side by side {args.parallel}, workers {args.workers}, q "
          f"{args.q or 'auto'}, torch threads {args.threads}; "
          f"wall time {total:.0f} s ({total / 60:.1f} min), load average at the end {os.getloadavg()[0]:.1f}")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 90,
                           "display.float_format", "{:.3f}".format):
        print(table.drop(columns="best_params").to_string(index=False))
        print("\nbest parameters:")
        for r in table.itertuples():
            print(f"  {r.model:>13} / {r.dataset:<8} {r.best_params}")
    return table


if __name__ == "__main__":
    main()
