"""Overhead of the TrainingLogger: the same skorch MLP trained with and without it.

    BIODL_DATA=/path/to/datasets python benchmarks/bench_logger.py              # 784-500-10 MLP, 20,000 MNIST
    python benchmarks/bench_logger.py --synthetic                              # no dataset needed
    python benchmarks/bench_logger.py --n 10000 --epochs 3 --repeats 5 --records 10 --max-valid 1000

Both runs use `make_classifier("mlp", hidden_sizes=(500,), batch_size=100, lr=1e-3, seed=0)` on the same data
(a stratified subset of MNIST's training set from BIODL_DATA, or random images when it is absent or --synthetic);
the logged run validates on `--max-valid` test images (default: the logger's default, 300) at `--records` records
per epoch (default 10, the logger's default). After one warm-up fit, plain and logged fits alternate in ABBA order
(plain, logged, logged, plain, ...) so that a drift of the machine's load favours neither, and the medians of the
fit times are compared (the fastest of each kind too: noise from other jobs only ever adds time). On the CPU the
comparison uses the process's CPU time (time.process_time) with one torch thread by default: on a machine shared
with other jobs, wall times of identical fits vary several-fold while CPU time varies by ~10 %. On a GPU it uses
wall time. Prints both, the ratio logged / plain (target < 1.10 at the default frequency) and the logger's own
measure of its time (logger_time: the wall seconds spent inside its hooks, within the same fit, hence free of the
run-to-run noise), which is the steadiest figure. Exit status 1 when the median ratio misses the target.
"""
import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.logger import LoggerOverheadWarning, TrainingLogger  # noqa: E402
from utils.runs import curves  # noqa: E402
from utils.classifiers import make_classifier  # noqa: E402

TARGET = 1.10


def data(n, synthetic, device):
    if not synthetic and os.environ.get("BIODL_DATA"):
        from utils.data import load_dataset, stratified_subset
        ds = load_dataset("mnist", device=device)
        X, y = stratified_subset(ds.X_train, ds.y_train, n, seed=0)
        return X, y, ds.X_test, ds.y_test, "MNIST"
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n + 2000,), generator=g)
    X = (centers[y] + 0.3 * torch.randn(n + 2000, 1, 28, 28, generator=g)).clamp(0, 1)
    X, y = X.to(device), y.to(device)
    return X[:n], y[:n], X[n:], y[n:], "synthetic"


def fit_time(X, y, epochs, logger=None, device=None):
    """(wall seconds, CPU seconds) of one fit."""
    clf = make_classifier("mlp", logger=logger, hidden_sizes=(500,), batch_size=100, lr=1e-3, max_epochs=epochs,
                          seed=0, device=device)
    if X.device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    clf.fit(X, y)
    if X.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000, help="training examples (default 20,000)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed fits of each kind (interleaved)")
    p.add_argument("--records", type=int, default=10, help="records per epoch (the logger's default: 10)")
    p.add_argument("--max-valid", type=int, default=TrainingLogger().max_valid,
                   help="validation examples per record (default: the logger's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier CPU timing)")
    p.add_argument("--device", default=None)
    p.add_argument("--synthetic", action="store_true", help="random images instead of MNIST")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from utils.data import get_device
    device = get_device(args.device)
    X, y, Xv, yv, name = data(args.n, args.synthetic, device)
    print(f"MLP 784-500-10 on {len(X)} {name} examples, {args.epochs} epochs, batch 100, device {device}, "
          f"{torch.get_num_threads()} threads; logger: {args.records} records/epoch, {args.max_valid} validation "
          f"examples")
    with warnings.catch_warnings():  # warm-up (allocator, kernels) for both paths; on 2,000 examples the logger's
        warnings.simplefilter("ignore", LoggerOverheadWarning)  # share is large, and it says so
        fit_time(X[:2000], y[:2000], 1, TrainingLogger(Xv, yv, records_per_epoch=args.records,
                                                       max_valid=args.max_valid), device)
    cpu = device.type == "cpu"
    clock = "CPU" if cpu else "wall"
    plain, logged, inside, records = [], [], [], None
    for r in range(args.repeats):
        log = TrainingLogger(Xv, yv, records_per_epoch=args.records, max_valid=args.max_valid)
        if r % 2 == 0:  # ABBA order: a drift of the machine's load does not favour either kind
            plain.append(fit_time(X, y, args.epochs, None, device))
            logged.append(fit_time(X, y, args.epochs, log, device))
        else:
            logged.append(fit_time(X, y, args.epochs, log, device))
            plain.append(fit_time(X, y, args.epochs, None, device))
        inside.append(log.logger_time_)
        records = len(curves(log))
        print(f"  repeat {r + 1}: plain {plain[-1][0]:.2f} s wall / {plain[-1][1]:.2f} s CPU, logged "
              f"{logged[-1][0]:.2f} s wall / {logged[-1][1]:.2f} s CPU ({inside[-1]:.3f} s wall inside the "
              f"logger, {records} records)")
    k = 1 if cpu else 0
    tp, tl = statistics.median(t[k] for t in plain), statistics.median(t[k] for t in logged)
    wp, wl = statistics.median(t[0] for t in plain), statistics.median(t[0] for t in logged)
    ti = statistics.median(inside)
    ratio = tl / tp
    print(f"median wall time: without logger {wp:.2f} s, with logger {wl:.2f} s (ratio {wl / wp:.3f})")
    mp, ml = min(t[k] for t in plain), min(t[k] for t in logged)
    print(f"fastest {clock} time: without logger {mp:.2f} s, with logger {ml:.2f} s (ratio {ml / mp:.3f})")
    print(f"median {clock} time: without logger {tp:.2f} s, with logger {tl:.2f} s -> ratio {ratio:.3f} "
          f"(target < {TARGET:.2f})")
    print(f"logger's own time: {ti:.3f} s wall = {100 * ti / (wl - ti):.1f} % of the logged run's training time")
    return 0 if ratio < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
