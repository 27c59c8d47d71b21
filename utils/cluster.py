"""Where a study's evaluations run: in the study's own process, or as tasks on Dask distributed.

    from utils.cluster import start_client
    client, cluster = start_client()                       # a LocalCluster (CPU) or one worker per GPU
    client, cluster = start_client("tcp://host:8786")      # a running cluster (`dask scheduler` + `dask worker`s)

An evaluation group is a list of jobs (iteration, keyword arguments of make_classifier): one job for the MLP and the
CNN, the candidates of one round that share a structure for the compartmental network (they and their folds train
as one population, utils.compartmental.fit_population). evaluate_group() runs a group where it is called: in the
study process (Local) or on a Dask worker (Distributed: one task per group). Only the study process writes the log;
a worker that dies loses its task, which Dask reruns elsewhere (and Distributed resubmits when Dask gives up).

GPU boxes: `pip install dask-cuda` for one worker per GPU (dask_cuda.LocalCUDACluster); without it the study starts
one worker that uses the first GPU. Workers run GPU_THREADS evaluations at once, each on its own CUDA stream.
Dask is imported only where it is used (start_client, Distributed), not at the top: a study that evaluates in its
own process runs without it.
"""
import contextlib
import ctypes
import logging
import os
from concurrent.futures import CancelledError

import numpy as np
import torch

from utils.classifiers import make_classifier
from utils.data import get_device
from utils.evaluation import cross_validate, cross_validate_many, run_evaluation
from utils.kinds import get_kind

# ----------------------------------------------------------------------------------------------------------------
# settings
CPU_WORKERS = None     # LocalCluster workers on a machine without GPU (None: one per core, at most 4)
CPU_THREADS = 1        # evaluations at once per CPU worker (torch itself runs one thread per worker)
GPU_THREADS = 2        # evaluations at once per GPU worker (own CUDA stream each; not yet measured on a GPU)
DASHBOARD = ":8787"    # the Dask dashboard of a cluster the study starts (http://localhost:8787/status)
RESUBMITS = 2          # times a group is resubmitted after Dask gave up on it (KilledWorker, lost data)
CONNECT_TIMEOUT = "20s"  # to reach a --scheduler
# environment of the worker processes of a cluster started here: Dask's default MALLOC_TRIM_THRESHOLD_=65536 makes
# glibc return freed memory at once, and the simulation's many large temporary arrays then page-fault again on every
# allocation (the cost: docs/results.md, "Measurements moved from the code"); None unsets it (glibc's default). A
# nanny also writes its variables into its own process's os.environ, where later workers would inherit them: unset
# there too before a cluster starts, unless the user had set it
NANNY_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
USER_MALLOC_TRIM = os.environ.get("MALLOC_TRIM_THRESHOLD_")   # the user's own setting (kept), if any
DASK_MALLOC_TRIM = "65536"   # Dask's value; a worker that finds it (a hand-started `dask worker`) undoes it in-process


def undo_dask_malloc_trim():
    """In a worker process started with Dask's MALLOC_TRIM_THRESHOLD_ (a `dask worker` started by hand, whose nanny
    the study cannot configure), set glibc's thresholds to what its default would grow them to (mmap 32 MiB, trim
    64 MiB), so that large temporary arrays reuse freed memory instead of page-faulting again. Returns whether the
    process now runs with them (False elsewhere: no such variable, or no glibc)."""
    global _malloc_undone
    if _malloc_undone is None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == DASK_MALLOC_TRIM:
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:                               # not glibc (macOS, Windows): nothing to undo
            _malloc_undone = False
        else:
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's malloc.h
            done = [libc.mallopt(M_MMAP_THRESHOLD, 32 << 20), libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)]
            _malloc_undone = done == [1, 1]   # mallopt returns 1 on success
    return bool(_malloc_undone)


_malloc_undone = None   # undo_dask_malloc_trim's result in this process, once it acted


class ClusterError(RuntimeError):
    """No cluster as asked (Dask missing, no scheduler at the address)."""


