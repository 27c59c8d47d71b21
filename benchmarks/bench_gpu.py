"""The compartmental engine's GPU readiness check: one prepared run, at most --max-minutes (default 7).

    python benchmarks/bench_gpu.py --out $OUT/gpu.json                 # on a lent GPU (random MNIST-like images)
    python benchmarks/bench_gpu.py --device cpu --populations 2 --batches 1 --test-examples 16   # the same, tiny

Paper defaults (spiking both paths, 784-500-10, 50 + 50 steps plus the Wald extra steps, 250 test steps), batch 16
per network: one network's training and test examples/s, then populations of 16, 64 and 256 networks trained side
by side (aggregate training examples/s), each row with the sampler compiled (torch.compile: Triton on a GPU,
inductor's C++ on the CPU) and eager (BIODL_COMPILE=0), each in a fresh process (peak memory is per process), and
the ratio compiled / eager. Rows that would start past the deadline are skipped and said so; a row that fails (out of
memory) prints its error and the run goes on. Data: MNIST when BIODL_DATA is set, else random images of MNIST's
sparsity (the datasets do not travel to a lent machine).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).with_name("bench_compartmental.py")
ENGINES = {"compiled": "1", "eager": "0"}   # engine -> BIODL_COMPILE


def _row(args, what, engine):
    """One measurement in a fresh process (bench_compartmental's --one / --one-population): its JSON, or
    dict(error=...)."""
    cmd = [sys.executable, str(BENCH), *what, "--device", args.device, "--threads", str(args.threads),
           "--batches", str(args.batches)]
    if what[0] == "--one":
        cmd += ["--test-examples", str(args.test_examples)]
    env = dict(os.environ, BIODL_COMPILE=ENGINES[engine])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        lines = (out.stderr or out.stdout).strip().splitlines() or ["(no output)"]
        return dict(error=lines[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print(name, engine, r):
    if "error" in r:
        print(f"{name:>34} {engine:>9}: failed: {r['error']}", flush=True)
        return
    test = f"{r['test_ex_s']:>10.1f}" if "test_ex_s" in r else f"{'-':>10}"
    print(f"{name:>34} {engine:>9} {r['train_ex_s']:>11.1f} {test} {r['peak_mib']:>9.0f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads per process")
    p.add_argument("--member-batch", type=int, default=16, help="batch size of every network (default: 16)")
    p.add_argument("--populations", type=int, nargs="+", default=[16, 64, 256], help="population sizes")
    p.add_argument("--batches", type=int, default=4, help="timed training batches per row (after a warm-up)")
    p.add_argument("--test-examples", type=int, default=1024, help="examples of the single network's test")
    p.add_argument("--max-minutes", type=float, default=7.0, help="start no row after this many minutes")
    p.add_argument("--out", default=None, help="write the rows and settings as JSON here")
    args = p.parse_args(argv)
    t0, B = time.time(), args.member_batch
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"Compartmental engine on {args.device} ({name}), paper defaults, batch {B} per network, "
          f"{args.batches} timed batches per row, torch {torch.__version__}")
    print(f"{'':>34} {'engine':>9} {'train ex/s':>11} {'test ex/s':>10} {'peak MiB':>9}")
    rows = [(f"one network, batch {B}", ["--one", str(B)])] + \
        [(f"population of {P}, batch {B} each", ["--one-population", str(P), str(B)]) for P in args.populations]
    results = []
    for label, what in rows:
        got = {}
        for engine in ENGINES:
            if time.time() - t0 > 60 * args.max_minutes:
                print(f"{label:>34} {engine:>9}: skipped (past --max-minutes {args.max_minutes:g})", flush=True)
                continue
            got[engine] = r = _row(args, what, engine)
            _print(label, engine, r)
        ok = [got[e]["train_ex_s"] for e in ENGINES if e in got and "error" not in got[e]]
        if len(ok) == 2:
            test = [got[e].get("test_ex_s") for e in ENGINES]
            tr = f", test {test[0] / test[1]:.2f}x" if None not in test else ""
            print(f"{label:>34} compiled / eager: training {ok[0] / ok[1]:.2f}x{tr}", flush=True)
        results.append(dict(row=label, **got))
    print(f"wall {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(device=args.device, device_name=name, settings=vars(args),
                                                  torch=torch.__version__, rows=results), indent=1))


if __name__ == "__main__":
    main()
