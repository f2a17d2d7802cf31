"""Checkpoints of a run: written atomically, holding only tensors and plain containers.

A checkpoint is `torch.save` of a dict of tensors, numbers, strings, lists and dicts, so that it
loads with `torch.load(weights_only=True)`: nothing is unpickled as code. Writing goes to a temp
file in the same folder, is flushed to disk, then `os.replace`d over the target, so a run killed
at any moment leaves either the old checkpoint or the new one, never half of one.

The run folder keeps `checkpoints/last.pt` (written every `checkpoint_every` steps and at the
end; what a rerun resumes from) and `checkpoints/best.pt` (lowest held-out loss so far).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_format.errors import CheckpointError

LAST = "last.pt"
BEST = "best.pt"
#: A staged run's record of its stages and their folders (train/stages.py writes it).
STAGES_FILE = "stages.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` to `path` through a temp file and `os.replace` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; a missing or unreadable file is a
    CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint",
            hint="give the path of a run's checkpoints/last.pt or best.pt",
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})",
            hint="the file is damaged or was not written by dune-train; delete it to start over",
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(payload).__name__}")
    return payload


def rng_state() -> dict[str, Any]:
    """Every random generator a step can touch, as tensors and plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _plain(random.getstate()),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """Tuples -> lists recursively (the weights-only unpickler accepts both; lists are explicit)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def latest_stage_dir(run_dir: str | Path) -> Path:
    """The folder holding a run's latest checkpoints: the last stage that has a `last.pt` for
    a staged run (what `dune-train export RUN` should read), the run folder itself otherwise."""
    run = Path(run_dir)
    record = run / STAGES_FILE
    if not record.is_file():
        return run
    dirs = [Path(s["dir"]) for s in json.loads(record.read_text())["stages"]]
    # A moved run folder: the stage folders keep their names under run/stages/.
    dirs = [d if d.is_dir() else run / "stages" / d.name for d in dirs]
    started = [d for d in dirs if (checkpoint_dir(d) / LAST).is_file()]
    return started[-1] if started else run
