"""The study at scale: rounds of q proposals, resume of a round killed half-way, Dask clusters (a worker killed
mid-evaluation, --scheduler against a running cluster), compartmental populations, the flag-flip prior, the folder
lock and the log's bad lines. Objectives are injected fakes except where real training is the point."""
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sigkill_when
from utils.cluster import groups
from utils.data import Dataset
from utils.propose import flag_sampler, make_optimizer
from utils.compartmental_kind import COMPARTMENTAL_FLAGS
from utils.spaces import make_space, reference_params, to_hyperparameters
from utils.study import run_study
from utils.study_log import StudyError, load_results, study_lock

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = dict(os.environ, OMP_NUM_THREADS="1", BIODL_COMPILE="0",
                PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))


def tiny_dataset(n=40, shape=(1, 4, 4), n_classes=4):
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(n, *shape, generator=g), torch.arange(n) % n_classes
    return Dataset(X, y, X, y, [str(c) for c in range(n_classes)])


def objective(hp):
    s = 0.9 - 0.1 * (math.log10(hp["lr"]) + 2) ** 2 - 1e-4 * hp["batch_size"]
    return [s, s - 0.01]


def read(study_dir):
    return [json.loads(line) for line in (Path(study_dir) / "evals.jsonl").read_text().splitlines()]


def slow_objective(marks, delay, hp):
    """A fake that leaves a file per start (its seed and the process id) and takes `delay` seconds."""
    Path(marks, f"{hp['seed']}.{os.getpid()}.{time.monotonic_ns()}").write_text("")
    time.sleep(delay)
    return objective(hp)


def starts(marks):
    return sorted(int(p.name.split(".")[0]) for p in Path(marks).iterdir())


# ----------------------------------------------------------------------------------------------------------------
# rounds of q proposals


def test_q4_study_gives_every_evaluation_once_in_rounds(tmp_path):
    res = run_study("mlp", tiny_dataset(), iterations=10, folds=2, epochs=1, out=tmp_path, init_points=2,
                       evaluate=objective, retrain=False, q=4, verbose=0)
    recs = read(res["study_dir"])  # the whole log parses
    assert sorted(r["iteration"] for r in recs) == list(range(10))
    assert [r["round"] for r in recs] == [0] * 4 + [4] * 4 + [8] * 2
    assert [r["round_size"] for r in recs] == [4] * 8 + [2] * 2
    assert [r["source"] for r in recs[:4]] == ["start", "random", "random", "random"]
    assert {r["source"] for r in recs[4:]} <= {"bo", "bo-valid (duplicate)"}
    keys = [tuple(sorted(r["params"].items())) for r in recs]
    assert len(set(keys)) == 10  # none repeated, also within a round
    assert res["summary"].iloc[0].n_evals == 10
    config = json.loads((res["study_dir"] / "config.json").read_text())
    assert config["q"] == 4


SCRIPT = """
import functools, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from utils.study import run_study
from test_study_scale import slow_objective, tiny_dataset
out, marks, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
run_study("mlp", tiny_dataset(), iterations=8, folds=2, epochs=1, out=out, init_points=2, retrain=False, q=4,
             evaluate=functools.partial(slow_objective, marks, delay), verbose=1)
"""


