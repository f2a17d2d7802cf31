"""Byte access to the files of a cache: local files (positional reads, cached fds) or fsspec."""

from __future__ import annotations

import errno
import inspect
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cache_format.errors import RemoteReadError
from cache_format.locations import local_path

T = TypeVar("T")


class LocalFiles:
    """Positional reads from files under a local root, with a bounded cache of open fds.

    Looking an fd up takes no lock (a random read must stay cheap); instead a batch brackets its
    reads with `begin()` / `end(token)`, and an fd evicted from the cache is closed only once
    every batch that began before the eviction has ended. So an fd is never closed (and its
    number reused for another file) while a reader thread still holds it.
    """

    def __init__(self, root: str, max_open: int = 256) -> None:
        if max_open < 0:
            raise ValueError(f"max_open: expected >= 0, found {max_open}")
        self.root = root
        self._max_open = max_open
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}  # insertion order = eviction order
        self._active: dict[int, None] = {}  # tokens of the batches in flight
        self._tokens = itertools.count()
        self._retired: list[tuple[int, int]] = []  # (fd, first token that cannot hold it)
        # Closes what is still open when the object is dropped without close() (it must not
        # hold `self`: it closes over the two containers, which are only ever mutated).
        weakref.finalize(self, _close_all, self._fds, self._retired)

    def describe(self, key: str) -> str:
        """The file path of `key`, for messages."""
        return os.path.join(self.root, key)

    def begin(self) -> int:
        """Start a batch of reads; pass the token to `end` when the batch is done."""
        token = next(self._tokens)  # atomic under the GIL, like the dict store below
        self._active[token] = None
        return token

    def end(self, token: int) -> None:
        """End a batch: fds it may still hold can be closed now."""
        del self._active[token]
        if self._retired:
            with self._lock:
                self._close_retired()

    def fd(self, key: str) -> int | None:
        """An fd for `key` (None when the file does not exist), valid until the current batch
        ends. Call only between `begin()` and `end()`."""
        fd = self._fds.get(key)
        return fd if fd is not None else self._open(key)

    def preadv(self, key: str, buffers: list[Any], offset: int) -> int:
        """`os.preadv` of file `key` at `offset` into `buffers`: the bytes read, or -1 when the
        file does not exist. `begin`, `fd` and `end` in one call, for the one-sample read
        (fastread.ShardReader.read_records), whose few microseconds of Python count."""
        token = next(self._tokens)
        self._active[token] = None
        try:
            fd = self._fds.get(key)
            if fd is None:
                fd = self._open(key)
                if fd is None:
                    return -1
            return os.preadv(fd, buffers, offset)
        finally:
            del self._active[token]
            if self._retired:
                with self._lock:
                    self._close_retired()

    def _open(self, key: str) -> int | None:
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                return fd
            try:
                fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
            except FileNotFoundError:
                return None
            self._fds[key] = fd
            if len(self._fds) > self._max_open:
                evicted = []
                while len(self._fds) > self._max_open:
                    evicted.append(self._fds.pop(next(iter(self._fds))))
                # Taken after the eviction: a batch with this token or a later one began after
                # the fds left the cache, so it cannot hold them.
                horizon = next(self._tokens)
                self._retired.extend((old, horizon) for old in evicted)
                self._close_retired()
            return fd

    def forget(self, key: str) -> None:
        """Stop using the cached fd of `key` (its file was replaced): the next read opens the
        file again; the old fd is closed once no batch in flight can hold it."""
        with self._lock:
            fd = self._fds.pop(key, None)
            if fd is not None:
                self._retired.append((fd, next(self._tokens)))
                self._close_retired()

    def _close_retired(self) -> None:
        """Close retired fds that no batch in flight can hold (call with the lock held)."""
        active = list(self._active)  # one C call: a consistent snapshot under the GIL
        oldest = min(active) if active else None
        keep = []
        for fd, horizon in self._retired:
            if oldest is None or oldest >= horizon:
                os.close(fd)
            else:
                keep.append((fd, horizon))
        self._retired[:] = keep

    def exists(self, key: str) -> bool:
        """Whether the file `key` exists (one stat, no fd opened)."""
        return os.path.isfile(os.path.join(self.root, key))

    def tail(self, key: str, nbytes: int) -> tuple[bytes, int] | None:
        """The last `nbytes` bytes of `key` and its size, or None when it does not exist."""
        token = self.begin()
        try:
            fd = self.fd(key)
            if fd is None:
                return None
            size = os.fstat(fd).st_size
            return os.pread(fd, nbytes, max(0, size - nbytes)), size
        finally:
            self.end(token)

    def read(self, key: str, start: int, nbytes: int) -> bytes | None:
        """`nbytes` bytes of `key` from `start` (fewer at end of file; None when missing)."""
        token = self.begin()
        try:
            fd = self.fd(key)
            return None if fd is None else os.pread(fd, nbytes, start)
        finally:
            self.end(token)

    def read_all(self, key: str) -> bytes | None:
        """The whole of `key` (None when it does not exist)."""
        token = self.begin()
        try:
            fd = self.fd(key)
            return None if fd is None else os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            self.end(token)

    def reinit_after_fork(self) -> None:
        """A forked child has only the forking thread: no batch of another thread is in flight.
        Inherited fds stay valid for positional reads."""
        self._lock = threading.Lock()
        self._active.clear()
        self._close_retired()

    def close(self) -> None:
        """Close every cached fd."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for fd, _ in self._retired:
                os.close(fd)
            self._retired.clear()


def _close_all(fds: dict[str, int], retired: list[tuple[int, int]]) -> None:
    """Close every fd of a LocalFiles that was dropped without close()."""
    for fd in [*fds.values(), *(fd for fd, _ in retired)]:
        try:
            os.close(fd)
        except OSError:  # already closed
            pass
    fds.clear()
    retired.clear()


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed or timed-out object-store request is retried: `attempts` in all, waiting
    `first_delay_s`, then twice as long each time, at most `max_delay_s`. The defaults ride out
    a few seconds of throttling (HTTP 503 SlowDown) or a dropped connection; a request that
    still fails is an outage, reported with the object's name."""

    attempts: int = 5
    first_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError(f"RetryPolicy: expected attempts >= 1 and 0 <= first_delay_s <= "
                             f"max_delay_s, found {self}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 = the first retry)."""
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** retry)


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """`call()`, retried under `policy` when it raises OSError (timeouts included; botocore
    and aiohttp failures reach us as OSError through s3fs). A missing object
    (FileNotFoundError) is an answer, not a failure: it is raised at once."""
    for attempt in range(policy.attempts):
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as exc:
            last = exc
            if attempt + 1 < policy.attempts:
                time.sleep(policy.delay(attempt))
    raise RemoteReadError(
        f"{what}: the request failed {policy.attempts} time(s); last error: "
        f"{type(last).__name__}: {last}",
        hint="check the endpoint and credentials (fsspec configuration) and the network; "
             "a rerun resumes where this one stopped",
    ) from last


