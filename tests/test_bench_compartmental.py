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


def _fake_dataset(monkeypatch):
    """Tiny separable 4 x 4 images in place of MNIST, so the accuracy loop runs in seconds without data files."""
    import torch
    import utils.data
    import utils.train
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    X = (0.2 * torch.rand(64, 1, 4, 4, generator=g) + 0.6 * y.view(-1, 1, 1, 1)).float()
    ds = utils.data.Dataset(X[:48], y[:48], X[48:], y[48:], ["a", "b"])
    monkeypatch.setattr(utils.train, "load_dataset", lambda *a, **k: ds)   # where the training entry point calls it


def _run(monkeypatch, out, *extra):
    argv = ["bench_compartmental.py", "--accuracy", "--n-hidden", "8", "--batch-size", "16", "--threads", "1",
            "--out", str(out), *extra]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    return json.loads(Path(out).read_text())


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, monkeypatch):
    import torch
    _fake_dataset(monkeypatch)
    whole = _run(monkeypatch, tmp_path / "whole.json", "--epochs", "3")
    _run(monkeypatch, tmp_path / "parts.json", "--epochs", "1")            # an "interrupted" run: 1 epoch of 3
    parts = _run(monkeypatch, tmp_path / "parts.json", "--epochs", "3", "--resume")
    assert [c["epoch"] for c in parts["curve"]] == [1.0, 2.0, 3.0] and parts["finished"]
    assert [c["test_error"] for c in parts["curve"]] == [c["test_error"] for c in whole["curve"]]
    from utils.checkpoint import read_checkpoint
    a, _ = read_checkpoint(tmp_path / "whole.ckpt.pt")
    b, _ = read_checkpoint(tmp_path / "parts.ckpt.pt")
    assert a.examples_seen_ == b.examples_seen_ == 3 * 48
    for wa, wb in zip(a.W_, b.W_):
        assert torch.equal(wa, wb)


def test_resume_refuses_another_configuration(tmp_path, monkeypatch):
    _fake_dataset(monkeypatch)
    _run(monkeypatch, tmp_path / "r.json", "--epochs", "1")
    with pytest.raises(SystemExit, match="different configuration"):
        _run(monkeypatch, tmp_path / "r.json", "--epochs", "2", "--resume", "--f-etas", "1.0", "0.5")


def test_test_every_epochs_tests_every_kth_and_the_last(tmp_path, monkeypatch):
    _fake_dataset(monkeypatch)
    run = _run(monkeypatch, tmp_path / "k.json", "--epochs", "5", "--test-every-epochs", "2")
    assert [c["epoch"] for c in run["curve"]] == [2.0, 4.0, 5.0]
    assert [e["epoch"] for e in run["epochs"]] == [1, 2, 3, 4, 5] and all(e["train_s"] > 0 for e in run["epochs"])


def test_eval_every_is_refused_with_its_replacement(tmp_path, monkeypatch, capsys):
    _fake_dataset(monkeypatch)
    with pytest.raises(SystemExit):
        _run(monkeypatch, tmp_path / "e.json", "--epochs", "1", "--eval-every", "10")
    assert "--test-every-epochs" in capsys.readouterr().err


def test_compare_measures_one_engine_and_prints_the_ratio(monkeypatch, capsys):
    """--compare's pieces: measure() reports speed, memory and the cost per neuron-step of the engine on sys.path;
    compare() runs it for both engines in subprocesses and prints each row and the ratio."""
    import subprocess
    import types

    import torch
    import utils.data
    X = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ds = utils.data.Dataset(X[:32], torch.arange(32) % 10, X[32:], torch.arange(8) % 10, [str(i) for i in range(10)])
    monkeypatch.setattr(utils.data, "load_dataset", lambda *a, **k: ds)
    r = bench.measure("mnist", 4, 1, 1, 4)
    assert set(r) >= {"train_ex_s", "test_ex_s", "train_ns", "test_ns", "peak_mib", "warmup_s"}
    assert all(v > 0 for v in r.values())
    outs = iter([dict(r, train_ex_s=10.0, train_cpu=10.0, test_ex_s=5.0, test_cpu=5.0),
                 dict(r, train_ex_s=30.0, train_cpu=20.0, test_ex_s=15.0, test_cpu=10.0)])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(
        returncode=0, stdout=json.dumps(next(outs)), stderr=""))
    monkeypatch.setattr(bench.Path, "exists", lambda self: True)
    args = types.SimpleNamespace(compare="HEAD", cases=["mnist:4:1"], batches=1, test_examples=4, accuracy_train=0)
    bench.compare(args)
    out = capsys.readouterr().out
    assert "ratio       3.00      2.00                3.00      2.00" in out


def test_gpu_readiness_runs_both_engines_and_survives_a_failed_row(monkeypatch, capsys, tmp_path):
    """benchmarks/bench_gpu.py: each row runs compiled and eager in its own process (BIODL_COMPILE 1 / 0) and prints
    the ratio; a failing row (out of memory) prints its error and the run goes on; --out keeps every row."""
    import subprocess
    import types
    gspec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    gpu = importlib.util.module_from_spec(gspec)
    gspec.loader.exec_module(gpu)
    calls = []

    def fake_run(cmd, env, **kw):
        calls.append((cmd, env["BIODL_COMPILE"]))
        if "--one-population" in cmd and cmd[cmd.index("--one-population") + 1] == "8":
            return types.SimpleNamespace(returncode=1, stdout="", stderr="Traceback\nMemoryError: 9 GiB needed")
        fast = env["BIODL_COMPILE"] == "1"
        row = dict(train_ex_s=40.0 if fast else 10.0, peak_mib=100.0)
        if "--one" in cmd:
            row["test_ex_s"] = 30.0 if fast else 20.0
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(row), stderr="")
    monkeypatch.setattr(subprocess, "run", fake_run)
    gpu.main(["--device", "cpu", "--populations", "2", "8", "--out", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert [e for _, e in calls] == ["1", "0"] * 3
    assert "one network, batch 16 compiled / eager: training 4.00x, test 1.50x" in out
    assert "population of 2, batch 16 each compiled / eager: training 4.00x" in out
    assert "failed: MemoryError: 9 GiB needed" in out
    saved = json.loads((tmp_path / "g.json").read_text())
    assert [r["row"] for r in saved["rows"]] == ["one network, batch 16", "population of 2, batch 16 each",
                                                 "population of 8, batch 16 each"]
