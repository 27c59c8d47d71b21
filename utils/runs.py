"""Saved training runs and their tables: what `TrainingLogger.save` writes, read back and combined.

    from utils.runs import load_run, concat_runs, curves, weights, angles
    config, df = load_run("runs/mlp-mnist-s0")                        # config.json, records.csv
    table = concat_runs(["runs/mlp-mnist-s0", "runs/cnn-mnist-s0"])   # + model, dataset, seed columns
    table = concat_runs([log_mlp, log_cnn])                           # the same from the loggers in memory
    curves(table), weights(table), angles(table)                     # one row per record / weight rows / angle rows

A run folder holds config.json (the run's configuration, the logger's settings and the library versions; strict
JSON) and records.csv, the logger's long table: one row per record and weight matrix, with the record's columns
(RECORD_COLUMNS) repeated; angle rows carry `layer` = the hidden layer's name ("hidden1", ...) and `bp_angle`, their
weight columns NaN (LAYER_COLUMNS). Each table function takes such a frame or anything with a `to_frame()` method
(a TrainingLogger).
"""
from pathlib import Path

import pandas as pd

from utils.io import read_json, write_bytes, write_json

RECORD_COLUMNS = ["record", "epoch", "examples_seen", "wall_time", "train_time", "logger_time",
                  "train_loss", "train_acc", "valid_loss", "valid_acc"]
LAYER_COLUMNS = ["layer", "norm", "change_norm", "rel_change", "bp_angle"]


def records_frame(records, run="run"):
    """The long table of a logger's records (`TrainingLogger.records_`): one row per record x weight matrix and one
    per record x hidden layer with a backprop angle (a record with neither: one row, layer columns NaN)."""
    nan = float("nan")
    rows = []
    for r in records:
        base = {"run": run, **{c: r[c] for c in RECORD_COLUMNS}}
        for layer, (norm, change, rel) in r["layers"].items():
            rows.append({**base, "layer": layer, "norm": norm, "change_norm": change, "rel_change": rel,
                         "bp_angle": nan})
        for layer, angle in r["bp_angle"].items():
            rows.append({**base, "layer": layer, "norm": nan, "change_norm": nan, "rel_change": nan,
                         "bp_angle": float(angle)})
        if not r["layers"] and not r["bp_angle"]:
            rows.append({**base, **{c: nan for c in LAYER_COLUMNS}})
    return pd.DataFrame(rows, columns=["run"] + RECORD_COLUMNS + LAYER_COLUMNS)


def save_run(run_dir, records, config):
    """Write run_dir/config.json (`config`, strict JSON) and run_dir/records.csv (the `records` frame), each
    atomically; the folder is created. Returns the run directory as a Path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config)
    write_bytes(run_dir / "records.csv", records.to_csv(index=False).encode("utf-8"))
    return run_dir


def load_run(run_dir):
    """(config dict, records DataFrame) of a run saved by `save_run` (`TrainingLogger.save`)."""
    run_dir = Path(run_dir)
    cfg_path, rec_path = run_dir / "config.json", run_dir / "records.csv"
    if not cfg_path.exists() or not rec_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a saved run (needs config.json and records.csv)")
    config = read_json(cfg_path)
    df = pd.read_csv(rec_path, dtype={"run": str, "layer": str})
    return config, df


def _run_dirs(run_dirs):
    root = Path(run_dirs)
    if (root / "config.json").exists():
        return [root]
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if not found:
        raise FileNotFoundError(f"no saved run in {root} or its sub-folders")
    return found


def _runs(runs):
    """(config, frame, default run name) of each run: folders read from disk; a logger's frame with the config
    its `save` wrote (`config_`; none when it was never saved); a frame as it is, without a config."""
    if isinstance(runs, (str, Path)):
        runs = _run_dirs(runs)
    elif isinstance(runs, pd.DataFrame) or hasattr(runs, "to_frame"):
        runs = [runs]
    for run in runs:
        if isinstance(run, (str, Path)):
            yield (*load_run(run), Path(run).name)
        else:
            yield getattr(run, "config_", {}), as_frame(run).copy(), None


def concat_runs(runs, columns=("model", "dataset", "seed")):
    """One tidy table of several runs: their records with run + the configs' `columns` in front.

    `runs`: a list of run folders, or one folder (a run, or a parent whose sub-folders are runs), read from disk;
    or TrainingLoggers in memory (saved ones: the same table as from their folders) and frames (a column they
    already have is kept), also mixed in one list. The model column falls back to the config's "kind" when it has
    no "model".
    """
    frames = []
    for config, df, default in _runs(runs):
        if "run" in config or default is not None:
            df["run"] = str(config.get("run", default))
        for i, c in enumerate(columns):
            if c in df.columns:
                continue
            v = config.get(c)
            if v is None and c == "model":
                v = config.get("kind")
            df.insert(1 + i, c, v)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["run", *columns] + RECORD_COLUMNS + LAYER_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def as_frame(log):
    """The long table of a log: a DataFrame as it is, else `log.to_frame()` (a TrainingLogger)."""
    if isinstance(log, pd.DataFrame):
        return log
    if callable(getattr(log, "to_frame", None)):
        return log.to_frame()
    raise TypeError(f"expected a TrainingLogger or a DataFrame, got {type(log).__name__}")


def curves(log):
    """One row per run and record: the learning-curve columns (drops the per-layer columns)."""
    df = as_frame(log)
    keep = [c for c in df.columns if c not in LAYER_COLUMNS]
    key = [c for c in ("run", "record") if c in df.columns]
    return df[keep].drop_duplicates(subset=key or None).reset_index(drop=True)


def weights(log):
    """The weight rows (norm, change_norm, rel_change per layer and record)."""
    df = as_frame(log)
    return df[df["norm"].notna()].drop(columns=["bp_angle"]).reset_index(drop=True)


def angles(log):
    """The backprop-angle rows (bp_angle per hidden layer and record)."""
    df = as_frame(log)
    return df[df["bp_angle"].notna()].drop(columns=["norm", "change_norm", "rel_change"]).reset_index(drop=True)
