"""Chunk I/O of a dataset's sample index arrays: whole chunks read through `files.py` and
`plainread.py`, a few decoded ones kept in a small LRU bounded in bytes.

`IndexChunks` is the base of `sample_index.SampleIndex`, which gives the arrays their meaning
(statuses, keys, view rows); this module only knows chunks: reading one (`_read_chunk`, one
positional read and one crc32c check), through the LRU (`_chunk`), grouped by the rows a call
asks for (`_by_chunk`), or a whole array on a few threads (`_load`, `_map`). The files are
opened on first use and the locks renewed in a forked child (DataLoader workers).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cache_format import shards
from cache_format.errors import CacheCorruptionError
from cache_format.files import Files, FsspecFiles, files_for
from cache_format.plainread import ChunkCache, PlainArray, read_chunk
from cache_format.shard_cache import CachedFiles, ShardCacheSpec

#: Chunks read per call when a whole array is loaded with threads (status, `keys`, `verify`).
_THREADED_FROM = 16


#: Live indexes, given fresh locks in a forked child (see _reset_after_fork).
_INDEXES: weakref.WeakSet[IndexChunks] = weakref.WeakSet()


class IndexChunks:
    """Chunk reads of the plain arrays `_arrays` (name -> PlainArray) of the cache at
    `location` (with `storage_options`), `cache_bytes` of decoded chunks kept, `threads` for
    whole-array loads. Subclasses say which missing chunk is damage (`_chunk_required`) and how
    a damaged one is repaired (`_fix_hint`).

    With `shard_cache` (a remote cache read through a node's local shard cache), the chunks of
    the arrays named in `CACHED` (those a build never changes once written) are read through
    the same folder as the token shards: fetched whole once per node, then read locally. A
    missing object is asked of the store every time (absence is never cached), and a local copy
    whose checksum fails is dropped and fetched again."""

    #: Arrays (by name) whose chunks go through the local shard cache, when there is one.
    CACHED: tuple[str, ...] = ()

    location: str
    storage_options: dict[str, Any] | None
    cache_bytes: int
    threads: int
    shard_cache: ShardCacheSpec | None
    _arrays: dict[str, PlainArray]

    def _init_io(self) -> None:
        """No files open yet, an empty LRU, a fresh lock; renewed after a fork."""
        self._files: Files | None = None
        self._cached: CachedFiles | None = None
        self._cache = ChunkCache(self.cache_bytes)
        self._lock = threading.Lock()
        _INDEXES.add(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._cache.after_fork()
        for files in (self._files, self._cached):
            if files is not None:
                files.reinit_after_fork()

    def close(self) -> None:
        """Close the files this index opened (it reopens them if used again)."""
        with self._lock:
            opened = (self._files, self._cached)
            self._files = self._cached = None
        for files in opened:
            if files is not None:
                files.close()

    def _by_chunk(self, array: PlainArray, rows: np.ndarray
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(decoded chunk, positions in `rows`, rows within the chunk) per distinct chunk that
        `rows` touch, each chunk cached or read once."""
        per_chunk = array.rows_per_chunk
        chunks = rows // per_chunk
        if rows.size == 0:
            return
        if rows.size == 1:
            chunk = int(chunks[0])
            yield self._chunk(array, chunk), np.zeros(1, np.int64), rows - chunk * per_chunk
            return
        order = np.argsort(chunks, kind="stable")
        ordered = chunks[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=-1)).tolist()
        for start, stop in zip(starts, [*starts[1:], rows.size], strict=True):
            chunk = int(ordered[start])
            where = order[start:stop]
            yield self._chunk(array, chunk), where, rows[where] - chunk * per_chunk

    def _chunk(self, array: PlainArray, chunk: int) -> np.ndarray:
        """Decoded chunk `chunk` of `array`, through the LRU."""
        key = (array.path, chunk)
        hit = self._cache.get(key)
        if hit is None:
            hit, cost = self._read_chunk(array, chunk)
            self._cache.put(key, hit, cost)
        return hit

    def _load(self, array: PlainArray) -> np.ndarray:
        """The whole array, chunk by chunk (bypassing the LRU, so that it keeps its chunks)."""
        out = np.empty(array.shape, dtype=array.dtype)
        per_chunk, n = array.rows_per_chunk, array.shape[0]

        def fill(chunk: int) -> None:
            start, stop = shards.shard_bounds(chunk, n, per_chunk)
            out[start:stop] = self._read_chunk(array, chunk)[0][: stop - start]

        self._map(fill, list(range(array.num_chunks)))
        return out

    def _map(self, work: Any, jobs: list[Any]) -> None:
        """Run `work` on every job: on a few threads when there are many (positional reads
        and checksums release the GIL), so that loading a large status array takes seconds."""
        if self.threads == 1 or len(jobs) < _THREADED_FROM:
            for job in jobs:
                work(job)
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="dune-index-read") as pool:
            for _ in pool.map(work, jobs):
                pass

    def _files_(self) -> Files:
        files = self._files
        if files is None:
            with self._lock:
                if self._files is None:
                    # No fd kept open: the index arrays are one small file per shard (millions
                    # at scale), each read about once (decoded chunks are cached instead).
                    self._files = files_for(self.location, self.storage_options, max_open=0)
                files = self._files
        return files

    def _cached_files(self) -> CachedFiles | None:
        """The files of the `CACHED` arrays' chunks through the local shard cache (None: no
        shard cache, or a local cache)."""
        if self.shard_cache is None:
            return None
        cached = self._cached
        if cached is None:
            remote = self._files_()
            if not isinstance(remote, FsspecFiles):
                return None
            with self._lock:
                if self._cached is None:
                    # Small objects, each read about once per process (the LRU keeps them).
                    self._cached = self.shard_cache.files(remote, max_open=0)
                cached = self._cached
        return cached

    def _read_chunk(self, array: PlainArray, chunk: int) -> tuple[np.ndarray, int]:
        """Chunk `chunk` of `array` decoded (see plainread.read_chunk), not cached. A missing
        chunk that the metadata says was written is damage (`_chunk_required`)."""
        cached = self._cached_files() if array.path.rsplit("/", 1)[-1] in self.CACHED else None
        files: Files | CachedFiles = self._files_() if cached is None else cached
        hint = self._fix_hint(array, chunk)

        def required() -> bool:
            return self._chunk_required(array, chunk)

        try:
            return read_chunk(files, array, chunk, hint, required)  # type: ignore[arg-type]
        except CacheCorruptionError:
            if cached is None:
                raise
            # A damaged local copy: drop it and read a fresh one (damage the fresh copy still
            # has is the store's, and is raised).
            cached.discard(array.chunk_key(chunk))
            return read_chunk(cached, array, chunk, hint, required)  # type: ignore[arg-type]

    def _chunk_required(self, array: PlainArray, chunk: int) -> bool:
        """Whether chunk `chunk` of `array` must exist (asked only when its file is missing)."""
        raise NotImplementedError

    def _fix_hint(self, array: PlainArray, chunk: int) -> str:
        """How to repair a damaged chunk of `array` (the end of the error's hint)."""
        raise NotImplementedError


def _reset_after_fork() -> None:
    """Runs in a forked child: locks held by the parent's other threads would never be freed."""
    for index in list(_INDEXES):
        index._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
