"""Speed and accuracy of the segregated-dendrite network (utils/compartmental.py).

    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py                  # speed table
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --batch-sizes 128 --threads 1
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --accuracy --epochs 12 --batch-size 16 \\
        --f-etas 6.72 0.42 --threads 1                                                     # MNIST test error
    ... --n-hidden 500 100 --f-etas 7.36 7.36 0.48; --dataset fashion / cifar10 (--subset, --test-subset)
    ... --eval-every 20000 --max-minutes 30     # test every 20,000 examples, stop at the first test after 30 min
    ... --epochs 30 --lr-decay-epochs 30        # cosine decay of the rates to 0 over 30 epochs (not in the paper)
    ... --epochs 60 --test-every-epochs 10      # a full MNIST test costs a third of an epoch: test every 10th only
    ... --resume                                # after an interruption: same arguments, continues from the checkpoint
    python benchmarks/bench_compartmental.py --plot runs/a.json runs/b.json   # figures/compartmental_test_error.png
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --population 8 --threads 2  # side by side
    BIODL_DATA=/path/to/datasets python benchmarks/bench_compartmental.py --cv --epochs 1   # 3-fold CV as a population

Speed: the paper's defaults (spiking feedforward and feedback, 784-500-10, 50 + 50 training steps plus the Wald
extra steps, 250 test steps) on MNIST images (random images of MNIST's sparsity without BIODL_DATA); training and
test examples/s and peak memory per batch size, each batch size in a fresh process (peak RSS is per process), and
the ratio to the authors' per-example NumPy code. The reference figures (38 training and 17 test examples/s on the
project's 2-core CPU, 875 MiB) were measured by the project's lead (shared PERFORMANCE notes); they are printed,
not re-measured here. Target: >= 950 training examples/s (25x) at a batch size >= 128 on that CPU.
Accuracy: trains on the official training split (or a stratified subset) with the paper's spiking defaults,
reports the official test error, the configuration and the wall time, and saves a JSON under runs/ after every test
and a checkpoint (network, data order, curve) next to it after every epoch, so --resume loses at most one epoch.
Batches average their updates: scale the hidden rates by B to 2 B and the output rate by about 2 (batch 16: hidden
0.21 x 32, output 0.21 x 2; see the module docstring for the sweep).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.compartmental import PAPER_F_ETAS, CompartmentalClassifier  # noqa: E402

REFERENCE = dict(train_ex_s=38.0, test_ex_s=17.0, peak_mib=875.0)   # authors' NumPy code, measured by the lead
PAPER_ERROR = {1: 4.1, 2: 3.2}                                      # % test error after 60 epochs (paper)


def mnist_like(n, seed=0):
    """MNIST images when BIODL_DATA is set, else random images of MNIST's sparsity (about 19 % non-zero pixels)."""
    if os.environ.get("BIODL_DATA"):
        from utils.data import load_dataset
        ds = load_dataset("mnist")
        return ds.X_train[:n], ds.y_train[:n], "MNIST"
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(n, 1, 28, 28, generator=g) < 0.19) * torch.rand(n, 1, 28, 28, generator=g)
    return X.float(), torch.arange(n) % 10, "random MNIST-like images"


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
    from utils.compartmental import fit_population
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
    from utils.compartmental import _train
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
    process (peak memory is per process): aggregate training examples/s, peak memory, and the ratio judged."""
    P, B = args.population, args.member_batch
    print(f"Population training: paper defaults (spiking both paths, 784-500-10, 50+50 steps + Wald), batch {B} per "
          f"network; device {args.device}, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    rows = {}
    for name, (p, b) in (("one network, batch %d" % B, (1, B)), ("one network, batch %d" % (P * B), (1, P * B)),
                         ("population of %d, batch %d each" % (P, B), (P, B))):
        cmd = [sys.executable, __file__, "--one-population", str(p), str(b), "--device", args.device,
               "--threads", str(args.threads), "--batches", str(args.batches)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(out.stderr)
            raise SystemExit(f"{name} failed")
        rows[name] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:>32}: {r['train_ex_s']:>10.1f} training ex/s (aggregate), peak {r['peak_mib']:.0f} MiB, "
              f"{r['n_train']} examples, load average {r['load_avg']:.1f}", flush=True)
    one, pop = rows["one network, batch %d" % B], rows["population of %d, batch %d each" % (P, B)]
    ratio = pop["train_ex_s"] / one["train_ex_s"]
    target = "CPU target: population of 8 at least 2.0x one network" if args.device == "cpu" else \
        "GPU target: a population of >= 64 at >= 200,000 ex/s; one network at batch 16 >= 5,000 ex/s"
    print(f"ratio population / one network at batch {B}: {ratio:.2f}x ({target}); data: {one['data']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(kind="population", rows=rows, ratio=ratio), indent=1))


def cross_validation(args):
    """The paper's network (batch 16, its batch-scaled rates) cross-validated on MNIST's training split with its
    folds trained as one population: wall time and fold accuracies."""
    from utils.compartmental import batch_f_etas
    from utils.data import load_dataset, stratified_subset
    from utils.train import cross_validate
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
    from utils.data import load_dataset, stratified_subset
    from utils.train import atomic_save
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, device=args.device)
    X, y = ds.X_train, ds.y_train
    if args.subset:
        X, y = stratified_subset(X, y, args.subset, seed=args.seed)
    Xt, yt = ds.X_test, ds.y_test
    if args.test_subset:
        Xt, yt = stratified_subset(Xt, yt, args.test_subset, seed=args.seed)
    n_hidden = tuple(args.n_hidden)
    f_etas = tuple(args.f_etas) if args.f_etas else PAPER_F_ETAS.get(len(n_hidden), (0.21,) * (len(n_hidden) + 1))
    f_etas = tuple(e * args.lr_scale for e in f_etas)
    curve = []
    decay = round(args.lr_decay_epochs * len(y)) if args.lr_decay_epochs else None
    clf = CompartmentalClassifier(n_hidden=n_hidden, f_etas=f_etas, batch_size=args.batch_size, max_epochs=1,
                                  lr_decay_examples=decay, seed=args.seed, device=args.device, verbose=0)
    config = dict(dataset=args.dataset, n_train=len(y), n_test=len(yt), n_hidden=n_hidden, f_etas=f_etas,
                  batch_size=args.batch_size, lr_scale=args.lr_scale, lr_decay_epochs=args.lr_decay_epochs,
                  seed=args.seed, threads=args.threads,
                  defaults="paper (spiking both paths, conductances, broadcast, weight optimization, Wald steps)")
    print("config:", json.dumps(config), flush=True)
    out = Path(args.out or f"runs/compartmental_acc_{args.dataset}_{len(n_hidden)}h_b{args.batch_size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.with_suffix(".ckpt.pt")                 # network, data order and curve after every epoch (or chunk)
    chunk = args.eval_every or len(y)                  # test after every `chunk` training examples
    g = torch.Generator().manual_seed(args.seed)
    first_epoch, first_start, wall0, train_s = 0, 0, 0.0, 0.0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=args.device, weights_only=False)
        def run_config(c):                             # threads change the speed, not the run
            return {k: v for k, v in c.items() if k != "threads"}
        if run_config(state["config"]) != run_config(config):
            sys.exit(f"--resume: {ckpt} was saved with a different configuration:\n  {state['config']}\n"
                     f"rerun with the same arguments, or without --resume (or another --out) to start afresh")
        clf, curve, train_s, wall0 = state["clf"], state["curve"], state["train_s"], state["wall_s"]
        first_epoch, first_start = state["epoch"], state["next_start"]
        g.set_state(state["g_state"])
        print(f"resuming from {ckpt} at {clf.examples_seen_} examples seen", flush=True)
    elif args.resume:
        print(f"--resume: no checkpoint {ckpt} yet, starting afresh", flush=True)
    t0 = time.perf_counter() - wall0
    stop = False
    for epoch in range(first_epoch, args.epochs):
        g_state = g.get_state()                        # the state that draws this epoch's order (for --resume)
        perm = torch.randperm(len(y), generator=g).to(X.device)
        for start in range(first_start if epoch == first_epoch else 0, len(y), chunk):
            idx = perm[start:start + chunk]
            t = time.perf_counter()
            clf.partial_fit(X[idx], y[idx], classes=np.arange(len(ds.classes)))
            train_s += time.perf_counter() - t
            ep = epoch + (start + len(idx)) / len(y)
            last = epoch == args.epochs - 1 and start + chunk >= len(y)
            tested = chunk < len(y) or (epoch + 1) % args.test_every_epochs == 0 or last
            if tested:                                 # --test-every-epochs K: only every Kth epoch and the last
                err = 100 * (1 - clf.score(Xt, yt))
                curve.append(dict(epoch=round(ep, 4), examples_seen=clf.examples_seen_, test_error=err,
                                  wall_s=time.perf_counter() - t0, train_wall_s=train_s))
                print(f"epoch {ep:.2f}: test error {err:.2f} % on {len(yt)} test examples, rate factor "
                      f"{clf.lr_factor():.3f}, wall {curve[-1]['wall_s']:.0f} s (training {train_s:.0f} s, "
                      f"load average {os.getloadavg()[0]:.1f})", flush=True)
                out.write_text(json.dumps(dict(kind="accuracy", config=config, curve=curve, finished=False), indent=1))
            wall = time.perf_counter() - t0
            atomic_save(dict(config=config, clf=clf, curve=curve, train_s=train_s, wall_s=wall, epoch=epoch,
                             next_start=start + chunk, g_state=g_state), ckpt)
            if tested and args.max_minutes and wall > 60 * args.max_minutes:
                print(f"stopping at epoch {ep:.2f}: --max-minutes {args.max_minutes} reached", flush=True)
                stop = True
                break
        if stop:
            break
    target = PAPER_ERROR.get(len(n_hidden)) if args.dataset == "mnist" else None
    print(f"final: {args.dataset} test error {curve[-1]['test_error']:.2f} % after {curve[-1]['epoch']:g} epochs of "
          f"{len(y)} examples, batch {args.batch_size}, f_etas {f_etas}, wall {curve[-1]['wall_s']:.0f} s"
          + (f" (paper, 60 epochs: {target} %)" if target else ""))
    out.write_text(json.dumps(dict(kind="accuracy", config=config, curve=curve, finished=True), indent=1))
    print("saved", out)


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
        for n_layers, err in PAPER_ERROR.items():
            ax.axhline(err, ls="--", lw=1, color="grey")
            ax.annotate(f"MNIST, paper: {n_layers} hidden, 60 epochs", (ax.get_xlim()[0], err), xytext=(4, -2),
                        textcoords="offset points", ha="left", va="top", fontsize=8, color="grey")
        ax.set(xlabel="epoch", ylabel="test error (%)", ylim=(0, None), title="Compartmental network, spiking")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))   # below the axes: no curve hidden
    print("saved", save_figure(fig, path))


def main():
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
    p.add_argument("--eval-every", type=int, default=None, help="--accuracy: test after every N training examples "
                   "(default: once per epoch)")
    p.add_argument("--resume", action="store_true", help="--accuracy: continue from the checkpoint saved next to "
                   "--out after every epoch (same arguments); without it a run starts afresh")
    p.add_argument("--test-every-epochs", type=int, default=1, help="--accuracy: test only after every Kth epoch "
                   "and the last (a full MNIST test costs about a third of an epoch on the CPU)")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                   help="draw the test error curves of saved --accuracy runs into --figure")
    p.add_argument("--figure", default="compartmental_test_error.png", help="--plot: file under figures/")
    p.add_argument("--out", default=None, help="JSON file (default: runs/... for --accuracy, none for speed)")
    args = p.parse_args()
    if args.test_every_epochs < 1:
        p.error(f"--test-every-epochs must be at least 1, got {args.test_every_epochs}")
    if args.plot:
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
