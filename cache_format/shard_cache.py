"""A local, byte-bounded disk cache of a remote cache's token shard files (LRU), shared by the
processes of one node.

Training from an object store reads each token shard file many times (every sample is a ranged
request of tens of milliseconds). `CachedFiles` puts a local folder in front of the remote
store: the first read of a shard file fetches the whole object in one request into the folder,
and every read after that is a positional read of the local copy. Every DataLoader worker of a
node opens the same folder, so a shard fetched by one is local for all.

All state is on disk, nothing is held only in one process's memory:
- a shard's local copy is `<dir>/<namespace>/<store key>`; `namespace` is a hash of the remote
  cache's location and manifest checksum, so two caches (or a rebuild) never share copies;
- a fill writes a temporary file and renames it into place (`os.replace`, atomic on POSIX), so
  a reader never sees a half-written copy; concurrent fills of one shard are serialized by a
  lock (an in-process lock, then `fcntl.lockf` on one of 256 lock files chosen by the key's
  hash, across processes): the second filler finds the copy there and fetches nothing;
- recency is the file's mtime, touched at most once a second per process and shard; after a
  fill, the process that wins the eviction lock lists the folder and unlinks the oldest copies
  until the folder holds at most `max_bytes` (the copy just filled is kept). Nothing counts
  bytes in memory, so no count drifts between processes;
- eviction unlinks a file that another process may be reading: on POSIX an open file survives
  its unlink (the reader keeps its fd and reads the old bytes; the space is freed when the last
  fd closes: each process keeps at most `MAX_OPEN_COPIES` copies open, so the disk may hold
  that many evicted copies per process beyond the bound), and a reader that finds the file
  gone fetches it again.

A damaged local copy (a truncated or corrupted file: a crash before the data reached the disk,
a bad disk) is found by the checksums the reader verifies anyway (the shard index's and every
chunk's crc32c, fastread.py): the reader calls `discard(key)` and reads again, which fetches a
fresh copy; damage that the fresh copy still has is the remote object's, and is reported.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable

from cache_format.errors import ConfigError
from cache_format.files import FsspecFiles, LocalFiles

#: Lock files the keys are spread over (a lock per shard would leave one file per shard).
_LOCK_STRIPES = 256
#: A process touches a copy's mtime at most this often (seconds): LRU order to the second.
_TOUCH_EVERY_S = 1.0
#: Temporary files older than this (seconds) belong to a fill that died; eviction removes them.
_STALE_TMP_S = 600.0
_TMP_PREFIX = ".tmp-"
#: Local copies a process keeps open for reuse. An evicted copy that is still open keeps its
#: disk space until its fd closes, so this bounds what a process may hold beyond the cache's
#: bound (a window of shards per teacher is what a worker reads at a time).
MAX_OPEN_COPIES = 64
_LOCKS = ".locks"


def cache_namespace(location: str, manifest_sha: str | None) -> str:
    """The subfolder of a remote cache's copies: a hash of its location and manifest checksum
    (a rebuild at the same URL has a new manifest, hence new copies)."""
    text = f"{location.rstrip('/')}\0{manifest_sha or ''}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class DiskShardCache:
    """The on-disk LRU folder (see the module docstring). `fill(key, fetch)` makes the local copy
    of `key` exist; `fetch()` returns the object's bytes, or None when it does not exist."""

    def __init__(self, directory: str, max_bytes: int, namespace: str) -> None:
        if max_bytes < 1:
            raise ConfigError(f"shard_cache_bytes: expected >= 1 byte, found {max_bytes}",
                              hint="give the local shard cache a size, e.g. 50% of the disk")
        self.directory = os.path.abspath(directory)
        self.root = os.path.join(self.directory, namespace)
        self.max_bytes = int(max_bytes)
        os.makedirs(os.path.join(self.root, _LOCKS), exist_ok=True)
        self._touched: dict[str, float] = {}
        self.reinit_after_fork()

    def reinit_after_fork(self) -> None:
        """Fresh in-process locks (a lock held by another thread at fork time stays held in
        the child); file locks are per process and are not inherited."""
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._evicting = threading.Lock()

    def path(self, key: str) -> str:
        """The local copy's path."""
        return os.path.join(self.root, key)

    def _stripe(self, key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=2).digest()) % _LOCK_STRIPES

    def _locked(self, key: str, work: Callable[[], object]) -> object:
        """Run `work` holding the key's lock in this process and across processes."""
        stripe = self._stripe(key)
        with self._stripes[stripe]:
            fd = os.open(os.path.join(self.root, _LOCKS, f"{stripe:03d}"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                return work()
            finally:
                os.close(fd)  # closing releases the lock

    def touch(self, key: str) -> bool:
        """Mark the copy recently used; False when there is no local copy."""
        now = time.monotonic()
        if now - self._touched.get(key, -_TOUCH_EVERY_S) < _TOUCH_EVERY_S:
            return True
        try:
            os.utime(self.path(key))
        except FileNotFoundError:
            self._touched.pop(key, None)
            return False
        self._touched[key] = now
        return True

    def fill(self, key: str, fetch: Callable[[], bytes | None]) -> bool:
        """Make the local copy of `key` exist (fetching it once across all processes); False when
        the remote object does not exist."""
        if self.touch(key):
            return True
        path = self.path(key)

        def fill_locked() -> bool:
            if os.path.exists(path):  # another process or thread filled it meanwhile
                return True
            data = fetch()
            if data is None:
                return False
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(self.root, f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            except BaseException:  # a full disk, an interrupt: leave no temporary file
                _unlink_quietly(tmp)
                raise
            return True

        if not self._locked(key, fill_locked):
            return False
        self._touched[key] = time.monotonic()
        self.evict(keep=path)
        return True

    def discard(self, key: str) -> None:
        """Remove the local copy of `key` (it was found damaged): the next fill fetches it."""
        self._touched.pop(key, None)

        def unlink() -> None:
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass

        self._locked(key, unlink)

    def usage(self) -> int:
        """Bytes of the local copies (and of unfinished fills) in this cache's folder."""
        return sum(size for _, _, size in self._entries(remove_stale=False))

    def _entries(self, remove_stale: bool) -> list[tuple[float, str, int]]:
        """(mtime, path, bytes) of every copy and temporary file (stale temporaries removed)."""
        found = []
        now = time.time()
        for folder, dirs, names in os.walk(self.root):
            if folder == self.root and _LOCKS in dirs:
                dirs.remove(_LOCKS)
            for name in names:
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                if remove_stale and name.startswith(_TMP_PREFIX) and \
                        now - st.st_mtime > _STALE_TMP_S:
                    _unlink_quietly(path)
                    continue
                found.append((st.st_mtime, path, st.st_size))
        return found

    def evict(self, keep: str = "") -> int:
        """Unlink the least recently used copies until the folder holds at most `max_bytes`
        (never `keep`); returns the bytes freed. A process that finds another evicting skips
        (that one brings the folder under the bound; a copy renamed into place after its scan
        is counted by the next fill's pass, so the bound may be passed by a few shards in
        between)."""
        if not self._evicting.acquire(blocking=False):
            return 0
        fd = os.open(os.path.join(self.root, _LOCKS, "evict"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0
            entries = self._entries(remove_stale=True)
            total = sum(size for _, _, size in entries)
            freed = 0
            for _, path, size in sorted(entries):
                if total - freed <= self.max_bytes:
                    break
                if path == keep or os.path.basename(path).startswith(_TMP_PREFIX):
                    continue
                _unlink_quietly(path)
                freed += size
            return freed
        finally:
            os.close(fd)
            self._evicting.release()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class CachedFiles:
    """The `Files` of a remote cache's token shards, read through a `DiskShardCache`: each
    shard object is fetched whole (one request, retried like every remote read) and then read
    locally. `discard(key)` drops a damaged copy (the reader asks after a checksum mismatch)."""

    def __init__(self, remote: FsspecFiles, cache: DiskShardCache,
                 max_open: int = MAX_OPEN_COPIES) -> None:
        self.remote = remote
        self.cache = cache
        self.local = LocalFiles(cache.root, max_open=max_open)

    def describe(self, key: str) -> str:
        """The remote object's name (the local copy is a copy of it)."""
        return self.remote.describe(key)

    def fill(self, key: str) -> bool:
        """Make the local copy of `key` exist (the prefetcher calls this ahead of the reads);
        False when the remote object does not exist."""
        return self.cache.fill(key, lambda: self.remote.read_all(key))

    def _local(self, key: str, read: Callable[[], object]) -> object:
        # A copy another process evicted between the fill and the open is fetched again.
        for _ in range(3):
            if not self.fill(key):
                return None
            got = read()
            if got is not None:
                return got
            self.cache._touched.pop(key, None)
        return None

    def exists(self, key: str) -> bool:
        """Whether the remote object `key` exists (a local copy answers without a request)."""
        return self.cache.touch(key) or self.remote.exists(key)

    def tail(self, key: str, nbytes: int) -> tuple[bytes, int] | None:
        """The last `nbytes` bytes of `key` and its size, or None when it does not exist (zero
        bytes: an existence and size check, asked of the store unless a copy is here: no
        fetch)."""
        if nbytes == 0 and not self.cache.touch(key):
            return self.remote.tail(key, 0)
        return self._local(key, lambda: self.local.tail(key, nbytes))  # type: ignore[return-value]

    def read(self, key: str, start: int, nbytes: int) -> bytes | None:
        """`nbytes` bytes of `key` from `start` (None when the object does not exist)."""
        return self._local(key, lambda: self.local.read(key, start, nbytes))  # type: ignore[return-value]

    def read_all(self, key: str) -> bytes | None:
        """The whole of `key` (None when it does not exist)."""
        return self._local(key, lambda: self.local.read_all(key))  # type: ignore[return-value]

    def discard(self, key: str) -> None:
        """Forget a damaged local copy: unlink it, then drop its cached fd. In this order: a
        thread that opens the copy in between must not get the damaged file's fd cached."""
        self.cache.discard(key)
        self.local.forget(key)

    def reinit_after_fork(self) -> None:
        """Fresh locks in a forked child (a DataLoader worker)."""
        self.local.reinit_after_fork()
        self.cache.reinit_after_fork()

    def close(self) -> None:
        """Close the cached fds of local copies."""
        self.local.close()
