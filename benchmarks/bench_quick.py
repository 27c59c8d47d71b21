"""Quick mode, the main command, must show learning: the floors of the MNIST notebook's quick run, and its time.

    BIODL_DATA=/path/to/datasets python benchmarks/bench_quick.py              # MNIST and Fashion-MNIST, as the notebook
    BIODL_DATA=/path/to/datasets python benchmarks/bench_quick.py --datasets mnist

Runs the steps of workspace_mnist.ipynb in quick mode (utils.workspace.QUICK: the models, the rules, the studies;
no figures) and prints, per dataset, each model's test accuracy on QUICK's n_test examples, the compartmental
network's last validation loss and last angle to backprop, each study's best cross-validated accuracy, and the
wall time of everything. Judged on MNIST: MLP >= 95 %, CNN >= 97 %, compartmental >= 85 % test accuracy, the
compartmental loss below ln 10 and its angle below 90 degrees at the end of its curve, every study's best above
chance, all of it (both datasets, as the notebook) in under 5 minutes on a quiet 2-core CPU.
"""
import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.data import load_dataset  # noqa: E402
from utils.runs import angles, curves  # noqa: E402
from utils.workspace import model_runs, rule_runs, rule_study, settings, study  # noqa: E402

FLOORS = {"mlp": 95.0, "cnn": 97.0, "compartmental": 85.0}   # MNIST test accuracy, %
MINUTES = 5.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion"])
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    S = settings(True)
    S["bo_out"] = "logs/bench_quick"
    data = {name: load_dataset(name, root=args.data_root) for name in args.datasets}
    verdicts = []
    for name, ds in data.items():
        runs = model_runs(ds, S, out="runs/bench_quick")
        rule_runs(ds, S, out="runs/bench_quick")
        print(runs.accuracies[["model", "dataset", "test_acc", "n_test"]].to_string(index=False))
        comp = runs.table[runs.table["model"] == "compartmental"]
        loss = curves(comp)["valid_loss"].dropna().iloc[-1]
        angle = angles(comp)["bp_angle"].dropna().iloc[-1]
        print(f"{name}: compartmental last validation loss {loss:.3f} (ln 10 = {math.log(10):.3f}), last angle to "
              f"backprop {angle:.1f} degrees")
        if name == "mnist":
            for r in runs.accuracies.itertuples():
                verdicts.append((f"MNIST {r.model} test {r.test_acc:.2f} % >= {FLOORS[r.model]}",
                                 r.test_acc >= FLOORS[r.model]))
            verdicts += [(f"MNIST compartmental loss {loss:.3f} < ln 10", loss < math.log(10)),
                         (f"MNIST compartmental angle {angle:.1f} < 90", angle < 90)]
    summary = rule_study(data, S, study(data, S, verbose=0), verbose=0)
    for r in summary.itertuples():
        print(f"study {r.model}/{r.dataset}: best CV {100 * r.best:.1f} %")
        verdicts.append((f"study {r.model}/{r.dataset} best {100 * r.best:.1f} % above chance 10 %", r.best > 0.1))
    minutes = (time.perf_counter() - t0) / 60
    verdicts.append((f"all of it in {minutes:.2f} min < {MINUTES:g} (quiet machine only)", minutes < MINUTES))
    for text, ok in verdicts:
        print(f"{'met   ' if ok else 'MISSED'} {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
