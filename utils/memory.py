"""Refuse a run that cannot fit before it starts: the memory available and the check every estimator calls.

    from utils.memory import check_fits
    check_fits(need_bytes, "an MLP (784, 2000000, 10) at batch 100", largest="--n-hidden 120000", device=X.device)

`check_fits` raises utils.errors.InsufficientMemory naming the estimate, the memory available and the largest size
that fits (when the caller knows it), so a study scores the candidate "oom" without running it and a command line
prints one clear line instead of an allocator's traceback.
"""
import os

import torch

from utils.errors import InsufficientMemory

HEADROOM = 0.9   # a run may plan on this fraction of the memory available when it starts


def available_bytes(device=None):
    """Bytes free for a new run: the GPU's free memory on a CUDA device, else the kernel's MemAvailable (the
    physical memory when /proc/meminfo is missing)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def gib(n):
    return f"{n / 2 ** 30:.1f} GiB"


def check_fits(need, what, largest=None, device=None):
    """Raise InsufficientMemory when `need` bytes exceed HEADROOM of the memory available on `device`.

    `what` names the run ("a compartmental network (784, 200000, 10) at batch 16"); `largest`, when given, the
    largest size that fits, in the user's terms ("--batch-size 2048")."""
    avail = available_bytes(device)
    if need > HEADROOM * avail:
        hint = f"; the largest that fits: {largest}" if largest else "; choose a smaller network or batch"
        raise InsufficientMemory(f"{what} needs about {gib(need)} but {gib(avail)} is available on "
                                 f"{torch.device(device) if device is not None else 'cpu'}{hint}")
    return avail
