"""Speed and accuracy of the segregated-dendrite network (utils/compartmental.py).

    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py                  # speed table
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --batch-sizes 128 --threads 1
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --accuracy --epochs 12 --batch-size 16 \\
        --f-etas 6.72 0.42 --threads 1                                                     # MNIST test error
    ... --n-hidden 500 100 --f-etas 7.36 7.36 0.48; --dataset fashion / cifar10 (--subset, --test-subset)
    ... --max-minutes 30                        # stop at the first test after 30 minutes (--resume goes on)
    ... --epochs 30 --lr-decay-epochs 30        # cosine decay of the rates to 0 over 30 epochs (not in the paper)
    ... --epochs 60 --test-every-epochs 10      # test every 10th epoch only (a full test's cost: docs/results.md)
    ... --resume                                # after an interruption: same arguments, continues from the checkpoint
    python benchmarks/bench_compartmental.py --plot runs/a.json runs/b.json   # figures/compartmental_test_error.png
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --compare de26ccd~2   # engines side by side
    ... --compare COMMIT --accuracy-train 60000 --accuracy-test 10000   # + the accuracy check (3 seeds per engine)
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --population 8 --threads 2  # side by side
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --cv --epochs 1   # 3-fold CV as a population

Speed: the paper's defaults (spiking feedforward and feedback, 784-500-10, 50 + 50 training steps plus the Wald
extra steps, 250 test steps) on MNIST images (random images of MNIST's sparsity without BIODL_DATA); training and
test examples/s and peak memory per batch size, each batch size in a fresh process (peak RSS is per process), and
the ratio to the authors' per-example NumPy code. The reference figures (38 training and 17 test examples/s on the
project's 2-core CPU, 875 MiB) were measured by the project's lead (shared PERFORMANCE notes); they are printed,
not re-measured here. Target: >= 950 training examples/s (25x) at a batch size >= 128 on that CPU.
Accuracy: the same run as `python -m utils.train --model compartmental ...` (this command forwards its options there):
trains on the official training split (or a stratified subset) with the paper's spiking defaults, tests on the
official test split, and writes the run's JSON record (configuration, versions, per-epoch times, test errors, wall
time) under runs/ and a checkpoint beside it (.ckpt.pt) after every epoch, so --resume loses at most one epoch.
The rates default to the paper's scaled for the batch (utils.compartmental.batch_f_etas: hidden x 2 B, output x 2;
batch 16: (6.72, 0.42)); see the module docstring for the sweep.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("BIODL_ENGINE_ROOT") or str(ROOT))   # --compare: the engine measured
from utils.compartmental import PAPER_TEST_ERROR, CompartmentalClassifier  # noqa: E402

REFERENCE = dict(train_ex_s=38.0, test_ex_s=17.0, peak_mib=875.0)   # authors' NumPy code, measured by the lead


def mnist_like(n, seed=0):
    """MNIST images when BIODL_DATA is set, else random images of MNIST's sparsity (about 19 % non-zero pixels)."""
    if os.environ.get("BIODL_DATA"):
        from utils.data import load_dataset
        ds = load_dataset("mnist")
        return ds.X_train[:n], ds.y_train[:n], "MNIST"
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(n, 1, 28, 28, generator=g) < 0.19) * torch.rand(n, 1, 28, 28, generator=g)
    return X.float(), torch.arange(n) % 10, "random MNIST-like images"