def test_sigkill_mid_round_then_resume_redoes_only_the_unfinished(tmp_path):
    script, out, marks = tmp_path / "study.py", tmp_path / "out", tmp_path / "marks"
    script.write_text(SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))
    marks.mkdir()
    log = out / "mlp_custom" / "evals.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(marks), "0.3"], env=DATA_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    def in_second_round():  # 5 or 6 of 8 logged, the next one started
        n_done = len(log.read_text().splitlines()) if log.exists() else 0
        return n_done in (5, 6) and len(starts(marks)) == n_done + 1
    sigkill_when(proc, in_second_round, "the study did not reach its second round")
    before = log.read_text()
    done = sorted(json.loads(line)["iteration"] for line in before.splitlines())
    assert 5 <= len(done) <= 6 and done == list(range(len(done)))

    for p in marks.iterdir():
        p.unlink()
    rerun = subprocess.run([sys.executable, str(script), str(out), str(marks), "0"], env=DATA_ENV,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming" in rerun.stdout
    after = log.read_text()
    assert after.startswith(before)  # finished evaluations kept as they were
    recs = [json.loads(line) for line in after.splitlines()]
    assert sorted(r["iteration"] for r in recs) == list(range(8))
    assert starts(marks) == list(range(len(done), 8))  # each unfinished one redone once

    ref = run_study("mlp", tiny_dataset(), iterations=8, folds=2, epochs=1, out=tmp_path / "ref",
                       init_points=2, evaluate=objective, retrain=False, q=4, verbose=0)
    by_it = {r["iteration"]: r["params"] for r in recs}
    assert [by_it[i] for i in range(8)] == [r["params"] for r in read(ref["study_dir"])]  # as if never killed


# ----------------------------------------------------------------------------------------------------------------
# Dask


def test_local_cluster_worker_killed_mid_evaluation(tmp_path):
    from distributed import Client, LocalCluster
    marks = tmp_path / "marks"
    marks.mkdir()
    killed = []

    def killer():  # SIGKILL the worker process running the third evaluation, once
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for p in marks.iterdir():
                seed, pid, _ = p.name.split(".")
                if seed == "2":
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
            time.sleep(0.01)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=50) as cluster, Client(cluster) as client:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        res = run_study("mlp", tiny_dataset(), iterations=4, folds=2, epochs=1, out=tmp_path, init_points=2,
                           evaluate=functools.partial(slow_objective, str(marks), 1.0), retrain=False,
                           cluster=client, verbose=0)
        thread.join(timeout=5)
    assert killed, "no worker was killed"
    recs = read(res["study_dir"])
    assert sorted(r["iteration"] for r in recs) == [0, 1, 2, 3]  # every evaluation logged once
    assert all(r["status"] == "ok" for r in recs)
    assert starts(marks).count(2) == 2  # the killed one ran again elsewhere
    ref = run_study("mlp", tiny_dataset(), iterations=4, folds=2, epochs=1, out=tmp_path / "ref",
                       init_points=2, evaluate=objective, retrain=False, q=2, verbose=0)
    by_it = {r["iteration"]: r for r in recs}  # the same study as in this process with the same q
    assert [by_it[i]["params"] for i in range(4)] == [r["params"] for r in read(ref["study_dir"])]
    assert [by_it[i]["target"] for i in range(4)] == [r["target"] for r in read(ref["study_dir"])]


