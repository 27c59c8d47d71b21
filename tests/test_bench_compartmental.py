"""benchmarks/bench_compartmental.py --plot: draws saved accuracy runs; unreadable files give a clear message."""
import importlib.util
import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_compartmental", ROOT / "benchmarks" / "bench_compartmental.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_plot_draws_saved_runs(tmp_path):
    run = dict(kind="accuracy", finished=True,
               config=dict(dataset="mnist", n_hidden=[500], batch_size=16, f_etas=[6.72, 0.42], lr_decay_epochs=2),
               curve=[dict(epoch=1.0, test_error=9.0), dict(epoch=2.0, test_error=7.5)])
    f = tmp_path / "run.json"
    f.write_text(json.dumps(run))
    out = tmp_path / "curve.png"
    bench.plot([f], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_unreadable_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit, match="bad.json"):
        bench.plot([bad], tmp_path / "x.png")