def compare(args):
    """Today's engine against the one at commit args.compare (a git worktree of it, each measured in its own
    process with the same examples, seeds and threads): training and test ex/s (wall and per CPU s), peak memory,
    the cost per neuron-step and the ratios; then the accuracy check (one epoch at batch 16, 3 seeds each)."""
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"biodl-engine-{args.compare.replace('~', '-')}"
    if not base.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.compare], check=True,
                       capture_output=True)
    engines = (("base", base), ("new", ROOT))
    print(f"engines: base = {args.compare} ({base}), new = this tree; load average {os.getloadavg()[0]:.1f}")
    print(f"{'data':>8} {'batch':>5} {'thr':>3} {'engine':>6} {'train ex/s':>10} {'per CPU s':>9} {'ns/n-step':>9} "
          f"{'test ex/s':>9} {'per CPU s':>9} {'ns/n-step':>9} {'warm-up s':>9} {'peak MiB':>8}")
    for data, B, threads in ((d, int(b), int(t)) for d, b, t in (c.split(":") for c in args.cases)):
        rows = {}
        for name, root in engines:
            cmd = [sys.executable, __file__, "--measure", data, str(B), str(threads), str(args.batches),
                   str(args.test_examples)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BIODL_ENGINE_ROOT": str(root)})
            if out.returncode:
                raise SystemExit(f"{name} engine failed on {data} batch {B}:\n{out.stderr[-3000:]}")
            r = rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{data:>8} {B:>5} {threads:>3} {name:>6} {r['train_ex_s']:>10.1f} {r['train_cpu']:>9.1f} "
                  f"{r['train_ns']:>9.1f} {r['test_ex_s']:>9.1f} {r['test_cpu']:>9.1f} {r['test_ns']:>9.1f} "
                  f"{r['warmup_s']:>9.1f} {r['peak_mib']:>8.0f}", flush=True)
        n, b = rows["new"], rows["base"]
        print(f"{'':>8} {'':>5} {'':>3} {'ratio':>6} {n['train_ex_s'] / b['train_ex_s']:>10.2f} "
              f"{n['train_cpu'] / b['train_cpu']:>9.2f} {'':>9} {n['test_ex_s'] / b['test_ex_s']:>9.2f} "
              f"{n['test_cpu'] / b['test_cpu']:>9.2f}   (target 3.0x)", flush=True)
    if args.accuracy_train:
        accuracy_check(args, engines)