class FsspecFiles:
    """Byte-range reads through an fsspec filesystem (object stores, http, memory, ...).

    Every request is retried with backoff (`RetryPolicy`); after the last retry the error
    names the object."""

    def __init__(self, fs: Any, root: str, retry: RetryPolicy = RetryPolicy()) -> None:
        self._fs = (os.getpid(), fs)
        self.root = root.rstrip("/")
        self.retry = retry

    @property
    def fs(self) -> Any:
        """The filesystem, made anew on first use in a forked child: asynchronous ones (s3fs,
        gcsfs) refuse to run in another process (fsspec's instance cache is per process, so
        the child's is its own). Made on use, not in a fork hook: a hook that starts the
        child's IO thread leaves it unusable."""
        pid, fs = self._fs
        if pid != os.getpid():
            fs = type(fs)(*fs.storage_args, **fs.storage_options)
            self._fs = (os.getpid(), fs)
        return fs

    def describe(self, key: str) -> str:
        """The URL-ish path of `key`, for messages."""
        return f"{self.root}/{key}"

    def _call(self, key: str, call: Callable[[], T]) -> T:
        return with_retries(call, self.describe(key), self.retry)

    def exists(self, key: str) -> bool:
        """Whether the object `key` exists (one size request)."""
        return self.tail(key, 0) is not None

    def tail(self, key: str, nbytes: int) -> tuple[bytes, int] | None:
        """The last `nbytes` bytes of `key` and its size, or None when it does not exist."""
        path = f"{self.root}/{key}"
        try:
            size = int(self._call(key, lambda: self.fs.size(path)))
        except FileNotFoundError:
            return None
        start = max(0, size - nbytes)
        if start == size:  # nothing to read (an existence and size check): an empty range is
            return b"", size  # refused by object stores (HTTP 416), so no request is made
        return self._call(key, lambda: self.fs.cat_file(path, start=start, end=size)), size

    def read(self, key: str, start: int, nbytes: int) -> bytes | None:
        """`nbytes` bytes of `key` from `start` (None when the object does not exist)."""
        path = f"{self.root}/{key}"
        try:
            return self._call(key, lambda: self.fs.cat_file(path, start=start,
                                                            end=start + nbytes))
        except FileNotFoundError:
            return None

    def read_all(self, key: str) -> bytes | None:
        """The whole object `key` in one request (None when it does not exist)."""
        path = f"{self.root}/{key}"

        def whole() -> bytes:
            # An open range from 0: without a range, s3fs asks for the size first (a second
            # request) to split large objects into parallel parts. An empty object refuses
            # any range (HTTP 416, EINVAL here): then it is asked for without one.
            try:
                return self.fs.cat_file(path, start=0)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                return self.fs.cat_file(path)

        try:
            return self._call(key, whole)
        except FileNotFoundError:
            return None

    def copy_to(self, key: str, local_path: str) -> int | None:
        """Copy the object `key` into the local file `local_path` (created or replaced; the
        caller owns it, also when this fails) and return its bytes, or None when the object
        does not exist. One request, streamed: the filesystem's `get_file` writes the body in
        chunks as it arrives (s3fs 64 KiB, fsspec's generic copy `fs.blocksize`), so a process
        holds a chunk, never the object (a shard object can be hundreds of MB). Retried like
        every request; each attempt rewrites the file from byte 0, so a retry after a partial
        copy never leaves a mixed file."""
        from fsspec.asyn import AsyncFileSystem

        path = f"{self.root}/{key}"
        fs = self.fs

        def attempt() -> None:
            with open(local_path, "wb") as out:  # truncated: the attempt starts at byte 0
                if isinstance(fs, AsyncFileSystem):  # s3fs, gcsfs, http: one GET streamed
                    fs.get_file(path, local_path, **_one_request(fs))  # to a path they open
                else:  # the generic copy, given a path, first asks if `path` is a folder
                    fs.get_file(path, out)

        open(local_path, "wb").close()  # a missing local folder fails here, not as "no object"
        try:
            self._call(key, attempt)
        except FileNotFoundError:
            return None
        return os.path.getsize(local_path)

    def reinit_after_fork(self) -> None:
        """Nothing to do now: the child makes its filesystem on first use (`fs`)."""

    def close(self) -> None:
        """Nothing to close."""


