"""The files of one study, <out>/<model>_<dataset>/, and the results read from them (utils.study writes them):

    config.json            the study's settings (space, folds, epochs, seed, subset, flip_prob, versions); checked on
                           resume (check_config); strict JSON (infinities written as the strings "inf", "-inf")
    evals.jsonl            one JSON line per finished evaluation, written and fsync'ed at once: the source of truth,
                           from which a resumed study rebuilds its optimizer (there is no other state file)
    evals.jsonl.rejected   bad lines found in evals.jsonl (not UTF-8, not JSON, keys missing), set aside on resume
    lock                   held (flock) by the process running the study: a second one on the folder is refused
    best.json              the best configuration retrained on the full training split, with its test accuracy,
                           the study's sizes and the provenance (utils.io.provenance) of the run that made it
    invocations.jsonl      one line per run of the study (a resumed one has several): provenance (commit, versions,
                           machine, command, start), wall_s, evaluations logged before and after, complete

A record of evals.jsonl: iteration, status ("ok", "diverged", "oom", "error", "killed", "invalid"), target (the
objective: mean fold accuracy, chance for failures, null for invalid), fold_scores, params (the optimizer's),
hyperparameters (make_classifier's), seed, time_s (the evaluation's wall time; a population's members share theirs),
peak_mem_mb and mem_kind (utils.evaluation.peak_memory: the CUDA tensor peak on a GPU, the process's lifetime peak
resident set size on the CPU), source (how it was proposed), rejected, reason, round and round_size (the first
iteration and the size of its round), population (candidates trained together), finished (timestamp).

load_results and summarize read the studies, also while they run (`python -m utils.study --summary`).
"""
import json
import os
import time
import warnings
from pathlib import Path

import pandas as pd

from utils.io import dumps, file_lock, read_json, write_bytes, write_jsonl
from utils.spaces import SPACES

AT_CHANCE = 1.5      # summarize's frac_chance: evaluations scoring below AT_CHANCE x chance (15 % on 10 classes)
FAILURES = ("diverged", "oom", "error", "killed")
LOG_KEYS = ("iteration", "status", "target", "params")  # a record of evals.jsonl without these is set aside


class StudyError(RuntimeError):
    """A study that cannot run as asked (folder in use, no cluster); the command line prints it without traceback."""


# ----------------------------------------------------------------------------------------------------------------
# the log


def read_log(path, repair=True, keys=LOG_KEYS):
    """The finished records of a JSON-lines log. A last line without its newline is a write cut short by a kill: it is
    dropped (and, with repair=True, cut off the file). Any other bad line (not UTF-8, not JSON, a record without
    `keys`, the LOG_KEYS of evals.jsonl) is reported by a warning naming its line number and, with repair=True, moved out of the log to
    <name>.rejected beside it, so that the study goes on from the good lines."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records, good, bad = [], [], []
    for i, line in enumerate(data[:end].splitlines(keepends=True), start=1):
        if not line.strip():
            continue
        problem = _bad_line(line, keys)
        if problem:
            bad.append((i, line, problem))
        else:
            records.append(json.loads(line))
            good.append(line)
    if bad:
        where = "; ".join(f"line {i}: {p}" for i, _, p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        note = ""
        if repair:
            aside = path.with_name(path.name + ".rejected")
            with open(aside, "ab") as f:
                f.write(b"".join(line for _, line, _ in bad))
            write_bytes(path, b"".join(good))
            note = f"; moved to {aside} (the study goes on without them)"
        warnings.warn(f"{path}: {len(bad)} bad line(s) set aside ({where}){note}", stacklevel=2)
    return records


def _bad_line(line, keys=LOG_KEYS):
    """None for a good log line (bytes), else what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e})"
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in keys if k not in record]
    return f"a record without {', '.join(missing)}" if missing else None


