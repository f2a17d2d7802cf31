"""Byte access to the files of a cache: local files (positional reads, cached fds) or fsspec.

Also `BufferPool`, which recycles the large output arrays of batch reads.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np


class LocalFiles:
    """Positional reads from files under a local root, with a small cache of open fds.

    A batch pins the fds it uses, so an fd is never closed (and its number reused) while a
    worker thread still reads from it.
    """

    def __init__(self, root: str, max_open: int = 256) -> None:
        self.root = root
        self._max_open = max_open
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # key -> [fd, pins]

    def describe(self, key: str) -> str:
        """The file path of `key`, for messages."""
        return os.path.join(self.root, key)

    def acquire(self, key: str) -> int | None:
        """Pin and return an fd for `key` (None when the file does not exist)."""
        with self._lock:
            entry = self._fds.get(key)
            if entry is None:
                try:
                    fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
                except FileNotFoundError:
                    return None
                entry = self._fds[key] = [fd, 0]
                self._evict()
            self._fds.move_to_end(key)
            entry[1] += 1
            return entry[0]

    def acquire_many(self, keys: Sequence[str]) -> dict[str, int | None]:
        """`acquire` for several keys under one lock (a batch pins all its files at once)."""
        fds: dict[str, int | None] = {}
        with self._lock:
            for key in keys:
                entry = self._fds.get(key)
                if entry is None:
                    try:
                        fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
                    except FileNotFoundError:
                        fds[key] = None
                        continue
                    entry = self._fds[key] = [fd, 0]
                self._fds.move_to_end(key)
                entry[1] += 1
                fds[key] = entry[0]
            self._evict()
        return fds

    def release_many(self, keys: Sequence[str]) -> None:
        """`release` for several keys under one lock."""
        with self._lock:
            for key in keys:
                entry = self._fds.get(key)
                if entry is not None:
                    entry[1] -= 1
            self._evict()

    def release(self, key: str) -> None:
        """Unpin `key` (the fd stays cached until evicted)."""
        with self._lock:
            entry = self._fds.get(key)
            if entry is not None:
                entry[1] -= 1
            self._evict()

    def _evict(self) -> None:
        if len(self._fds) <= self._max_open:
            return
        for key in [k for k, (_, pins) in self._fds.items() if pins == 0]:
            if len(self._fds) <= self._max_open:
                break
            os.close(self._fds.pop(key)[0])

    def tail(self, key: str, nbytes: int) -> tuple[bytes, int] | None:
        """The last `nbytes` bytes of `key` and its size, or None when it does not exist."""
        fd = self.acquire(key)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, nbytes, max(0, size - nbytes)), size
        finally:
            self.release(key)

    def read(self, key: str, start: int, nbytes: int) -> bytes | None:
        """`nbytes` bytes of `key` from `start` (fewer at end of file; None when missing)."""
        fd = self.acquire(key)
        if fd is None:
            return None
        try:
            return os.pread(fd, nbytes, start)
        finally:
            self.release(key)

    def reinit_after_fork(self) -> None:
        """A forked child gets a fresh lock; inherited fds stay valid for positional reads."""
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close every cached fd."""
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


class FsspecFiles:
    """Byte-range reads through an fsspec filesystem (object stores, http, memory, ...)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def describe(self, key: str) -> str:
        """The URL-ish path of `key`, for messages."""
        return f"{self.root}/{key}"

    def tail(self, key: str, nbytes: int) -> tuple[bytes, int] | None:
        """The last `nbytes` bytes of `key` and its size, or None when it does not exist."""
        path = f"{self.root}/{key}"
        try:
            size = int(self.fs.size(path))
        except FileNotFoundError:
            return None
        return self.fs.cat_file(path, start=max(0, size - nbytes), end=size), size

    def read(self, key: str, start: int, nbytes: int) -> bytes | None:
        """`nbytes` bytes of `key` from `start` (None when the object does not exist)."""
        try:
            return self.fs.cat_file(f"{self.root}/{key}", start=start, end=start + nbytes)
        except FileNotFoundError:
            return None

    def reinit_after_fork(self) -> None:
        """Nothing to reset: fsspec filesystems handle forks themselves."""

    def close(self) -> None:
        """Nothing to close."""


Files = LocalFiles | FsspecFiles


def files_for(location: str, storage_options: dict[str, Any] | None = None) -> Files:
    """LocalFiles for a local path (or file:// URL), FsspecFiles for any other URL."""
    if "://" not in location or location.startswith("file://"):
        return LocalFiles(os.path.abspath(location.removeprefix("file://")))
    import fsspec

    fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
    return FsspecFiles(fs, root)


class BufferPool:
    """Recycles batch output arrays once nothing outside the pool references them.

    Fresh large arrays cost the kernel a page fault and a zero fill per page (about as much as
    copying the data in); a trainer reads batches of one shape over and over, so the pool hands
    back an array whose tensors the caller has dropped. An array still referenced anywhere
    (a tensor from torch.from_numpy, a view, a slice) has a higher refcount and is left alone.
    """

    def __init__(self, per_shape: int = 4, shapes: int = 32) -> None:
        self._per_shape = per_shape
        self._shapes = shapes
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    #: Arrays smaller than this come from np.empty: malloc reuses small blocks by itself.
    min_nbytes = 1 << 18

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized C-contiguous array of `shape` and `dtype`."""
        if math.prod(shape) * dtype.itemsize < self.min_nbytes:
            return np.empty(shape, dtype=dtype)  # malloc recycles small blocks by itself
        key = (shape, dtype.str)
        with self._lock:
            arrays = self._free.setdefault(key, [])
            for array in arrays:
                # References: the list, this loop variable and getrefcount's argument.
                if sys.getrefcount(array) == 3:
                    return array
            array = np.empty(shape, dtype=dtype)
            if len(arrays) < self._per_shape:
                arrays.append(array)
            while len(self._free) > self._shapes:
                del self._free[next(iter(self._free))]
            return array
