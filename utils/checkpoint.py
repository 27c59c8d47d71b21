"""Checkpoints: tensors in a .pt file that `torch.load(path, weights_only=True)` reads, the configuration as JSON.

    save_checkpoint(clf, "mnist_cnn")                  # models/mnist_cnn.pt and models/mnist_cnn.json
    clf = load_checkpoint("mnist_cnn", device="cpu")   # the estimator rebuilt from the JSON and the tensors
    write_checkpoint(path, clf, extra={...}); clf, meta = read_checkpoint(path)   # any path, plus a run's own state

A .pt file holds {"meta": JSON text, "tensors": dicts and lists of tensors}; nothing is pickled. meta: the estimator's
kind and hyperparameters (what make_classifier takes), what it inferred from the data, its training state that is no
tensor (skorch's history; the compartmental network's counters, classes and NumPy generator), library versions and
the caller's `config` and `extra`. Tensors: for the MLP and CNN the module's and the optimizer's state dicts and the
batch-order generator; for the compartmental network its state_dict() (weights W, b, Y, c and feedback masks, the
state carried from batch to batch, an unfinished epoch's order and position, its generators). That is all training needs to go on exactly
where it stopped. Callbacks (a TrainingLogger) and the compartmental hook are not saved. Each kind says what it
saves and how it is restored (utils.kinds: save_state, restore).
"""
import json
from pathlib import Path

import torch

from utils.data import get_device
from utils.io import dumps, library_versions, save_torch, write_json
from utils.kinds import get_kind, kind_of

FORMAT = 1          # the layout of meta and tensors; bumped when it changes


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint (empty, truncated, corrupt, or something else); names the file."""


def as_tuples(d):
    """JSON lists back to the tuples the estimators take."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def restore_device(saved, device):
    """Where a restored estimator lives: `device` when given, else where it was saved (the CPU when that was a GPU
    and there is none now)."""
    if device is not None:
        return str(get_device(device))
    if saved is not None and str(saved).startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return None if saved is None else str(saved)


# ----------------------------------------------------------------------------------------------------------------
# files


def write_checkpoint(path, estimator, config=None, extra=None):
    """Write `estimator` (fitted or not) to the .pt file `path` atomically; returns its meta (a dict)."""
    meta, tensors = kind_of(estimator).save_state(estimator)
    meta.update(format=FORMAT, config=config or {}, extra=extra or {}, versions=library_versions())
    save_torch({"meta": dumps(meta), "tensors": tensors}, path)
    return json.loads(dumps(meta))


def read_checkpoint(path, device=None):
    """(estimator, meta) from a .pt file written by write_checkpoint; `device`: where the estimator goes (None:
    where it was saved, the CPU when that was a GPU and there is none)."""
    meta, tensors = _read(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is no checkpoint of this version (format {meta.get('format')!r}, expected "
                         f"{FORMAT}); checkpoints of the old pickled format cannot be read")
    return get_kind(meta["kind"]).restore(meta, tensors, device), meta


def _read(path):
    """(meta, tensors) of the .pt file `path`; CheckpointError naming it when it is empty, truncated or corrupt."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        meta, tensors = json.loads(saved["meta"]), saved["tensors"]
        meta["kind"]
    except (FileNotFoundError, PermissionError, IsADirectoryError):   # the system's message names the file
        raise
    except Exception as e:   # torch and json fail on damaged files in many ways (EOFError, KeyError, ...)
        what = "empty" if path.stat().st_size == 0 else "truncated or corrupt, or no checkpoint of this workspace"
        raise CheckpointError(f"{path} cannot be read as a checkpoint: it is {what} ({type(e).__name__})") from None
    return meta, tensors


def checkpoint_path(name, directory="models"):
    """directory/name.pt; ValueError when the name is empty, absolute or leads out of `directory` (..)."""
    if not str(name).strip() or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"checkpoint name {str(name)!r}: give a name such as mnist_cnn; it names {directory}/NAME.pt "
                         f"and NAME.json, which must stay inside {directory}/")
    return Path(directory) / f"{name}.pt"


def save_checkpoint(estimator, name, directory="models", config=None):
    """Save `estimator` to directory/name.pt (tensors) and its configuration to directory/name.json; returns the .pt
    path. `name` must stay inside `directory` (checkpoint_path)."""
    path = checkpoint_path(name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = write_checkpoint(path, estimator, config=config)
    meta.pop("state", None)   # the history and counters stay in the .pt
    write_json(path.with_suffix(".json"), meta)
    return path


def load_checkpoint(name, directory="models", device=None):
    """The estimator saved by save_checkpoint, rebuilt from its JSON and tensors, on `device` (None: where it was
    saved, the CPU when that was a GPU and there is none)."""
    path = checkpoint_path(name, directory)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}; saved ones: "
                                f"{sorted(p.stem for p in Path(directory).glob('*.pt')) or 'none'}")
    return read_checkpoint(path, device)[0]