def load_done(log_path):
    """The log's records (cut-off and bad lines handled by read_log) and the trained evaluations by iteration."""
    records = read_log(log_path)
    if records and records[-1]["status"] == "invalid":  # its evaluation's line was cut off: redo both
        while records and records[-1]["status"] == "invalid":
            records.pop()
        write_jsonl(log_path, records)
    done = {}
    for r in records:
        if r["status"] == "invalid":
            continue
        if r["iteration"] in done:
            raise ValueError(f"{log_path} holds evaluation {r['iteration']} twice (two processes wrote it at once?); "
                             f"keep one of its lines, or move the study away")
        done[r["iteration"]] = r
    return records, done


def log_records(model, it, first, size, seed, meta, result):
    """The log lines of a finished evaluation `it` of the round (first, size): its invalid predecessor (if any) and
    its record. meta: (params, source, rejected, invalid, hyperparameters, the invalid one's hyperparameters) of its
    proposal; result: run_evaluation's."""
    params, source, rejected, invalid, hp, invalid_hp = meta
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    new = []
    if invalid is not None:  # logged with the evaluation that replaced it (one write: both lines or none)
        new.append(dict(iteration=it, status="invalid", target=None, fold_scores=None, params=invalid[0],
                        hyperparameters=invalid_hp, seed=None, time_s=0.0,
                        peak_mem_mb=None, mem_kind=None, source="bo", rejected=0, reason=invalid[1], round=first,
                        round_size=size, finished=stamp))
    new.append(dict(iteration=it, status=result["status"], target=result["target"],
                    fold_scores=result["fold_scores"], params=params, hyperparameters=hp, seed=seed + it,
                    time_s=result["time_s"], peak_mem_mb=result["peak_mem_mb"], mem_kind=result["mem_kind"],
                    source=source, rejected=rejected, reason=result["reason"], round=first, round_size=size,
                    population=result.get("population", 1), finished=stamp))
    return new


def best_record(records):
    """The best trained evaluation (the first of equal scores), None when none trained."""
    ok = [r for r in records if r["status"] == "ok"]
    return max(ok, key=lambda r: r["target"]) if ok else None


# ----------------------------------------------------------------------------------------------------------------
# the folder: settings and lock


def check_config(study_dir, config):
    """Refuse to mix settings: an existing study must have been made with the same settings (config.json), and a
    folder with evaluations but no config.json has unknown settings."""
    config_path, log_path = study_dir / "config.json", study_dir / "evals.jsonl"
    if not config_path.exists():
        if log_path.exists() and log_path.stat().st_size > 0:
            raise ValueError(f"{study_dir} holds evaluations but no config.json, so the settings they were made with "
                             f"are unknown; move {study_dir} away or use another --out")
        return
    old = read_json(config_path)
    new = json.loads(dumps(config))
    diff = {k: (old.get(k), v) for k, v in new.items()
            if old.get(k) != v and (k in old or v is not None)}  # keys newer than the study: only if set
    if diff:
        raise ValueError(f"{study_dir} holds a study with other settings {diff} (old, new); use another --out "
                         f"or move it away")


def study_lock(study_dir):
    """Hold an exclusive lock on the study folder (its file `lock`, utils.io.file_lock) while the block runs; a second
    process on the same folder is refused with a StudyError naming the holder; a dead one's lock is gone."""
    return file_lock(Path(study_dir) / "lock", lambda holder: StudyError(
        f"{study_dir} is in use by another study ({holder}); two processes on one study would write every "
        f"evaluation twice. Wait for it to finish or stop it, or use another --out"))


# ----------------------------------------------------------------------------------------------------------------
# results


def _study_dirs(path):
    path = Path(path)
    if (path / "evals.jsonl").exists():
        return [path]
    return sorted(p.parent for p in path.glob("*/evals.jsonl"))


