"""Killing a child process at a chosen point, for the kill-and-rerun tests.

A kill test starts a build or a fit as a subprocess, waits until it reaches a point worth
interrupting (a done mark on disk, a logged step), sends SIGKILL there, and then checks that
rerunning the same command finishes with what an uninterrupted run gives. `sigkill_when` is that
wait-and-kill; `sigkill_fit_after_step` is its use by the training tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from train.metrics import read_metrics

T = TypeVar("T")


def sigkill_when(proc: subprocess.Popen, reached: Callable[[], T], *, timeout: float,
                 session: bool = False, poll_s: float = 0.02) -> T | None:
    """Call `reached()` every `poll_s` seconds while `proc` runs; once it returns a true value,
    SIGKILL `proc` (with `session`, its whole session: a process started with
    `start_new_session=True` and its children, such as dask workers) and wait for it to end.

    Returns what `reached` returned, or None when `proc` ended first or `timeout` seconds
    passed (the caller's assertion says which point was never reached). The process never
    outlives the call: it is killed on a timeout, and on an error in `reached` too.
    """
    deadline = time.monotonic() + timeout
    found: T | None = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = reached()
            if found:
                break
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            if session:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return found or None


def sigkill_fit_after_step(command: Sequence[str], run_dir: Path, step: int, *,
                           cwd: Path, env: Mapping[str, str], timeout: float) -> int:
    """Start `dune-train fit` (`command`), SIGKILL it once `run_dir`'s metrics log a training
    step >= `step`, and return the last step it logged. Fails the test, with the run's
    stderr, when the run ends (or `timeout` passes) before that."""
    proc = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def logged_step() -> int:
        logged = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
        return logged[-1] if logged and logged[-1] >= step else 0

    killed_at = sigkill_when(proc, logged_step, timeout=timeout)
    assert proc.stderr is not None
    with proc.stderr:
        assert killed_at, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
    return killed_at