def gpu_count():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_client(scheduler=None, workers=None, threads=None, dashboard=DASHBOARD, verbose=0):
    """(client, cluster): a Client of the cluster at `scheduler` (cluster None: not ours to close), or of a cluster
    started here: one worker per GPU (dask_cuda), else `workers` CPU worker processes of `threads` threads."""
    try:
        import dask
        from distributed import Client
    except ImportError:
        raise ClusterError("evaluations side by side need Dask distributed: pip install dask distributed") from None
    if scheduler is not None:
        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT), None
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"no Dask scheduler answered at {scheduler} ({e}); start one with `dask scheduler` "
                               f"and workers with `dask worker {scheduler}`, or drop --scheduler to start a local "
                               f"cluster") from None
    n_gpu = gpu_count()
    kw = dict(dashboard_address=dashboard if dashboard else None,
              silence_logs=logging.WARNING if verbose > 1 else logging.ERROR)
    if USER_MALLOC_TRIM is None:   # a Dask nanny started earlier in this process left Dask's value in os.environ
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set(NANNY_ENVIRON):
        return _local_client(n_gpu, workers, threads, kw, verbose)


def _local_client(n_gpu, workers, threads, kw, verbose):
    from distributed import Client, LocalCluster
    if n_gpu:
        try:
            from dask_cuda import LocalCUDACluster
            cluster = LocalCUDACluster(threads_per_worker=threads or GPU_THREADS, **kw)
        except ImportError:
            if verbose:
                print(f"{n_gpu} GPUs but no dask_cuda: one worker on the first GPU (pip install dask-cuda for one "
                      f"worker per GPU)", flush=True)
            cluster = LocalCluster(n_workers=1, threads_per_worker=threads or GPU_THREADS, processes=True, **kw)
    else:
        n = workers or CPU_WORKERS or min(4, os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=n, threads_per_worker=threads or CPU_THREADS, processes=True, **kw)
    client = Client(cluster)
    if verbose:
        print(f"Dask cluster: {len(client.nthreads())} workers, {slots(client)} evaluations at once; dashboard "
              f"{client.dashboard_link}", flush=True)
    return client, cluster


def slots(client):
    """Evaluations the cluster runs at once (its worker threads), at least 1."""
    return max(1, sum(client.nthreads().values()))


def connect(cluster, verbose=0):
    """(client, cluster to close or None) for a study's `cluster` setting: None (no client: evaluate in the study's
    process), "local" (start_client()), a scheduler address "tcp://host:8786", or a distributed.Client."""
    if cluster is None:
        return None, None
    if isinstance(cluster, str):
        return start_client(None if cluster == "local" else cluster, verbose=verbose)
    if hasattr(cluster, "submit") and hasattr(cluster, "nthreads"):
        return cluster, None
    raise ValueError(f"cluster={cluster!r}: use None, 'local', a scheduler address 'tcp://host:8786' or a "
                     f"distributed.Client")


# ----------------------------------------------------------------------------------------------------------------
# a round's jobs as evaluation groups


def structure_key(model, kw):
    """Jobs with the same key train together: for a kind that trains as a population (the compartmental network)
    the hyperparameters its members share (utils.kinds: Kind.shared), None for the others (each evaluation alone)."""
    return get_kind(model).group_key(kw)


def groups(model, jobs, evaluate=None):
    """The round's jobs [(iteration, kw), ...] as evaluation groups: candidates of one structure together for a kind
    that trains as a population, every other job alone (and every job alone under a test's fake `evaluate`)."""
    if evaluate is not None or get_kind(model).population is None:
        return [[job] for job in jobs]
    by_key = {}
    for it, kw in jobs:
        by_key.setdefault(structure_key(model, kw), []).append((it, kw))
    return list(by_key.values())


# ----------------------------------------------------------------------------------------------------------------
# one group of evaluations (runs in the study process or on a worker)

_ON_DEVICE = {}   # (token, device) -> the dataset on this process's device, moved once


