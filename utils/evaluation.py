"""Cross-validation, and one evaluation of a study: the cross-validated accuracy of one configuration (or the test accuracy of the
retrained best), its wall time and peak memory, with the failures that score chance caught.

run_evaluation runs in the study's process or on a Dask worker (utils.cluster); so does retrain_task.

A training that diverges (utils.errors.TrainingDiverged), runs out of memory (CUDA or CPU), or is refused by the
estimator's validation (ValueError) scores chance accuracy, 1 / n_classes, with status "diverged", "oom" or
"error" and the reason; so does one whose task killed Dask workers again and again ("killed"); it is registered,
counts as an iteration, and the loop goes on. Any other exception is a bug and stops the study (resume it after the
fix). A worker that dies loses only its running evaluations: Dask runs them again elsewhere.
"""
import contextlib
import gc
import math
import resource
import sys
import time

import numpy as np
import torch
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from utils.classifiers import make_classifier
from utils.data import get_device
from utils.errors import TrainingDiverged
from utils.kinds import get_kind, kind_of


def cross_validate(estimator, X, y, folds=3, seed=0):
    """Per-fold test accuracies (numpy array) of a fresh clone of `estimator` under StratifiedKFold(folds)."""
    return cross_validate_many([estimator], X, y, folds=folds, seed=seed)[0]


def cross_validate_many(estimators, X, y, folds=3, seed=0):
    """Per-fold test accuracies (estimators x folds array) of fresh clones of each estimator on the same
    StratifiedKFold(folds) splits. Estimators of a kind that trains as a population (utils.kinds: the compartmental
    network's fit_population; they must share its structure) train side by side with their folds."""
    y_np = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = []
    for train_idx, test_idx in splitter.split(np.zeros(len(y_np)), y_np):
        to = (lambda i: torch.as_tensor(i, device=X.device)) if isinstance(X, torch.Tensor) else (lambda i: i)
        splits.append((to(train_idx), to(test_idx)))
    pairs = [(clone(est), tr, te) for est in estimators for tr, te in splits]
    kinds = {kind_of(est, strict=False) for est in estimators}   # one kind that trains as a population, or each alone
    population = kinds.pop().population if len(kinds) == 1 and None not in kinds else None
    if population is not None:
        population([m for m, _, _ in pairs], [(X[tr], y[tr]) for _, tr, _ in pairs])
    else:
        for model, tr, _ in pairs:
            model.fit(X[tr], y[tr])
    scores = [float(model.score(X[te], y[te])) for model, _, te in pairs]
    return np.array(scores).reshape(len(estimators), folds)


OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")  # torch's CUDA and CPU wording
RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, in KiB on Linux


@contextlib.contextmanager
def peak_memory(device=None):
    """Measure the block's peak memory; yields a dict that holds, after the block, peak_mem_mb (MiB, one decimal) and
    mem_kind, the log's keys:

    - on a CUDA device, "cuda_max_allocated": torch.cuda.max_memory_allocated after reset_peak_memory_stats at
      entry, the peak of the tensors of the device, whoever allocated them (evaluations running at once on one GPU,
      utils.cluster.GPU_THREADS, share it);
    - elsewhere, "cpu_maxrss": resource.getrusage(RUSAGE_SELF).ru_maxrss at exit, the process's peak resident set
      size over its whole life so far (data, Python, torch, everything before this block included). It never
      decreases: an evaluation that needed less than an earlier one in the same process records the earlier peak,
      so read it as an upper bound of what the evaluation needed."""
    dev = torch.device(device) if device is not None else None
    cuda = dev is not None and dev.type == "cuda"
    record = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        yield record
    finally:
        if cuda:
            peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT, "cpu_maxrss"
        record.update(peak_mem_mb=round(peak / 2**20, 1), mem_kind=kind)


def run_evaluation(evaluate, hp, chance, device=None):
    """evaluate(hp) -> per-fold scores, with failures caught: a dict(status, fold_scores, target, reason, time_s,
    peak_mem_mb, mem_kind). Diverged, out-of-memory and ValueError runs score `chance`; other exceptions propagate."""
    status, scores, reason = "ok", None, None
    t0 = time.perf_counter()
    with peak_memory(device) as mem:
        try:
            scores = [float(s) for s in np.asarray(evaluate(hp), dtype=float).ravel()]
            if not scores or not all(math.isfinite(s) for s in scores):
                status, reason, scores = "error", f"the objective returned {scores}", None
        except TrainingDiverged as e:
            status, reason = "diverged", str(e)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            status, reason = "oom", f"{type(e).__name__}: {e}"
        except RuntimeError as e:
            if not any(m in str(e).lower() for m in OOM_MESSAGES):
                raise
            status, reason = "oom", str(e)
        except ValueError as e:
            status, reason = "error", f"ValueError: {e}"
    if status == "oom":
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return dict(status=status, fold_scores=scores, target=float(np.mean(scores)) if status == "ok" else chance,
                reason=reason, time_s=round(time.perf_counter() - t0, 3), **mem)


def seed_kw(accepts, seed):
    """The estimator's seed argument (every kind calls it seed)."""
    return {"seed": seed} if "seed" in accepts else {}


def estimator_accepts(model):
    """The keyword names make_classifier(model) accepts beyond the searched ones (seed, device, verbose...)."""
    return get_kind(model).accepts()


def retrain_task(model, kw, train, test, chance, device):
    """Fit make_classifier(model, **kw) on `train`, score it on `test` (run_evaluation's dict); on a worker or here."""
    dev = get_device(device)
    (X, y), (Xt, yt) = [tuple(t.to(dev) for t in pair) for pair in (train, test)]

    def fit_and_score(hp):
        clf = make_classifier(model, **hp)
        clf.fit(X, y)
        return [clf.score(Xt, yt)]

    return run_evaluation(fit_and_score, kw, chance, dev)