def measure(data, B, threads, n_batches, n_test):
    """One engine (the one on sys.path) on the first examples of `data`: training ex/s over n_batches batches after
    a warm-up batch (timed apart: it holds any compilation), test ex/s, peak RSS, ns per neuron-step of CPU time."""
    from utils.compartmental import batch_f_etas
    from utils.data import load_dataset
    torch.set_num_threads(threads)
    ds = load_dataset(data)
    n_train = B * (n_batches + 1)
    X, y, Xt = ds.X_train[:n_train], ds.y_train[:n_train], ds.X_test[:n_test]
    clf = CompartmentalClassifier(batch_size=B, f_etas=batch_f_etas(B), seed=0)
    clf.initialize(X[0].numel(), np.arange(10))
    t = time.perf_counter()
    clf.partial_fit(X[:B], y[:B])
    clf.decision_function(Xt[:8])
    warm = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    clf.partial_fit(X[B:], y[B:])
    train, train_cpu = (n_train - B) / (time.perf_counter() - t), (n_train - B) / (time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
    clf.decision_function(Xt)
    test, test_cpu = n_test / (time.perf_counter() - t), n_test / (time.process_time() - c)
    neurons = sum(clf.n_[1:])
    steps_train, steps_test = clf.l_f_phase + clf.l_t_phase, clf.l_f_phase_test
    return dict(train_ex_s=train, train_cpu=train_cpu, test_ex_s=test, test_cpu=test_cpu, warmup_s=warm,
                train_ns=1e9 / train_cpu / (steps_train * neurons), test_ns=1e9 / test_cpu / (steps_test * neurons),
                peak_mib=peak_mib(torch.device("cpu")))


def accuracy_check(args, engines):
    """One MNIST epoch at batch 16 (the paper's rates scaled for it) on the first accuracy_train examples, tested on
    the first accuracy_test of the test split, seeds 0, 1, 2 per engine; every run and the means printed."""
    print(f"accuracy: MNIST, {args.accuracy_train} training examples (one epoch, batch 16, batch_f_etas(16)), "
          f"{args.accuracy_test} test examples, {args.threads} threads")
    means = {}
    for name, root in engines:
        accs = []
        for seed in (0, 1, 2):
            cmd = [sys.executable, __file__, "--measure-accuracy", str(seed), str(args.accuracy_train),
                   str(args.accuracy_test), str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BIODL_ENGINE_ROOT": str(root)})
            if out.returncode:
                raise SystemExit(f"{name} engine failed the accuracy run:\n{out.stderr[-3000:]}")
            accs.append(json.loads(out.stdout.strip().splitlines()[-1])["test_acc"])
            print(f"  {name:>4} seed {seed}: test accuracy {100 * accs[-1]:.2f} %", flush=True)
        means[name] = 100 * statistics.mean(accs)
        print(f"  {name:>4} mean {means[name]:.2f} %")
    d = means["new"] - means["base"]
    print(f"  difference new - base: {d:+.2f} points ({'within' if abs(d) <= 0.5 else 'outside'} 0.5)")


def measure_accuracy(seed, n_train, n_test, threads):
    from utils.compartmental import batch_f_etas
    from utils.data import load_dataset
    torch.set_num_threads(threads)
    ds = load_dataset("mnist")
    clf = CompartmentalClassifier(batch_size=16, f_etas=batch_f_etas(16), seed=seed)
    clf.fit(ds.X_train[:n_train], ds.y_train[:n_train])
    return dict(test_acc=clf.score(ds.X_test[:n_test], ds.y_test[:n_test]))


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed_one(batch_size, device, threads, n_batches, n_test):
    """Train examples/s (after one warm-up batch) and test examples/s at one batch size, in this process."""
    torch.set_num_threads(threads)
    n_train = batch_size * (n_batches + 1)
    X, y, source = mnist_like(max(n_train, n_test))
    dev = torch.device(device)
    X, y = X.to(dev), y.to(dev)
    clf = CompartmentalClassifier(batch_size=batch_size, max_epochs=1, seed=0, device=dev)
    clf.initialize(X[0].numel(), np.arange(10))
    clf.partial_fit(X[:batch_size], y[:batch_size])               # warm-up: allocations, caches
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    clf.decision_function(X[:min(n_test, 8)])
    sync()
    t, c = time.perf_counter(), time.process_time()
    clf.partial_fit(X[batch_size:n_train], y[batch_size:n_train])
    sync()
    train = (n_train - batch_size) / (time.perf_counter() - t)
    train_cpu = (n_train - batch_size) / (time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
    clf.decision_function(X[:n_test])
    sync()
    test, test_cpu = n_test / (time.perf_counter() - t), n_test / (time.process_time() - c)
    return dict(batch_size=batch_size, train_ex_s=train, test_ex_s=test, train_ex_cpu_s=train_cpu,
                test_ex_cpu_s=test_cpu, peak_mib=peak_mib(dev), data=source, device=str(dev), threads=threads,
                n_train=n_train - batch_size, n_test=n_test, load_avg=os.getloadavg()[0])


def speed(args):
    print("Segregated-dendrite network, paper defaults (spiking both paths, 784-500-10, 50+50 steps + Wald, "
          "250 test steps)")
    print(f"reference (authors' per-example NumPy code, measured by the project's lead on this 2-core CPU, not "
          f"re-measured): {REFERENCE['train_ex_s']:.0f} train ex/s, {REFERENCE['test_ex_s']:.0f} test ex/s, "
          f"{REFERENCE['peak_mib']:.0f} MiB peak")
    print(f"device {args.device}, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f} "
          f"(other processes share the CPU)")
    print("ex/s: examples per second of wall-clock time; per CPU s: per second of this process's CPU time (what the "
          "rate would be without other processes on the cores)")
    print(f"{'batch':>6} {'train ex/s':>11} {'x ref':>7} {'per CPU s':>10} {'test ex/s':>10} {'x ref':>7} "
          f"{'per CPU s':>10} {'peak MiB':>9}")
    rows = []
    for bs in args.batch_sizes:
        n_batches = max(args.batches, 16 // bs)
        cmd = [sys.executable, __file__, "--one", str(bs), "--device", args.device, "--threads", str(args.threads),
               "--batches", str(n_batches), "--test-examples", str(min(args.test_examples, max(bs, 64)))]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(out.stderr)
            raise SystemExit(f"batch size {bs} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{bs:>6} {r['train_ex_s']:>11.1f} {r['train_ex_s'] / REFERENCE['train_ex_s']:>7.1f} "
              f"{r['train_ex_cpu_s']:>10.1f} {r['test_ex_s']:>10.1f} {r['test_ex_s'] / REFERENCE['test_ex_s']:>7.1f} "
              f"{r['test_ex_cpu_s']:>10.1f} {r['peak_mib']:>9.0f}", flush=True)
    print(f"data: {rows[0]['data']}; train ex/s over {[r['n_train'] for r in rows]} examples after a warm-up "
          f"batch, test ex/s over {[r['n_test'] for r in rows]} examples")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(kind="speed", reference=REFERENCE, rows=rows), indent=1))


def population_one(P, B, device, threads, n_batches):
    """Aggregate training examples/s of P networks at batch B trained as one population (after a warm-up batch),
    in this process; JSON-ready."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    X, y, source = mnist_like(P * B * (n_batches + 1))
    X, y = X.to(dev), y.to(dev)
    members = [CompartmentalClassifier(batch_size=B, seed=s, device=dev) for s in range(P)]
    for m in members:
        m.initialize(X[0].numel(), np.arange(10))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    from utils.compartmental_population import _train
    _train(members, [(X[p * B:(p + 1) * B], y[p * B:(p + 1) * B]) for p in range(P)], [1] * P)   # warm-up
    sync()
    n = B * n_batches
    data = [(X[P * B + p * n:P * B + (p + 1) * n], y[P * B + p * n:P * B + (p + 1) * n]) for p in range(P)]
    t = time.perf_counter()
    _train(members, data, [1] * P)
    sync()
    wall = time.perf_counter() - t
    return dict(P=P, batch_size=B, train_ex_s=P * n / wall, peak_mib=peak_mib(dev), data=source, device=str(dev),
                threads=threads, n_train=P * n, load_avg=os.getloadavg()[0])


def population(args):
    """A population of P networks at batch B beside one network at batch B and one at batch P B, each in a fresh
    process (peak memory is per process), the three interleaved for --repeats rounds so that a change of load hits
    them alike: the median aggregate training examples/s, the largest peak memory, and the ratio judged."""
    P, B = args.population, args.member_batch
    print(f"Population training: paper defaults (spiking both paths, 784-500-10, 50+50 steps + Wald), batch {B} per "
          f"network; device {args.device}, torch threads {args.threads}, {args.batches} timed batches, "
          f"{args.repeats} interleaved rounds, load average {os.getloadavg()[0]:.1f}")
    configs = {"one network, batch %d" % B: (1, B), "one network, batch %d" % (P * B): (1, P * B),
               "population of %d, batch %d each" % (P, B): (P, B)}
    runs = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, (p, b) in configs.items():
            cmd = [sys.executable, __file__, "--one-population", str(p), str(b), "--device", args.device,
                   "--threads", str(args.threads), "--batches", str(args.batches)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode:
                print(out.stderr)
                raise SystemExit(f"{name} failed")
            runs[name].append(row := json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {r + 1}: {name:>32}: {row['train_ex_s']:>8.1f} ex/s, load average {row['load_avg']:.1f}",
                  flush=True)
    rows = {}
    for name, rs in runs.items():
        rows[name] = r = dict(rs[0], train_ex_s=statistics.median(x["train_ex_s"] for x in rs),
                              peak_mib=max(x["peak_mib"] for x in rs), rounds=[x["train_ex_s"] for x in rs])
        print(f"{name:>32}: {r['train_ex_s']:>10.1f} training ex/s (aggregate, median of {len(rs)}), peak "
              f"{r['peak_mib']:.0f} MiB, {r['n_train']} examples per round", flush=True)
    one, pop = rows["one network, batch %d" % B], rows["population of %d, batch %d each" % (P, B)]
    ratio = pop["train_ex_s"] / one["train_ex_s"]
    per_round = [p_ / o_ for p_, o_ in zip(pop["rounds"], one["rounds"])]
    target = "CPU target: population of 8 at least 2.0x one network" if args.device == "cpu" else \
        "GPU target: a population of >= 64 at >= 200,000 ex/s; one network at batch 16 >= 5,000 ex/s"
    print(f"ratio population / one network at batch {B}: {ratio:.2f}x of the medians (rounds: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}) ({target}); data: {one['data']}")
    # what bounds the ratio: a population does the work of one network at batch B P (the members' own weights aside),
    # so it can approach that network's throughput, not exceed it; per-batch time t(b) = a + c b from the two lone
    # runs, and P t(B) / t(B P) >= 2 needs c <= (P - 2) a / (B P)
    big = rows["one network, batch %d" % (B * P)]["train_ex_s"]
    t_one, t_big = B / one["train_ex_s"], B * P / big
    c = (t_big - t_one) / (B * P - B)
    a = t_one - c * B
    print(f"bound: one network at batch {B * P} / at batch {B} = {big / one['train_ex_s']:.2f}x (population / batch "
          f"{B * P}: {pop['train_ex_s'] / big:.2f}); per batch of b examples t = {1e3 * a:.1f} ms fixed + "
          f"{1e3 * c:.3f} ms x b, so a population of {P} reaches 2.0x only if the per-example "
          f"{1e3 * c:.3f} ms falls below {1e3 * (P - 2) * a / (B * P):.3f} ms")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(kind="population", rows=rows, ratio=ratio, config=vars(args)),
                                             indent=1))


def cross_validation(args):
    """The paper's network (batch 16, its batch-scaled rates) cross-validated on MNIST's training split with its
    folds trained as one population: wall time and fold accuracies."""
    from utils.compartmental import batch_f_etas
    from utils.data import load_dataset, stratified_subset
    from utils.evaluation import cross_validate
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, device=args.device)
    X, y = ds.X_train, ds.y_train
    if args.subset:
        X, y = stratified_subset(X, y, args.subset, seed=args.seed)
    clf = CompartmentalClassifier(batch_size=16, f_etas=batch_f_etas(16), max_epochs=args.epochs, seed=args.seed,
                                  device=args.device, verbose=1)
    per_fold = len(y) * (args.folds - 1) // args.folds
    print(f"{args.folds}-fold cross-validation, {args.dataset}, {len(y)} examples ({per_fold} training examples per "
          f"fold), {args.epochs} epoch(s), batch 16, f_etas {clf.f_etas}, "
          f"device {args.device}, threads {args.threads}, load average {os.getloadavg()[0]:.1f}", flush=True)
    t = time.perf_counter()
    scores = cross_validate(clf, X, y, folds=args.folds, seed=args.seed)
    wall = time.perf_counter() - t
    print(f"fold accuracies {', '.join(f'{100 * s:.2f} %' for s in scores)}; mean {100 * scores.mean():.2f} %; "
          f"wall {wall:.0f} s (training and testing), load average {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(kind="cross_validation", scores=scores.tolist(), wall_s=wall,
                                                  n=len(y), epochs=args.epochs, folds=args.folds), indent=1))


def accuracy(args):
    """The paper's replication through the one training entry point (utils.train: the same loop, record,
    checkpoint and --resume); prints the paper's MNIST error beside the final one."""
    from utils import train
    from utils.compartmental_kind import default_f_etas
    f_etas = args.f_etas or default_f_etas(args.n_hidden, args.batch_size)
    out = args.out or f"runs/compartmental_acc_{args.dataset}_{len(args.n_hidden)}h_b{args.batch_size}.json"
    argv = ["--model", "compartmental", "--dataset", args.dataset, "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--n-hidden", *map(str, args.n_hidden),
            "--f-etas", *(repr(e * args.lr_scale) for e in f_etas), "--seed", str(args.seed), "--device", args.device,
            "--threads", str(args.threads), "--test-every-epochs", str(args.test_every_epochs), "--out", out]
    for option, value in (("--subset", args.subset), ("--test-subset", args.test_subset),
                          ("--lr-decay-epochs", args.lr_decay_epochs), ("--max-minutes", args.max_minutes)):
        if value is not None:
            argv += [option, str(value)]
    print("python -m utils.train " + " ".join(argv + ["--resume"] * args.resume), flush=True)
    train.main(argv + ["--resume"] * args.resume)
    record = json.loads(Path(out).read_text())
    target = PAPER_TEST_ERROR.get(len(args.n_hidden)) if args.dataset == "mnist" else None
    if target is not None:
        print(f"paper, {len(args.n_hidden)} hidden layer(s), 60 epochs: {target} % test error; this run: "
              f"{record['curve'][-1]['test_error']:.2f} % after {record['curve'][-1]['epoch']} epochs")


def plot(files, path):
    """Test error against epochs for saved --accuracy runs, with the paper's 60-epoch MNIST errors."""
    import matplotlib.pyplot as plt
    from utils.plotting import save_figure, style
    runs = []
    for f in files:
        try:
            runs.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--plot: cannot read {f} ({e}); give JSON files written by --accuracy")
    with style():
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in runs:
            c = r["config"]
            label = (f"{c['dataset']}, {'-'.join(map(str, c['n_hidden']))}, batch {c['batch_size']}, "
                     f"rates ({', '.join(f'{eta:g}' for eta in c['f_etas'])})" + (f", cosine {c['lr_decay_epochs']:g} ep"
                                                       if c.get("lr_decay_epochs") else ", constant"))
            label += f", seed {c['seed']}" if c.get("seed") else ""
            ax.plot([p["epoch"] for p in r["curve"]], [p["test_error"] for p in r["curve"]], marker=".", label=label)
        for n_layers, err in PAPER_TEST_ERROR.items():
            ax.axhline(err, ls="--", lw=1, color="grey")
            ax.annotate(f"MNIST, paper: {n_layers} hidden, 60 epochs", (ax.get_xlim()[0], err), xytext=(4, -2),
                        textcoords="offset points", ha="left", va="top", fontsize=8, color="grey")
        ax.set(xlabel="epoch", ylabel="test error (%)", ylim=(0, None), title="Compartmental network, spiking")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))   # below the axes: no curve hidden
    print("saved", save_figure(fig, path))


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", action="store_true", help="train and test instead of the speed table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128, 512])
    p.add_argument("--batches", type=int, default=4, help="timed training batches per batch size")
    p.add_argument("--test-examples", type=int, default=512)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # one batch size, JSON to stdout
    p.add_argument("--one-population", type=int, nargs=2, default=None, help=argparse.SUPPRESS)   # P, B
    p.add_argument("--population", type=int, default=None, metavar="P",
                   help="aggregate speed of P networks trained side by side, beside one network at --member-batch "
                        "and one at P times it")
    p.add_argument("--member-batch", type=int, default=16, help="--population: batch size of each network")
    p.add_argument("--repeats", type=int, default=3, help="--population: interleaved rounds (medians judged)")
    p.add_argument("--cv", action="store_true", help="cross-validate the paper's network (batch 16) with its folds "
                   "as one population: wall time and fold accuracies (--epochs, --subset, --folds)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion", "cifar10"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-hidden", type=int, nargs="+", default=[500])
    p.add_argument("--f-etas", type=float, nargs="+", default=None, help="default: the paper's")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every f_eta (batched updates are means)")
    p.add_argument("--lr-decay-epochs", type=float, default=None,
                   help="cosine decay of every rate to 0 over this many epochs (default: constant, the paper)")
    p.add_argument("--subset", type=int, default=None, help="stratified training subset")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None, help="--accuracy: stop at the first test after this")
    p.add_argument("--eval-every", type=int, default=None, help=argparse.SUPPRESS)   # gone: refused below
    p.add_argument("--resume", action="store_true", help="--accuracy: continue from the checkpoint saved next to "
                   "--out after every epoch (same arguments); without it a run starts afresh")
    p.add_argument("--test-every-epochs", type=int, default=1, help="--accuracy: test only after every Kth epoch "
                   "and the last (a full test's cost: docs/results.md)")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                   help="draw the test error curves of saved --accuracy runs into --figure")
    p.add_argument("--figure", default="compartmental_test_error.png", help="--plot: file under figures/")
    p.add_argument("--out", default=None, help="JSON file (default: runs/... for --accuracy, none for speed)")
    p.add_argument("--compare", default=None, metavar="COMMIT",
                   help="this engine against the one at COMMIT (a git worktree), side by side")
    p.add_argument("--cases", nargs="+", default=["mnist:16:2", "mnist:128:2", "mnist:16:1", "cifar10:16:1"],
                   help="--compare: dataset:batch:threads rows")
    p.add_argument("--accuracy-train", type=int, default=0, help="--compare: training examples of the accuracy "
                   "check (60000: the whole split; 0: no check)")
    p.add_argument("--accuracy-test", type=int, default=10000, help="--compare: test examples of the check")
    p.add_argument("--measure", nargs=5, default=None, help=argparse.SUPPRESS)   # data B threads batches n_test
    p.add_argument("--measure-accuracy", type=int, nargs=4, default=None, help=argparse.SUPPRESS)
    return p


def main():
    p = _parser()
    args = p.parse_args()
    if args.test_every_epochs < 1:
        p.error(f"--test-every-epochs must be at least 1, got {args.test_every_epochs}")
    if args.eval_every is not None:
        p.error("--eval-every (tests within an epoch) is gone: runs test after whole epochs "
                "(--test-every-epochs N; --subset for shorter epochs)")
    if args.measure:
        d, *rest = args.measure
        print(json.dumps(measure(d, *map(int, rest))))
    elif args.measure_accuracy:
        print(json.dumps(measure_accuracy(*args.measure_accuracy)))
    elif args.compare:
        compare(args)
    elif args.plot:
        plot(args.plot, args.figure)
    elif args.one is not None:
        print(json.dumps(speed_one(args.one, args.device, args.threads, args.batches, args.test_examples)))
    elif args.one_population is not None:
        print(json.dumps(population_one(*args.one_population, args.device, args.threads, args.batches)))
    elif args.population:
        population(args)
    elif args.cv:
        cross_validation(args)
    elif args.accuracy:
        accuracy(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
