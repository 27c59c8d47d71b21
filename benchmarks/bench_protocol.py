"""What a study protocol costs on this machine: per-evaluation time of each row, from small probes, extrapolated.

    BIODL_DATA=/path/to/datasets nice -n 10 python benchmarks/bench_protocol.py          # the 12 rows of issue 30
    BIODL_DATA=... python benchmarks/bench_protocol.py --models mlp cnn --datasets mnist  # some of them
    BIODL_DATA=... python benchmarks/bench_protocol.py --protocol seed --models mlp --datasets mnist --examples 40000

For each row (model, dataset) it trains the row's reference configuration (utils.spaces.reference, the study's
first evaluation) and `--draws` random valid configurations of its search space (the study's random draws), each
for one epoch on `--examples` stratified training examples, and scores each on `--test-examples` test examples.
From the seconds per example-epoch of training (r_train) and per scored example (r_test) it extrapolates one
evaluation of the protocol's row, whose F folds of S examples each train on (F - 1) / F of them for E epochs and
score the rest:

    seconds per evaluation = (F - 1) S E r_train + S r_test

once at the reference's rates and once at the mean rates over all probed configurations (the estimate of a
study's average evaluation, whose proposals spread over the space), then the row's total (x its evaluations) and
the sum of the rows in core-hours beside the 16 the cpu protocol is sized for. Estimates, not measurements of
whole evaluations: a probe's epoch includes fixed costs that a long one spreads out. The compartmental rows train
one batch size (the protocol's) and, under --protocol cpu, only the reference structure (the rows hold it).
torch runs one thread (`--threads`); times are the process's CPU time (core-seconds), so that the other jobs of a shared
machine change them little; the load average is printed at the start and the end.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.classifiers import make_classifier  # noqa: E402
from utils.compartmental_kind import STRUCTURE  # noqa: E402
from utils.data import load_dataset, stratified_subset  # noqa: E402
from utils.propose import make_optimizer, uniform_sampler  # noqa: E402
from utils.rules import split_model  # noqa: E402
from utils.spaces import check_hyperparameters, make_space, reference_params, to_hyperparameters  # noqa: E402
from utils.study import protocol_sizes  # noqa: E402

BUDGET_CORE_HOURS = 16.0   # what the cpu protocol must fit in (issue 30), the baseline of the printed ratio
ROWS = [(m, d) for m in ("mlp", "cnn", "compartmental") for d in ("mnist", "fashion", "cifar10")] + \
    [(m, "mnist") for m in ("mlp-fa", "mlp-dfa", "mlp-sign")]   # the nine seed rows and the rule rows (issue 30)


def probe_configs(model, draws, seed, hold, in_shape):
    """The reference point and `draws` random valid points of the model's space (the structure held at the
    reference for a compartmental row that holds it)."""
    space = make_space(model)
    ref = reference_params(model, space, 16 if model == "compartmental" else None)
    points, sample = [("reference", ref)], uniform_sampler(make_optimizer(space, np.random.RandomState(seed)))
    while len(points) < draws + 1:
        p = sample(1)[0]
        if hold:
            p = {**p, **{k: ref[k] for k in ref if k in hold}}
        if check_hyperparameters(model, to_hyperparameters(model, p), in_shape) is None:
            points.append((f"random {len(points)}", p))
    return points


def rates(model, point, fixed, train, test, seed):
    """(seconds per training example-epoch, seconds per scored example) of one configuration, in CPU time of this
    process (core-seconds: what the budget counts, and on a machine shared with other jobs what stays put while the
    wall time grows with the load)."""
    hp = {**to_hyperparameters(model, point), **fixed}
    kw = dict(max_epochs=1, seed=seed, device="cpu", verbose=0) if split_model(model)[0] != "compartmental" \
        else dict(max_epochs=1, seed=seed)
    clf = make_classifier(model, **kw, **hp)
    t = time.process_time()
    clf.fit(*train)
    t_train = time.process_time() - t
    t = time.process_time()
    clf.score(*test)
    return t_train / len(train[1]), (time.process_time() - t) / len(test[1])


def probe_row(model, dataset, ds, args):
    P = protocol_sizes(args.protocol, model, dataset)
    comp = split_model(model)[0] == "compartmental"
    fixed = {k: v for k, v in (("batch_size", P.batch_size), ("l_f_phase_test", P.test_phase)) if v and comp}
    hold = STRUCTURE if comp and P.hold == "structure" else ()
    train = stratified_subset(ds.X_train, ds.y_train, args.examples, seed=0)
    test = stratified_subset(ds.X_test, ds.y_test, args.test_examples, seed=0)
    S = min(P.subset or len(ds.y_train), len(ds.y_train))
    measured, configs = [], probe_configs(model, args.draws, args.seed, hold, tuple(ds.X_train.shape[1:]))
    few = stratified_subset(*train, 10 * len(ds.classes), seed=0)
    rates(model, configs[0][1], fixed, few, few, args.seed)   # warm-up, untimed: one-time costs of the first fit
    for name, point in configs:
        r_train, r_test = rates(model, point, fixed, train, test, args.seed)
        per_eval = (P.folds - 1) * S * P.epochs * r_train + S * r_test
        measured.append((r_train, r_test, per_eval))
        print(f"  {model:>13} / {dataset:<8} {name:<10} train {1e3 * r_train:7.3f} ms/example-epoch, score "
              f"{1e3 * r_test:7.3f} ms/example -> one evaluation {per_eval:8.1f} s", flush=True)
    ref, mean = measured[0][2], float(np.mean([m[2] for m in measured]))
    print(f"{model:>13} / {dataset:<8} {args.protocol}: {P.folds} folds of {S} examples, {P.epochs} epochs, "
          f"{P.iterations} evaluations: per evaluation {ref:.1f} s (reference), {mean:.1f} s (mean of "
          f"{len(measured)} configurations); the row {P.iterations * mean / 3600:.2f} core-hours (estimate)",
          flush=True)
    return P.iterations * mean


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default="cpu")
    p.add_argument("--models", nargs="+", default=None, help="only these models' rows (default: every row, ROWS)")
    p.add_argument("--datasets", nargs="+", default=None, help="only these datasets' rows")
    p.add_argument("--draws", type=int, default=3, help="random configurations per row besides the reference")
    p.add_argument("--examples", type=int, default=2000, help="training examples of each probe (one epoch)")
    p.add_argument("--test-examples", type=int, default=1000, help="scored examples of each probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, total = time.perf_counter(), 0.0
    print(f"load average at the start {os.getloadavg()[0]:.1f}", flush=True)
    rows = [(m, d) for m, d in ROWS if (args.models is None or m in args.models)
            and (args.datasets is None or d in args.datasets)]
    rows += [(m, d) for m in args.models or () for d in args.datasets or () if (m, d) not in rows]
    for dataset in dict.fromkeys(d for _, d in rows):
        ds = load_dataset(dataset, device="cpu")
        for model in [m for m, d in rows if d == dataset]:
            total += probe_row(model, dataset, ds, args)
    hours = total / 3600
    print(f"\n{args.protocol} protocol, rows probed: {hours:.2f} core-hours (estimate) against the budget of "
          f"{BUDGET_CORE_HOURS:g}: ratio {hours / BUDGET_CORE_HOURS:.2f}; probes took {time.perf_counter() - t0:.0f} s "
          f"on {args.threads} thread(s); load average at the end {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
