"""One build at a time on a cache: a lock file beside it, naming its holder.

Two builds writing one cache race on its manifest and shards. `build_lock(cache)` creates
`<cache>.build-lock` atomically (O_CREAT | O_EXCL) holding the holder's host, pid, start time
and command; a second build is refused with a `CacheLockedError` that names the holder. The
lock sits beside the cache, not inside it, so that it is never part of what `verify` reads.

Stale locks (a holder killed with SIGKILL, a machine that went down) are taken over:
- same host: the holder's pid no longer runs;
- any host: the lease ran out. The holder touches the file every `LEASE_REFRESH_S` seconds from
  a daemon thread, so a lock untouched for `LEASE_S` seconds has no live holder.

Only the driver (the `dune-cache build` process) holds the lock. Dask workers on other machines
write shards on the driver's behalf and take no lock: they hold it through the driver, which
holds it until every unit it submitted has finished or been cancelled. Reading a cache never
needs the lock. A cache at a non-local URL (an object store) gets no lock file: say so, and run
one build at a time there yourself.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cache_format.errors import DuneError
from cache_format.locations import local_path

LEASE_S = 600.0  # a lock untouched this long has no live holder
LEASE_REFRESH_S = 30.0

_held: set[str] = set()  # lock paths this process holds (build_cache re-enters)


class CacheLockedError(DuneError, BlockingIOError):
    """Another build holds the cache's lock."""


def lock_path(cache: str) -> str | None:
    """Where `cache`'s build lock lives; None for a cache at a non-local URL."""
    local = local_path(cache)
    return None if local is None else local.rstrip(os.sep) + ".build-lock"


def _read_holder(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or garbage: judged by its age alone


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, under another user
    return True


def stale_reason(path: str, holder: dict[str, Any]) -> str:
    """Why the lock at `path` held by `holder` has no live holder; "" when it may be live."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "gone"
    if age > LEASE_S:
        return f"its lease ran out ({age:.0f} s without a refresh)"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if not _pid_runs(pid):
            return f"process {pid} on this host no longer runs"
    return ""


def describe_holder(holder: dict[str, Any]) -> str:
    """`pid 123 on host h since 2026-01-01 12:00:00 UTC (dune-cache build ...)`."""
    since = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
            if isinstance(since, int | float) else "an unknown time")
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}{command}"


def _create(path: str) -> bool:
    """Create the lock file with our holder record; False when it exists."""
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "command": " ".join(os.path.basename(a) if i == 0 else a
                                  for i, a in enumerate(sys.argv))[:200]}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return True


def _acquire(path: str, cache: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for _ in range(3):  # lost races with another taker retry
        if _create(path):
            return
        holder = _read_holder(path)
        if holder is None:
            continue  # released between our two looks
        reason = stale_reason(path, holder)
        if not reason:
            raise CacheLockedError(
                f"{cache}: another build holds the cache: {describe_holder(holder)}",
                hint=f"wait for it to finish (rerun then to resume); if that build is gone for "
                     f"good, delete {path}",
            )
        try:  # a stale lock: take it over
            os.unlink(path)
        except FileNotFoundError:
            pass
    raise CacheLockedError(f"{cache}: could not take the build lock {path} (other builds keep "
                           "taking it)", hint="run one build at a time on a cache")


@contextmanager
def build_lock(cache: str) -> Iterator[str | None]:
    """Hold `cache`'s build lock for the block (re-entrant in one process); yields its path.

    Raises CacheLockedError, naming the holder, when a live build holds it.
    """
    path = lock_path(cache)
    if path is None:
        yield None
        return
    if path in _held:  # this process holds it already (the CLI, then build_cache)
        yield path
        return
    _acquire(path, cache)
    _held.add(path)
    done = threading.Event()

    def refresh() -> None:  # the lease: a live holder keeps the file fresh
        while not done.wait(LEASE_REFRESH_S):
            try:
                os.utime(path)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return

    thread = threading.Thread(target=refresh, name="dune-build-lock", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        _held.discard(path)
        holder = _read_holder(path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == \
                socket.gethostname():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
