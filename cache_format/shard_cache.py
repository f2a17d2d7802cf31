"""A local, byte-bounded disk cache of a remote cache's token shard files (LRU), shared by the
processes of one node.

Training from an object store reads each token shard file many times (every sample is a ranged
request of tens of milliseconds). `CachedFiles` puts a local folder in front of the remote
store: the first read of a shard file fetches the whole object in one request into the folder
(streamed to disk in chunks: a fill never holds the object in memory), and every read after
that is a positional read of the local copy. Every DataLoader worker of a node opens the same
folder, so a shard fetched by one is local for all.

All state is on disk, nothing is held only in one process's memory:
- a shard's local copy is `<dir>/<namespace>/<store key>`; `namespace` is a hash of the remote
  cache's location and manifest checksum, so two caches (or a rebuild) never share copies;
- a fill writes a temporary file and renames it into place (`os.replace`, atomic on POSIX), so
  a reader never sees a half-written copy; concurrent fills of one shard are serialized by a
  lock (an in-process lock, then `fcntl.lockf` on one of 256 lock files chosen by the key's
  hash, across processes): the second filler finds the copy there and fetches nothing;
- recency is the file's mtime, touched at most once a second per process and shard. The
  folder's bytes are a counter in a small file (`.locks/usage`, 8 bytes, updated under a file
  lock): a fill adds its size before renaming its copy into place. Only when the counter passes
  `max_bytes` does the process that wins the eviction lock list the folder, unlink the oldest
  copies until it holds at most `max_bytes` (the copy just filled is kept) and set the counter
  to what the listing found. So a fill costs a few syscalls, not a walk of the folder (a node's
  share of DUNE's mix is about 10^5 shard files), and the count cannot drift for long: a fill
  that dies after counting over-counts, which only brings the next listing earlier;
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
from dataclasses import dataclass

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
#: The folder's byte counter, in the locks folder (so that no listing counts it).
_USAGE = "usage"


class _ProcessLocks:
    """The in-process locks of one shard cache folder: one per key stripe, one for eviction."""

    def __init__(self) -> None:
        self.stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self.evicting = threading.Lock()


#: Every folder's locks in this process (cleared in a forked child: see the module's end).
_PROCESS_LOCKS: dict[str, _ProcessLocks] = {}


def cache_namespace(location: str, manifest_sha: str | None) -> str:
    """The subfolder of a remote cache's copies: a hash of its location and manifest checksum
    (a rebuild at the same URL has a new manifest, hence new copies)."""
    text = f"{location.rstrip('/')}\0{manifest_sha or ''}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class DiskShardCache:
    """The on-disk LRU folder (see the module docstring). `fill(key, fetch)` makes the local copy
    of `key` exist; `fetch(path)` writes the object to a temporary file and returns its bytes,
    or None when it does not exist."""

    def __init__(self, directory: str, max_bytes: int, namespace: str) -> None:
        if max_bytes < 1:
            raise ConfigError(f"shard_cache_bytes: expected >= 1 byte, found {max_bytes}",
                              hint="give the local shard cache a size, e.g. 50% of the disk")
        self.directory = os.path.abspath(directory)
        self.root = os.path.join(self.directory, namespace)
        self.max_bytes = int(max_bytes)
        os.makedirs(os.path.join(self.root, _LOCKS), exist_ok=True)
        self._touched: dict[str, float] = {}

    @property
    def _locks(self) -> _ProcessLocks:
        # One set per folder and process, shared by every instance on the folder: file locks
        # are per process, so two instances with locks of their own would not exclude each
        # other (the reader's token copies and the sample index's view rows share a folder).
        locks = _PROCESS_LOCKS.get(self.root)
        if locks is None:
            locks = _PROCESS_LOCKS.setdefault(self.root, _ProcessLocks())
        return locks

    def reinit_after_fork(self) -> None:
        """Fresh in-process locks (a lock held by another thread at fork time stays held in
        the child; the fork hook drops every folder's set); file locks are per process and are
        not inherited."""
        _PROCESS_LOCKS.pop(self.root, None)

    def path(self, key: str) -> str:
        """The local copy's path."""
        return os.path.join(self.root, key)

    def _stripe(self, key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=2).digest()) % _LOCK_STRIPES

    def _locked(self, key: str, work: Callable[[], object]) -> object:
        """Run `work` holding the key's lock in this process and across processes."""
        stripe = self._stripe(key)
        with self._locks.stripes[stripe]:
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

    def fill(self, key: str, fetch: Callable[[str], int | None]) -> bool:
        """Make the local copy of `key` exist (fetching it once across all processes); False when
        the remote object does not exist. `fetch(path)` writes the object to the local file
        `path` (a temporary file of this folder) and returns its bytes, or None when it does not
        exist: streamed to disk, so a fill never holds the object in memory."""
        if self.touch(key):
            return True
        path = self.path(key)

        def fill_locked() -> bool:
            if os.path.exists(path):  # another process or thread filled it meanwhile
                return True
            tmp = os.path.join(self.root, f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
            try:
                size = fetch(tmp)
                if size is None:  # absence is never copied: the next fill asks again
                    _unlink_quietly(tmp)
                    return False
                os.makedirs(os.path.dirname(path), exist_ok=True)
                # Counted before the rename, so that a copy in place is never left uncounted.
                usage[0] = self._count(lambda n: n + size)
                os.replace(tmp, path)
            except BaseException:  # a failed fetch, a full disk, an interrupt: no temporary file
                _unlink_quietly(tmp)
                raise
            return True

        usage = [0]
        if not self._locked(key, fill_locked):
            return False
        self._touched[key] = time.monotonic()
        if usage[0] > self.max_bytes:
            self.evict(keep=path)
        return True

    def _count(self, update: Callable[[int], int]) -> int:
        """Replace the folder's byte counter by `update(counter)`, under its file lock (one
        read-modify-write across processes); returns the new count."""
        fd = os.open(os.path.join(self.root, _LOCKS, _USAGE),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 8, 0)
            count = max(0, update(int.from_bytes(raw, "little") if len(raw) == 8 else 0))
            os.pwrite(fd, count.to_bytes(8, "little"), 0)
            return count
        finally:
            os.close(fd)  # closing releases the lock

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
        evicting = self._locks.evicting
        if not evicting.acquire(blocking=False):
            return 0
        fd = os.open(os.path.join(self.root, _LOCKS, "evict"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0
            counted = self._count(lambda n: n)
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
            # What the listing found, plus what fills counted while it ran (a copy renamed in
            # meanwhile may be in both: an over-count, which only brings the next listing on).
            self._count(lambda n: total - freed + n - counted)
            return freed
        finally:
            os.close(fd)
            evicting.release()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class ShardCacheSpec:
    """Where the local copies of one remote cache's objects go: the node's folder, its bound in
    bytes and the cache's namespace (`cache_namespace`). Picklable: a worker that unpickles a
    sample index opens the same folder."""

    directory: str
    max_bytes: int
    namespace: str

    def files(self, remote: FsspecFiles, max_open: int = MAX_OPEN_COPIES) -> CachedFiles:
        """`remote` read through this folder."""
        return CachedFiles(remote, DiskShardCache(self.directory, self.max_bytes,
                                                  self.namespace), max_open=max_open)


class CachedFiles:
    """The `Files` of a remote cache's token shards, read through a `DiskShardCache`: each
    shard object is fetched whole (one request streamed to disk, retried like every remote
    read: `FsspecFiles.copy_to`) and then read locally. `discard(key)` drops a damaged copy
    (the reader asks after a checksum mismatch)."""

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
        return self.cache.fill(key, lambda tmp: self.remote.copy_to(key, tmp))

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
        """Fresh locks and store client in a forked child (a DataLoader worker)."""
        self.remote.reinit_after_fork()
        self.local.reinit_after_fork()
        self.cache.reinit_after_fork()

    def close(self) -> None:
        """Close the cached fds of local copies."""
        self.local.close()


os.register_at_fork(after_in_child=_PROCESS_LOCKS.clear)