def load_results(out_dir):
    """Every logged evaluation under `out_dir` (a folder of studies, or one study folder) as a DataFrame: model,
    dataset, iteration, status, target (the objective; chance for failures and invalid proposals), fold_scores, time_s,
    peak_mem_mb, seed, source, reason, params, hyperparameters, test_acc (of the retrained best; NaN if none),
    n_classes (from config.json), wall_s (the study's wall time over all its runs, invocations.jsonl), and round,
    round_size, population where the log has them. Readable while the
    study runs (nothing is written; a bad line is skipped with a warning)."""
    rows = []
    for d in _study_dirs(out_dir):
        config = read_json(d / "config.json") if (d / "config.json").exists() else {}
        model, dataset = config.get("model"), config.get("dataset")
        if model is None:
            model, _, dataset = d.name.partition("_")
        best = json.loads((d / "best.json").read_text()) if (d / "best.json").exists() else {}
        records = read_log(d / "evals.jsonl", repair=False)
        stale = best.get("n_evals") != sum(r["status"] != "invalid" for r in records)
        test_acc = float("nan") if stale or best.get("test_acc") is None else best["test_acc"]
        wall = sum(float(i.get("wall_s", 0)) for i in read_log(d / "invocations.jsonl", repair=False,
                                                                                keys=("wall_s",)))
        rows += [{"model": model, "dataset": dataset, **r, "test_acc": test_acc,
                  "n_classes": config.get("n_classes", float("nan")), "wall_s": wall} for r in records]
    columns = ["model", "dataset", "iteration", "status", "target", "fold_scores", "time_s", "peak_mem_mb", "seed",
               "source", "reason", "params", "hyperparameters", "test_acc", "n_classes", "wall_s"]
    df = pd.DataFrame(rows)
    return df.reindex(columns=columns + [c for c in df.columns if c not in columns])


def summarize(results, include_failures=True):
    """The study table, one row per (model, dataset): best, worst, mean, std (ddof=1) of the cross-validated accuracy
    over the trained evaluations (failures count at chance unless include_failures=False; invalid proposals never
    count), n_evals, n_failed, n_invalid, frac_chance (the fraction of trained evaluations, failures included, that
    scored below AT_CHANCE x chance: networks that did not learn), best_params (hyperparameters of the best) and
    test_acc (the best retrained on the full training split; NaN when not retrained) and wall_s (the study's wall
    time, all its runs; NaN when unknown). `results`: a folder (see load_results) or its DataFrame."""
    df = results if isinstance(results, pd.DataFrame) else load_results(results)
    columns = ["model", "dataset", "best", "worst", "mean", "std", "n_evals", "n_failed", "n_invalid", "frac_chance",
               "best_params", "test_acc", "wall_s"]
    rows = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        scored = g[g.status == "ok"] if not include_failures else g[g.status != "invalid"]
        ok = g[g.status == "ok"]
        best_row = ok.loc[ok.target.idxmax()] if len(ok) else None
        trained = g[g.status != "invalid"]
        n_classes = g.n_classes.iloc[0] if "n_classes" in g else float("nan")
        frac_chance = (float((trained.target < AT_CHANCE / n_classes).mean()) if len(trained) and n_classes > 0
                       else float("nan"))
        rows.append(dict(model=model, dataset=dataset, best=scored.target.max(), worst=scored.target.min(),
                         mean=scored.target.mean(), std=scored.target.std(), n_evals=int((g.status != "invalid").sum()),
                         n_failed=int(g.status.isin(FAILURES).sum()), n_invalid=int((g.status == "invalid").sum()),
                         frac_chance=frac_chance, best_params=None if best_row is None else best_row.hyperparameters,
                         test_acc=g.test_acc.iloc[0] if "test_acc" in g else float("nan"),
                         wall_s=g.wall_s.iloc[0] if "wall_s" in g else float("nan")))
    table = pd.DataFrame(rows, columns=columns)
    order = {m: i for i, m in enumerate(SPACES)}
    dorder = {d: i for i, d in enumerate(("mnist", "fashion", "cifar10"))}
    key = table.model.map(lambda m: order.get(m, 99)) * 100 + table.dataset.map(lambda d: dorder.get(d, 99))
    return table.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k").reset_index(drop=True)