def test_scheduler_option_uses_a_running_cluster(tmp_path, mnist_root):
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], env=DATA_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen(["dask", "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1"], env=DATA_ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = tmp_path / "out"
        run = subprocess.run([sys.executable, "-m", "utils.study", "--scheduler", address, "--model", "mlp",
                              "--dataset", "mnist", "--data-root", str(mnist_root), "--subset", "100",
                              "--iterations", "2", "--folds", "2", "--epochs", "1", "--init-points", "2",
                              "--retrain-subset", "100", "--test-subset", "100", "--out", str(out)],
                             cwd=REPO, env=DATA_ENV, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        recs = read(out / "mlp_mnist")
        assert sorted(r["iteration"] for r in recs) == [0, 1] and all(r["status"] == "ok" for r in recs)
        assert all(len(r["fold_scores"]) == 2 for r in recs)
        assert json.loads((out / "mlp_mnist" / "best.json").read_text())["status"] == "ok"
        assert "mlp" in run.stdout.splitlines()[-1]
        bad = subprocess.run([sys.executable, "-m", "utils.study", "--scheduler", "tcp://127.0.0.1:1",
                              "--out", str(out)], cwd=REPO, env=DATA_ENV, capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode != 0 and "no Dask scheduler answered" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


# ----------------------------------------------------------------------------------------------------------------
# compartmental populations and the flag prior


def test_flag_flip_draw():
    space = make_space("compartmental")
    ref = reference_params("compartmental", space)
    paper = {f: ref[f] for f in COMPARTMENTAL_FLAGS}
    rng = np.random.RandomState(0)
    opt = make_optimizer(space, rng)
    assert all({f: p[f] for f in paper} == paper for p in flag_sampler(opt, rng, paper, 0.0)(50))
    flipped = {f: "on" if v == "off" else "off" for f, v in paper.items()}
    assert all({f: p[f] for f in paper} == flipped for p in flag_sampler(opt, rng, paper, 1.0)(50))
    half = flag_sampler(opt, rng, paper, 0.5)(400)
    share = np.mean([p[f] != paper[f] for p in half for f in paper])
    assert 0.4 < share < 0.6
    assert paper["use_spiking_feedforward"] == "on" and paper["use_sparse_feedback"] == "off"


def test_compartmental_study_draws_near_the_paper(tmp_path):
    seen = []

    def fake(hp):
        seen.append(hp)
        return [0.5, 0.5]

    res = run_study("compartmental", tiny_dataset(), iterations=6, folds=2, epochs=1, out=tmp_path,
                       init_points=4, evaluate=fake, retrain=False, fixed={"batch_size": 16}, flip_prob=0.0,
                       q=3, verbose=0)
    defaults = to_hyperparameters("compartmental", reference_params("compartmental", make_space(
        "compartmental")))
    for hp in seen:  # at flip probability 0 every draw has the paper's flags
        assert all(hp[f] == defaults[f] for f in COMPARTMENTAL_FLAGS)
    assert [r["source"] for r in read(res["study_dir"])][-2:] == ["bo-prior", "bo-prior"]
    assert json.loads((res["study_dir"] / "config.json").read_text())["flip_prob"] == 0.0


def test_population_group_scores_equal_each_alone(monkeypatch):
    from utils import cluster
    from utils.errors import TrainingDiverged
    monkeypatch.setenv("BIODL_COMPILE", "0")
    X, y = tiny_dataset(n=48).X_train, tiny_dataset(n=48).y_train
    kw = dict(n_hidden=(12,), batch_size=8, max_epochs=1, l_f_phase=20, l_t_phase=20, l_f_phase_test=20,
              integration_time=8, device="cpu")
    jobs = [(0, dict(kw, seed=0, f_etas=(2.0, 0.4))), (1, dict(kw, seed=1, f_etas=(1.0, 0.2)))]
    other = (2, dict(kw, seed=2, n_hidden=(10,)))
    assert [len(g) for g in groups("compartmental", jobs + [other], None)] == [2, 1]
    assert [len(g) for g in groups("mlp", [(0, {}), (1, {})], None)] == [1, 1]
    ctx = dict(model="compartmental", folds=2, seed=0, chance=0.25, device="cpu", token="t")
    together = dict(cluster.evaluate_group(jobs, (X, y), ctx))
    alone = {it: dict(cluster.evaluate_group([(it, k)], (X, y), ctx))[it] for it, k in jobs}
    for it in (0, 1):
        assert together[it]["status"] == alone[it]["status"] == "ok"
        assert together[it]["fold_scores"] == alone[it]["fold_scores"] and together[it]["population"] == 2

    calls = []

    def diverging(estimators, datasets):  # one member of the population diverges: the others still count
        calls.append(len(estimators))
        if len(estimators) > 2 or estimators[0].seed == 1:
            raise TrainingDiverged("potentials became NaN")
        return [e.fit(X_, y_) for e, (X_, y_) in zip(estimators, datasets)]

    monkeypatch.setattr("utils.compartmental_kind.fit_population", diverging)
    res = dict(cluster.evaluate_group(jobs, (X, y), ctx))
    assert calls[0] == 4 and res[0]["status"] == "ok" and res[1]["status"] == "diverged"
    assert res[0]["fold_scores"] == alone[0]["fold_scores"] and res[1]["target"] == 0.25


# ----------------------------------------------------------------------------------------------------------------
# issue 21: lock, CPU out of memory, missing config, bad lines, Infinity


def test_a_second_process_on_the_same_study_is_refused(tmp_path):
    ds = tiny_dataset()
    kw = dict(folds=2, epochs=1, out=tmp_path, init_points=1, evaluate=objective, retrain=False, verbose=0)
    study = run_study("mlp", ds, iterations=1, **kw)["study_dir"]
    with study_lock(study):  # another process holds the folder
        with pytest.raises(StudyError, match="in use by another study"):
            run_study("mlp", ds, iterations=2, **kw)
    assert len(read(study)) == 1
    run_study("mlp", ds, iterations=2, **kw)  # free again
    assert len(read(study)) == 2


def test_cpu_out_of_memory_is_a_failure(tmp_path):
    def fake(hp):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 80000000000 bytes")

    res = run_study("mlp", tiny_dataset(), iterations=2, folds=2, epochs=1, out=tmp_path, evaluate=fake,
                       retrain=False, verbose=0)
    assert [r["status"] for r in read(res["study_dir"])] == ["oom", "oom"]


def test_records_without_config_are_refused(tmp_path):
    kw = dict(folds=2, epochs=1, out=tmp_path, init_points=1, evaluate=objective, retrain=False, verbose=0)
    study = run_study("mlp", tiny_dataset(), iterations=1, **kw)["study_dir"]
    (study / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        run_study("mlp", tiny_dataset(), iterations=2, **kw)


def test_bad_lines_are_set_aside_and_named(tmp_path):
    kw = dict(folds=2, epochs=1, out=tmp_path, init_points=1, evaluate=objective, retrain=False, verbose=0)
    study = run_study("mlp", tiny_dataset(), iterations=3, **kw)["study_dir"]
    log = study / "evals.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + b"\xff\xfe not utf-8\n" + lines[1] + b'{"iteration": 9}\n' + lines[2])
    with pytest.warns(UserWarning, match=r"line 2: not UTF-8.*line 4: a record without status"):
        assert len(load_results(study)) == 3  # reading while a study runs: skipped, nothing written
    assert len(log.read_bytes().splitlines()) == 5
    with pytest.warns(UserWarning, match="moved to"):
        run_study("mlp", tiny_dataset(), iterations=4, **kw)
    assert (study / "evals.jsonl.rejected").read_bytes() == b'\xff\xfe not utf-8\n{"iteration": 9}\n'
    assert sorted(r["iteration"] for r in read(study)) == [0, 1, 2, 3]


def test_config_json_is_strict_json(tmp_path):
    kw = dict(folds=2, epochs=1, out=tmp_path, init_points=1, evaluate=objective, retrain=False, verbose=0,
              fixed={"lr_decay_examples": float("inf")})
    study = run_study("mlp", tiny_dataset(), iterations=1, **kw)["study_dir"]

    def strict(c):
        raise ValueError(f"{c} is not JSON")

    config = json.loads((study / "config.json").read_text(), parse_constant=strict)
    assert config["fixed"] == {"lr_decay_examples": "inf"}
    for line in (study / "evals.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)
    run_study("mlp", tiny_dataset(), iterations=2, **kw)  # the same settings resume
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_results(study)) == 2


def test_compartmental_study_holding_the_structure_trains_each_round_as_one_population(tmp_path):
    """hold="structure": every candidate has the paper's structure (so a round's candidates form one population
    group) and differs only in its numbers; the held values are in config.json."""
    from utils.cluster import structure_key
    seen = []

    def fake(hp):
        seen.append(hp)
        return [0.5, 0.5]

    res = run_study("compartmental", tiny_dataset(), iterations=5, folds=2, epochs=1, out=tmp_path, init_points=3,
                    evaluate=fake, retrain=False, fixed={"batch_size": 16}, hold="structure", q=3, verbose=0)
    assert len(seen) == 5 and len({structure_key("compartmental", {**hp, "batch_size": 16}) for hp in seen}) == 1
    assert len({hp["lambda_max"] for hp in seen}) == 5            # the numbers are searched
    assert all(hp["n_hidden"] == (500,) and hp["use_spiking_feedback"] for hp in seen)
    jobs = [(i, {**hp, "batch_size": 16}) for i, hp in enumerate(seen[:3])]
    assert [len(g) for g in groups("compartmental", jobs, None)] == [3]   # the first round: one population
    config = json.loads((res["study_dir"] / "config.json").read_text())
    assert config["held"]["units_1"] == 500 and "units_1" not in config["space"]


def test_started_cluster_workers_keep_glibc_malloc_trimming(monkeypatch):
    """Dask's nanny would start workers with MALLOC_TRIM_THRESHOLD_=65536 (freed memory returned at once: page faults
    at every large allocation); the clusters utils.cluster starts leave it unset, and keep one torch thread."""
    from utils.cluster import USER_MALLOC_TRIM, start_client
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")   # as a Dask cluster started earlier here leaves it
    client, cluster = start_client(workers=1, threads=1, dashboard=None)
    try:
        env = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    finally:
        client.close()
        cluster.close()
    (worker_env,) = env.values()
    assert worker_env["MALLOC_TRIM_THRESHOLD_"] == USER_MALLOC_TRIM   # unset (unless the user set it)
    assert worker_env["OMP_NUM_THREADS"] == "1"


FAULTS = """
import resource, sys, torch
from utils.cluster import undo_dask_malloc_trim
torch.set_num_threads(1)
undone = undo_dask_malloc_trim() if sys.argv[1] == "undo" else False
x = torch.randn(256, 1024)   # 1 MiB: above glibc's fixed 128 KiB mmap threshold under Dask's variable
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    (x * 2 + 1).sum()
print(undone, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_hand_started_worker_undoes_dask_malloc_trim_in_process():
    """A `dask worker` started by hand runs with Dask's MALLOC_TRIM_THRESHOLD_=65536: every large temporary array is a
    fresh mmap that page-faults; evaluate_group's undo_dask_malloc_trim() makes such arrays reuse freed memory."""
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = {}
    for how in ("keep", "undo"):
        out = subprocess.run([sys.executable, "-c", FAULTS, how], env=env, capture_output=True, text=True, check=True)
        undone, faults = out.stdout.split()
        runs[how] = (undone == "True", int(faults))
    assert runs["undo"][0] and not runs["keep"][0]
    assert runs["undo"][1] * 5 < runs["keep"][1], runs   # measured: about 400 vs 51,000 page faults
