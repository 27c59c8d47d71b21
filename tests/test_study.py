"""utils.study: invalid CNN proposals, failures at chance, resume after SIGKILL, a cut-off log line, the settings,
peak memory, progress, the command line, and a small real study. Objectives are
injected fakes except in the real-training tests."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import sigkill_when
from utils.data import Dataset
from utils.errors import TrainingDiverged
from utils.evaluation import estimator_accepts, peak_memory, seed_kw
from utils.spaces import check_hyperparameters, make_space, reference_params, to_hyperparameters
from utils.study import StudySettings, main, run_study
from utils.study_log import load_results, read_log, summarize

REPO = Path(__file__).resolve().parents[1]


def tiny_dataset(n=120, shape=(1, 8, 8), n_classes=4, seed=0):
    """A separable problem as a utils.data.Dataset (train and test halves)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(n_classes, *shape, generator=g)
    y = torch.arange(2 * n) % n_classes
    X = (centers[y] + 0.1 * torch.randn(2 * n, *shape, generator=g)).clamp(0, 1)
    return Dataset(X[:n], y[:n], X[n:], y[n:], [str(c) for c in range(n_classes)])


def smooth_objective(hp):
    """A deterministic fake: best near lr = 1e-2, two 'folds'."""
    s = 0.9 - 0.1 * (math.log10(hp["lr"]) + 2) ** 2
    return [s, s - 0.01]


