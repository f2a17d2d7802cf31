"""What a dask worker keeps between build units: its device, torch's settings, its teacher.

Each worker keeps the teacher it last used (one teacher on the device at a time; loading
another releases it), so that consecutive units of one teacher load it once. The build's driver
runs `release_teachers` on every worker at the end of a build (precompute/cluster.py).
"""

from __future__ import annotations

import gc
import threading

import torch

from precompute.teachers.config import TeacherConfig
from precompute.teachers.loaded import LoadedTeacher, load_teacher

_LOCK = threading.Lock()
_TEACHERS: dict[str, tuple[TeacherConfig, str, LoadedTeacher]] = {}


def _worker_id() -> tuple[str, int]:
    """(name, ordinal) of the dask worker running this code; ("local", 0) outside dask."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return "local", 0
    return str(name), name if isinstance(name, int) else 0


def worker_device(kind: str) -> torch.device:
    """This worker's device: its ordinal picks a GPU on a multi-GPU machine."""
    if kind != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", _worker_id()[1] % torch.cuda.device_count())


def setup_torch(threads: int, device: torch.device) -> None:
    """Fixed intra-op threads and deterministic kernels, so results do not depend on workers."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def acquire_teacher(cfg: TeacherConfig, device: torch.device) -> LoadedTeacher:
    """The worker's loaded teacher for `cfg`, loading it (and releasing the previous one)."""
    wid = _worker_id()[0]
    with _LOCK:
        entry = _TEACHERS.get(wid)
        if entry is not None and entry[0] == cfg and entry[1] == str(device):
            return entry[2]
        if entry is not None:
            del _TEACHERS[wid]
            del entry
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        teacher = load_teacher(cfg, device)
        _TEACHERS[wid] = (cfg, str(device), teacher)
        return teacher


def release_teachers() -> None:
    """Drop every teacher this process holds (run on workers at the end of a build)."""
    with _LOCK:
        _TEACHERS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
