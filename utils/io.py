"""Small file helpers every module uses: atomic writes, JSON that is always valid JSON, library versions and the
provenance a committed result carries (commit, versions, machine, command).

An interrupted write never leaves a half-written file: everything goes to a temporary file beside the target,
is flushed and fsync'ed, then `os.replace`d over it. JSON here never contains bare NaN or Infinity (they become
the strings "nan", "inf", "-inf"); numpy and torch values become plain numbers or lists.
"""
import contextlib
import importlib.metadata as md
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: file_lock locks nothing
    fcntl = None


def jsonable(obj):
    """`obj` as plain JSON values: tuples -> lists, numpy/torch scalars -> numbers, non-finite floats -> strings,
    small tensors and arrays -> lists, types -> their dotted name, anything else -> str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, str) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist()) if obj.numel() <= 100 else f"tensor{tuple(obj.shape)}"
    if isinstance(obj, type):
        return obj.__name__ if obj.__module__ == "builtins" else f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def dumps(obj, **kw):
    """json.dumps of jsonable(obj): strict JSON (allow_nan=False cannot fail on it)."""
    return json.dumps(jsonable(obj), allow_nan=False, **kw)


def write_bytes(path, data):
    """Replace `path` by `data` atomically (temp file beside it, fsync, os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj, indent=2):
    """Write obj as strict JSON to `path`, atomically."""
    write_bytes(path, dumps(obj, indent=indent).encode("utf-8"))


def write_jsonl(path, records):
    """Replace `path` by one JSON line per record, atomically."""
    write_bytes(path, "".join(dumps(r) + "\n" for r in records).encode("utf-8"))


def append_jsonl(path, *records):
    """Append records, one JSON line each, in one write, flushed and fsync'ed before returning."""
    text = "".join(dumps(r) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_json(path):
    """The JSON in `path`; ValueError naming the file and the place when it is no valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        json_error = isinstance(e, json.JSONDecodeError)
        where = f" at line {e.lineno} column {e.colno} ({e.msg})" if json_error else f" ({e.reason})"
        raise ValueError(f"{path} is damaged: no valid JSON{where}; restore it, or move it (or its folder) away to "
                         f"start afresh") from None


def writable_folder(folder, refusal=None):
    """Create `folder` when missing and prove it writable by creating and removing a probe file in it; returns it.
    When it cannot be (a read-only folder, a file on the path): OSError (the system's, naming the path), or, given
    `refusal`, the exception refusal(why) returns, `why` naming the problem ("F is a file, not a folder", or the
    system's reason)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    except OSError as e:
        if refusal is None:
            raise
        file = next((q for q in (folder, *folder.parents) if q.exists() and not q.is_dir()), None)
        raise refusal(f"{file} is a file, not a folder" if file else e.strerror or str(e)) from None
    os.close(fd)
    os.unlink(probe)
    return folder


@contextlib.contextmanager
def file_lock(path, refusal):
    """Hold an exclusive lock (flock) on the file `path` while the block runs, writing its holder (pid, host, start)
    into it; when another process holds it, raise refusal(holder text). The kernel drops the lock when its process
    ends, however it ends, so a killed run never blocks the next. (No lock where fcntl is missing: Windows.)"""
    if fcntl is None:
        yield
        return
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        raise refusal(holder) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def save_torch(obj, path):
    """torch.save to `path` atomically (temp file, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def library_versions(device=None):
    """Versions of the libraries a run depends on, plus the device it ran on (and the GPU's name)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "skorch", "scikit-learn", "bayesian-optimization", "numpy", "pandas"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    dev = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out["device"] = dev
    if dev.startswith("cuda") and torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    return out


def git_commit(cwd=None):
    """(commit hash, True when the work tree has uncommitted changes to tracked files); (None, None) outside git."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return head.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def machine():
    """The machine a run ran on: processor, core count, memory, and the GPU's name when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        out["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def provenance(argv=None, device=None):
    """What a committed result must carry besides its configuration: the commit (and whether the tree was
    dirty), library versions, the machine, the command that reproduces it and when it started."""
    commit, dirty = git_commit()
    argv = sys.argv if argv is None else argv
    command = "python " + " ".join(shlex.quote(a) for a in argv) if argv else None
    return {"commit": commit, "dirty": dirty, "versions": library_versions(device), "machine": machine(),
            "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