def read(study_dir):
    return [json.loads(line) for line in (Path(study_dir) / "evals.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# awkward proposals and failures


def test_invalid_cnn_suggestions_never_reach_training(tmp_path, monkeypatch):
    from bayes_opt import BayesianOptimization
    bad = {"batch_size": 50, "log10_lr": -3.0, "n_blocks": 5, "stride": 3, "padding": 1,
           **{f"channels_{i}": 8 for i in range(1, 6)}, **{f"kernel_{i}": 10 for i in range(1, 6)}}
    monkeypatch.setattr(BayesianOptimization, "suggest", lambda self: dict(bad))  # the GP always proposes it
    ds = tiny_dataset()
    seen = []

    def fake(hp):
        assert check_hyperparameters("cnn", hp, (1, 8, 8)) is None  # only valid ones are ever trained
        seen.append(hp)
        return smooth_objective(hp)

    res = run_study("cnn", ds, iterations=4, folds=2, epochs=1, out=tmp_path, init_points=2, evaluate=fake,
                       retrain=False, start=None, verbose=0)
    recs = read(res["study_dir"])
    assert len(seen) == 4
    invalid = [r for r in recs if r["status"] == "invalid"]
    assert len(invalid) == 2 and all(r["params"] == bad and "block 1" in r["reason"] for r in invalid)
    assert [r["source"] for r in recs if r["status"] == "ok"] == ["random", "random", "bo-valid (invalid)",
                                                                   "bo-valid (invalid)"]
    row = res["summary"].iloc[0]
    assert (row.n_evals, row.n_invalid, row.n_failed) == (4, 2, 0)
    keys = [tuple(sorted(r["params"].items())) for r in recs if r["status"] == "ok"]
    assert len(set(keys)) == len(keys)  # no point evaluated twice


def test_reference_configuration_is_evaluated_first(tmp_path):
    seen = []

    def fake(hp):
        seen.append(hp)
        return [0.5, 0.5]

    res = run_study("compartmental", tiny_dataset(), iterations=3, folds=2, epochs=1, out=tmp_path, init_points=2,
                       evaluate=fake, retrain=False, fixed={"batch_size": 16}, max_phase=30, verbose=0)
    recs = read(res["study_dir"])
    assert [r["source"] for r in recs] == ["start", "random", "bo-prior"]  # the GP picks among flag-prior draws
    first = seen[0]   # the paper's network, rates scaled for batches of 16, phases capped at max_phase
    assert first["n_hidden"] == (500,) and first["f_etas"] == pytest.approx((0.21 * 32, 0.21 * 2))
    assert (first["l_f_phase"], first["l_t_phase"], first["integration_time"]) == (30, 30, 12)
    assert (first["dt"], first["mem"], first["lambda_max"], first["tau_s"], first["tau_L"]) == (1.0, 10, 0.2, 3.0, 10.0)
    assert first["g_L"] == pytest.approx(0.1) and first["g_B"] == first["g_D"] == pytest.approx(0.6)
    assert first["use_spiking_feedforward"] and first["use_broadcast"] and not first["use_sparse_feedback"]
    mlp = to_hyperparameters("mlp", reference_params("mlp", make_space("mlp")))
    assert mlp == dict(hidden_sizes=(500,), lr=pytest.approx(1e-3), batch_size=100)
    with pytest.raises(ValueError, match="missing"):
        run_study("mlp", tiny_dataset(), iterations=1, out=tmp_path / "x", evaluate=fake, start={"n_layers": 1},
                     verbose=0)


def test_duplicate_suggestions_are_replaced(tmp_path, monkeypatch):
    from bayes_opt import BayesianOptimization
    monkeypatch.setattr(BayesianOptimization, "suggest", lambda self: dict(self.res[0]["params"]))  # seen before
    res = run_study("mlp", tiny_dataset(), iterations=4, folds=2, epochs=1, out=tmp_path, init_points=1,
                       evaluate=smooth_objective, retrain=False, verbose=0)
    recs = read(res["study_dir"])
    assert [r["source"] for r in recs] == ["start"] + ["bo-valid (duplicate)"] * 3
    keys = [tuple(sorted(r["params"].items())) for r in recs]
    assert len(set(keys)) == 4


def test_failures_score_chance_and_the_loop_goes_on(tmp_path):
    ds = tiny_dataset(n_classes=4)
    errors = [TrainingDiverged("the training loss became nan"), RuntimeError("CUDA out of memory. Tried to allocate"),
              ValueError("batch_size must be positive"), None, None]

    def fake(hp):
        e = errors.pop(0)
        if e is not None:
            raise e
        return smooth_objective(hp)

    res = run_study("mlp", ds, iterations=5, folds=2, epochs=1, out=tmp_path, init_points=2, evaluate=fake,
                       retrain=False, verbose=0)
    recs = read(res["study_dir"])
    assert [r["status"] for r in recs] == ["diverged", "oom", "error", "ok", "ok"]
    for r in recs[:3]:
        assert r["target"] == 0.25 and r["fold_scores"] is None and r["reason"]
    assert "nan" in recs[0]["reason"] and "out of memory" in recs[1]["reason"]
    row = res["summary"].iloc[0]
    assert row.n_failed == 3 and row.worst == 0.25 and row.best > 0.5
    assert summarize(res["evals"], include_failures=False).iloc[0].worst > 0.5

    def buggy(hp):  # anything else is a bug and stops the study
        raise KeyError("oops")

    with pytest.raises(KeyError):
        run_study("mlp", ds, iterations=1, out=tmp_path / "b", evaluate=buggy, retrain=False, verbose=0)


def test_a_really_diverging_configuration_is_a_failure(tmp_path):
    """Real make_classifier + cross_validate: Adam at lr=1e20 turns the loss into NaN -> TrainingDiverged."""
    ds = tiny_dataset()
    res = run_study("mlp", ds, iterations=2, folds=2, epochs=1, out=tmp_path, fixed={"lr": 1e20, "batch_size": 10},
                    verbose=0)
    recs = read(res["study_dir"])
    assert [r["status"] for r in recs] == ["diverged", "diverged"]
    assert all(r["target"] == 0.25 and "nan" in r["reason"] for r in recs)
    assert res["best"] is None and res["test_acc"] is None and not (res["study_dir"] / "best.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# files and resume


def test_truncated_last_line_is_dropped_and_the_study_resumes(tmp_path):
    ds = tiny_dataset()
    settings = StudySettings(folds=2, epochs=1, out=tmp_path, init_points=2, evaluate=smooth_objective,
                             retrain=False, verbose=0)
    study = run_study("mlp", ds, dataclasses.replace(settings, iterations=3))["study_dir"]
    log = study / "evals.jsonl"
    before = log.read_text()
    with open(log, "a") as f:
        f.write('{"iteration": 3, "status": "ok", "tar')  # a write cut short by a kill
    with pytest.raises(json.JSONDecodeError):
        [json.loads(line) for line in log.read_text().splitlines()]
    assert len(read_log(log, repair=False)) == 3 and log.read_text() != before
    assert len(read_log(log)) == 3 and log.read_text() == before  # repaired
    run_study("mlp", ds, settings, iterations=5)
    recs = read(study)
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3, 4]
    assert log.read_text().startswith(before)
    assert not (study / "optimizer_state.json").exists()  # the optimizer is rebuilt from the log alone


def test_changed_settings_refuse_to_mix_into_an_existing_study(tmp_path):
    ds = tiny_dataset()
    kw = dict(out=tmp_path, init_points=1, evaluate=smooth_objective, retrain=False, verbose=0)
    run_study("mlp", ds, iterations=1, folds=2, epochs=1, **kw)
    with pytest.raises(ValueError, match="folds"):
        run_study("mlp", ds, iterations=2, folds=3, epochs=1, **kw)


SCRIPT = """
import json, math, sys, time
import torch
sys.path.insert(0, {repo!r})
from utils.study import run_study
from utils.data import Dataset

out, calls, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])

def fake(hp):
    with open(calls, "a") as f:  # which evaluations were started, in which process
        f.write(json.dumps(hp["seed"]) + "\\n")
    time.sleep(delay)
    s = 0.9 - 0.1 * (math.log10(hp["lr"]) + 2) ** 2 - 1e-4 * hp["batch_size"]
    return [s, s]

g = torch.Generator().manual_seed(0)
X, y = torch.rand(40, 1, 4, 4, generator=g), torch.arange(40) % 4
ds = Dataset(X, y, X, y, list("abcd"))
run_study("mlp", ds, iterations=7, folds=2, epochs=1, out=out, init_points=2, evaluate=fake, retrain=False,
             verbose=1)
"""


def test_resume_after_sigkill_mid_evaluation(tmp_path):
    script = tmp_path / "study.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    log = out / "mlp_custom" / "evals.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(calls), "0.4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    def inside_third_evaluation():  # >= 2 logged and the next one started (inside its 0.4 s)
        n_done = len(log.read_text().splitlines()) if log.exists() else 0
        n_started = len(calls.read_text().splitlines()) if calls.exists() else 0
        n_done_again = len(log.read_text().splitlines()) if log.exists() else 0
        return n_done >= 2 and n_done == n_done_again and n_started > n_done
    sigkill_when(proc, inside_third_evaluation, "the study did not log 2 evaluations", poll=0.02)
    assert proc.returncode == -signal.SIGKILL
    before = log.read_text()
    done = [json.loads(line) for line in before.splitlines()]
    started_before = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(done) >= 2 and len(started_before) == len(done) + 1  # killed during an evaluation

    calls.write_text("")
    rerun = subprocess.run([sys.executable, str(script), str(out), str(calls), "0"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming" in rerun.stdout and "7/7" in rerun.stdout and "best" in rerun.stdout
    after = log.read_text()
    recs = [json.loads(line) for line in after.splitlines()]  # the whole log parses
    assert after.startswith(before)  # no finished evaluation lost or rewritten
    assert [r["iteration"] for r in recs] == list(range(7))
    rerun_seeds = [json.loads(line) for line in calls.read_text().splitlines()]
    assert rerun_seeds == list(range(len(done), 7))  # none repeated; the killed one redone once

    # the resumed study proposes exactly what an uninterrupted one does
    def fast(hp):
        s = 0.9 - 0.1 * (math.log10(hp["lr"]) + 2) ** 2 - 1e-4 * hp["batch_size"]
        return [s, s]

    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(40, 1, 4, 4, generator=g), torch.arange(40) % 4
    ref = run_study("mlp", Dataset(X, y, X, y, list("abcd")), iterations=7, folds=2, epochs=1,
                       out=tmp_path / "ref", init_points=2, evaluate=fast, retrain=False, verbose=0)
    assert [r["params"] for r in read(ref["study_dir"])] == [r["params"] for r in recs]


def test_cut_off_invalid_line_pair_is_redone_without_duplicates(tmp_path, monkeypatch):
    """A kill inside the two-line write of an invalid suggestion and its replacement leaves a lone 'invalid' line."""
    from bayes_opt import BayesianOptimization
    bad = {"batch_size": 50, "log10_lr": -3.0, "n_blocks": 5, "stride": 3, "padding": 1,
           **{f"channels_{i}": 8 for i in range(1, 6)}, **{f"kernel_{i}": 10 for i in range(1, 6)}}
    monkeypatch.setattr(BayesianOptimization, "suggest", lambda self: dict(bad))
    kw = dict(folds=2, epochs=1, out=tmp_path, init_points=1, evaluate=smooth_objective, retrain=False, verbose=0)
    study = run_study("cnn", tiny_dataset(), iterations=2, **kw)["study_dir"]
    lines = (study / "evals.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(x)["status"] for x in lines] == ["ok", "invalid", "ok"]
    (study / "evals.jsonl").write_text(lines[0] + lines[1] + lines[2][:25])
    run_study("cnn", tiny_dataset(), iterations=2, **kw)
    again = (study / "evals.jsonl").read_text().splitlines(keepends=True)
    assert again[0] == lines[0] and [json.loads(x)["status"] for x in again] == ["ok", "invalid", "ok"]

    def strip(line):  # the same records, up to when they were written
        return {k: v for k, v in json.loads(line).items() if k not in ("finished", "time_s", "peak_mem_mb")}

    assert [strip(x) for x in again] == [strip(x) for x in lines]


# ----------------------------------------------------------------------------------------------------------------
# real training, results and the command line


def test_small_real_study_end_to_end(tmp_path, blobs):
    X, y = blobs
    ds = Dataset(X[:400], y[:400], X[400:], y[400:], [str(c) for c in range(10)])
    res = run_study("mlp", ds, iterations=3, folds=2, epochs=2, out=tmp_path, init_points=2, name="blobs",
                       verbose=0)
    recs = read(res["study_dir"])
    assert [r["status"] for r in recs] == ["ok"] * 3 and [r["seed"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert len(r["fold_scores"]) == 2 and r["target"] == pytest.approx(np.mean(r["fold_scores"]))
        assert r["time_s"] > 0 and r["peak_mem_mb"] > 0 and r["mem_kind"].startswith("cpu")
    best = json.loads((res["study_dir"] / "best.json").read_text())
    assert best["n_train"] == 400 and best["n_test"] == 200 and 0 <= best["test_acc"] <= 1
    table = summarize(tmp_path)
    assert list(table.columns[:9]) == ["model", "dataset", "best", "worst", "mean", "std", "n_evals", "n_failed",
                                       "n_invalid"]
    row = table.iloc[0]
    assert (row.model, row.dataset, row.n_evals) == ("mlp", "blobs", 3)
    assert row.best == max(r["target"] for r in recs) and row.worst == min(r["target"] for r in recs)
    assert row.best > 0.5 and row.test_acc == best["test_acc"]
    assert row.best_params == recs[int(np.argmax([r["target"] for r in recs]))]["hyperparameters"]
    assert isinstance(load_results(tmp_path), pd.DataFrame)


def test_command_line_on_an_idx_root(tmp_path, mnist_root, capsys):
    main(["--model", "mlp", "--dataset", "mnist", "--data-root", str(mnist_root), "--subset", "100",
             "--iterations", "2", "--folds", "2", "--epochs", "1", "--init-points", "2", "--out", str(tmp_path),
             "--retrain-subset", "100", "--test-subset", "100"])
    out = capsys.readouterr().out
    assert "[mlp/mnist] 1/2 cv" in out and "[mlp/mnist] 2/2 cv" in out and "ETA" in out and "best" in out
    assert "mlp" in out.splitlines()[-1] and len(read(tmp_path / "mlp_mnist")) == 2
    config = json.loads((tmp_path / "mlp_mnist" / "config.json").read_text())
    assert (config["folds"], config["epochs"], config["subset"], config["n_train"]) == (2, 1, 100, 100)
    assert config["versions"]["bayesian-optimization"] and config["space"]["batch_size"] == [10, 500, "int"]
    main(["--summary", "--out", str(tmp_path)])
    assert "mlp" in capsys.readouterr().out


def test_compartmental_study_runs_with_capped_phases(tmp_path):
    """Real CompartmentalClassifier through the loop: seeds reach it as seed, phases stay under the cap."""
    ds = tiny_dataset(n=40)
    res = run_study("compartmental", ds, iterations=2, folds=2, epochs=1, out=tmp_path, init_points=2,
                       max_phase=25, fixed={"batch_size": 10}, retrain=False, verbose=0)
    recs = read(res["study_dir"])
    assert len(recs) == 2
    for r in recs:
        assert r["status"] in ("ok", "diverged")
        hp = r["hyperparameters"]
        assert 20 <= hp["l_f_phase"] <= 25 and 20 <= hp["l_t_phase"] <= 25
    config = json.loads((res["study_dir"] / "config.json").read_text())
    assert config["max_phase"] == 25 and config["space"]["l_f_phase"] == [20, 25, "int"]
    assert seed_kw(estimator_accepts("compartmental"), 5) == {"seed": 5}


def test_help_shows_defaults_and_where_the_notebooks_read(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m utils.study")
    assert "training epochs of every evaluation (default: 10, or the protocol's)" in " ".join(text.split())
    assert "logs/full" in text


# ----------------------------------------------------------------------------------------------------------------
# the settings, peak memory, progress, the old module name


def test_settings_are_one_frozen_dataclass_saved_in_config(tmp_path):
    settings = StudySettings()
    assert (settings.iterations, settings.folds, settings.epochs, settings.out, settings.seed) == (50, 3, 10, "logs", 0)
    assert settings.start == "reference" and settings.q is None and settings.flip_prob == 0.05 and settings.retrain
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.iterations = 3
    with pytest.raises(ValueError, match="q=0"):
        StudySettings(q=0)
    with pytest.raises(ValueError, match="flip_prob"):
        StudySettings(flip_prob=2.0)
    with pytest.raises(TypeError):
        run_study("mlp", tiny_dataset(), settings, no_such_setting=1)
    small = StudySettings(iterations=2, folds=2, epochs=1, out=tmp_path, seed=3, init_points=1, retrain=False,
                          evaluate=smooth_objective, verbose=0)
    res = run_study("mlp", tiny_dataset(), small)
    config = json.loads((res["study_dir"] / "config.json").read_text())
    assert (config["iterations"], config["folds"], config["epochs"], config["seed"], config["q"]) == (2, 2, 1, 3, 1)
    assert config["start"] == reference_params("mlp", make_space("mlp")) and config["flip_prob"] is None
    assert [r["seed"] for r in read(res["study_dir"])] == [3, 4]
    with pytest.raises(ValueError, match="epochs"):  # resume checks the saved settings
        run_study("mlp", tiny_dataset(), small, epochs=2)


def test_peak_memory_records_the_process_peak_on_the_cpu():
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with peak_memory("cpu") as mem:
        block = torch.ones(64, 2**20 // 4)  # 64 MiB
    # peak_mem_mb is rounded to 0.1 MiB: compare within that rounding
    assert mem["mem_kind"] == "cpu_maxrss" and mem["peak_mem_mb"] >= max(before, 64) - 0.05
    del block
    with peak_memory(None) as again:  # the lifetime peak never decreases
        pass
    assert again["peak_mem_mb"] >= mem["peak_mem_mb"]


def test_progress_bar_counts_evaluations_with_the_best_so_far(capsys):
    import io
    from tqdm import tqdm
    from utils.study import _progress
    bar = tqdm(total=3, initial=1, file=io.StringIO(), mininterval=0)
    done = {0: {"target": 0.5}, 1: {"target": 0.7}}
    _progress(bar, "[mlp/toy]", dict(status="ok", target=0.7, time_s=0.2, reason=None), done, "random")
    assert bar.n == 2 and bar.postfix == "best=0.7000"
    line = capsys.readouterr().out
    assert line.startswith("[mlp/toy] 2/3 cv 0.7000  best 0.7000  0.2 s  ETA ") and line.endswith("(random)\n")
    quiet = tqdm(total=3, disable=True)
    _progress(quiet, "[mlp/toy]", dict(status="ok", target=0.7, time_s=0.2, reason=None), done, "random")
    assert capsys.readouterr().out == ""


def test_the_study_runs_as_utils_study_and_bayes_opt_is_the_library():
    import bayes_opt
    assert not (REPO / "utils" / "bayes_opt.py").exists() and hasattr(bayes_opt, "BayesianOptimization")
    run = subprocess.run([sys.executable, "-m", "utils.study", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m utils.study"), run.stderr