def _one_request(fs: Any) -> dict[str, Any]:
    """`get_file` options that keep a copy to one request: s3fs splits an object larger than
    its block size (50 MB) into parallel ranged GETs after a first GET (up to `max_concurrency`
    parts in memory at once) unless asked for one part at a time."""
    get_file = getattr(fs, "_get_file", None)
    if get_file is not None and "max_concurrency" in inspect.signature(get_file).parameters:
        return {"max_concurrency": 1}
    return {}


def read_store_options(location: str, storage_options: dict[str, Any] | None
                       ) -> dict[str, Any] | None:
    """The storage options of a read-only zarr store at `location`: zarr reads a metadata
    document or chunk without a range, and s3fs then asks for the object's size first (a HEAD,
    a second round trip per object) to split large objects into parallel parts; with one part
    at a time it sends the GET alone (a missing object is still a 404: FileNotFoundError).
    Local paths and filesystems without `max_concurrency` keep the options as given."""
    if local_path(location) is not None:
        return storage_options
    import fsspec

    protocol = fsspec.core.split_protocol(location)[0]
    fs_class = fsspec.get_filesystem_class(protocol)
    if "max_concurrency" not in inspect.signature(fs_class.__init__).parameters:
        return storage_options
    return {**(storage_options or {}), "max_concurrency": 1}


Files = LocalFiles | FsspecFiles


def files_for(location: str, storage_options: dict[str, Any] | None = None, *,
              max_open: int = 256) -> Files:
    """LocalFiles for a local path (or file:// URL), FsspecFiles for any other URL.

    `max_open`: local fds kept open for reuse (0 = close each file after its read: for the
    many small per-shard objects that are each read about once)."""
    local = local_path(location)
    if local is not None:
        return LocalFiles(local, max_open=max_open)
    import fsspec

    fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
    return FsspecFiles(fs, root)


def tree_nbytes(location: str, prefix: str = "") -> int:
    """Bytes of every file under `location`/`prefix` (0 for URLs or a missing folder)."""
    return tree_sizes(location, [prefix])[prefix]


def tree_sizes(location: str, prefixes: Sequence[str]) -> dict[str, int]:
    """Bytes of every file under `location`/`prefix` for each prefix ("" = everything), in one
    walk of the shortest common folder: one stat per file however many prefixes are asked
    (zeros for URLs or missing folders)."""
    sizes = dict.fromkeys(prefixes, 0)
    local = local_path(location)
    if local is None or not prefixes:
        return sizes
    parts = {p: tuple(x for x in p.split("/") if x) for p in prefixes}
    common = os.path.commonprefix(list(parts.values()))
    top = os.path.join(local, *common)
    if not os.path.isdir(top):
        return sizes
    for root, _, names in os.walk(top):
        here = tuple(x for x in os.path.relpath(root, local).split(os.sep) if x not in ("", "."))
        total = sum(os.path.getsize(os.path.join(root, name)) for name in names)
        for prefix, want in parts.items():
            if here[: len(want)] == want:
                sizes[prefix] += total
    return sizes