def _device_data(token, data, device):
    dev = get_device(device)
    key = (token, str(dev))
    if key not in _ON_DEVICE:
        _ON_DEVICE.clear()  # one study's data at a time
        X, y = data
        _ON_DEVICE[key] = (X.to(dev), y.to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return _ON_DEVICE[key], dev


def evaluate_group(jobs, data, ctx, evaluate=None):
    """Evaluate the jobs [(iteration, kw), ...] of one group; returns [(iteration, result), ...] with result the dict
    of utils.evaluation.run_evaluation. ctx: model, folds, seed, chance, device, token (names the data). Without
    `evaluate` (a test's fake objective, called once per job), each job is make_classifier + cross-validation, and
    a compartmental group of several jobs trains as one population (its members alone again if it fails)."""
    undo_dask_malloc_trim()
    (X, y), dev = _device_data(ctx["token"], data, ctx["device"])
    stream = torch.cuda.stream(torch.cuda.Stream(dev)) if dev.type == "cuda" else contextlib.nullcontext()
    with stream:
        if evaluate is None and len(jobs) > 1:
            out = _population(jobs, X, y, ctx, dev)
        else:
            out = [(it, _alone(kw, X, y, ctx, dev, evaluate)) for it, kw in jobs]
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
    return out


def _alone(kw, X, y, ctx, dev, evaluate=None):
    if evaluate is None:
        def evaluate(hp):
            return cross_validate(make_classifier(ctx["model"], **hp), X, y, folds=ctx["folds"], seed=ctx["seed"])
    return run_evaluation(evaluate, kw, ctx["chance"], dev)


def _population(jobs, X, y, ctx, dev):
    """One fit_population over every job's folds; a failure of the whole (one member diverged, or the population
    does not fit in memory) falls back to each job alone, so that one member never fails the others."""

    def evaluate(_):
        scores = cross_validate_many([make_classifier(ctx["model"], **kw) for _, kw in jobs], X, y,
                                     folds=ctx["folds"], seed=ctx["seed"])
        return np.asarray(scores, dtype=float).ravel()

    res = run_evaluation(evaluate, None, ctx["chance"], dev)
    if res["status"] != "ok":
        return [(it, _alone(kw, X, y, ctx, dev)) for it, kw in jobs]
    per_job = np.asarray(res["fold_scores"]).reshape(len(jobs), ctx["folds"])
    share = round(res["time_s"] / len(jobs), 3)
    return [(it, dict(res, fold_scores=[float(s) for s in row], target=float(np.mean(row)), time_s=share,
                      population=len(jobs)))
            for (it, _), row in zip(jobs, per_job)]


# ----------------------------------------------------------------------------------------------------------------
# executors: run groups, yield (group, results) as each finishes


class Local:
    """Groups one after the other in this process."""

    def __init__(self, data, ctx, evaluate=None):
        self.data, self.ctx, self.evaluate = data, ctx, evaluate

    def run(self, groups):
        for g in groups:
            yield g, evaluate_group(g, self.data, self.ctx, self.evaluate)

    def call(self, fn, *args):
        return fn(*args)

    def close(self):
        pass


class Distributed:
    """Groups as tasks on a Dask cluster; the data is scattered to every worker once."""

    def __init__(self, client, data, ctx, evaluate=None):
        self.client, self.ctx, self.evaluate = client, ctx, evaluate
        self.data = tuple(t.cpu() for t in data)
        self._scatter()

    def _scatter(self):
        self.remote = self.client.scatter([self.data], broadcast=True, hash=False)[0]

    def _submit(self, g):
        return self.client.submit(evaluate_group, g, self.remote, self.ctx, self.evaluate, pure=False)

    def run(self, groups):
        from distributed import as_completed
        from distributed.scheduler import KilledWorker
        futures = {self._submit(g): (i, 0) for i, g in enumerate(groups)}
        pending = as_completed(list(futures))
        for fut in pending:
            i, tries = futures.pop(fut)
            try:
                result = fut.result()
            except (KilledWorker, CancelledError) as e:
                if tries >= RESUBMITS:
                    yield groups[i], [(it, _killed(e, self.ctx["chance"])) for it, _ in groups[i]]
                    continue
                if self.remote.status != "finished":  # every copy of the data went down with its workers
                    self._scatter()
                new = self._submit(groups[i])
                futures[new] = (i, tries + 1)
                pending.add(new)
                continue
            yield groups[i], result

    def call(self, fn, *args):
        """fn(*args) on a worker; pairs of tensors among the args (data) are scattered first."""
        args = [self.client.scatter([tuple(t.cpu() for t in a)], hash=False)[0] if _is_data(a) else a for a in args]
        return self.client.submit(fn, *args, pure=False).result()

    def close(self):
        self.client.cancel(self.remote)


def _is_data(a):
    return isinstance(a, tuple) and len(a) > 0 and all(isinstance(t, torch.Tensor) for t in a)


def _killed(e, chance):
    return dict(status="killed", fold_scores=None, target=chance, reason=f"{type(e).__name__}: the evaluation "
                f"killed its worker {RESUBMITS + 1} times ({e})", time_s=0.0, peak_mem_mb=None, mem_kind=None)
