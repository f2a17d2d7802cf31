"""Source images by URL: dataset roots, list files and HDF5 files on any fsspec filesystem.

A dataset root (`folder`, `list`), a `list_file` or an HDF5 file may be a local path or an
fsspec URL (`s3://bucket/images`, `gs://...`). The sources of precompute/sources.py ask here
for the few operations they need, so that a local path keeps its plain os / open() path and a
URL goes through fsspec with the endpoint and credentials of fsspec's own configuration
(docs/cache-format.md, "Remote caches"). Failures keep their builtin kinds (OSError,
FileNotFoundError), so the sources' bad-image handling is the same for both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

from cache_format.locations import local_path


def _fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path inside it."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def join(root: str, key: str) -> str:
    """`key` (a POSIX relative path) under `root`, a local path or a URL."""
    if local_path(root) is not None and not root.startswith("file://"):
        return os.path.join(root, key)
    return f"{root.rstrip('/')}/{key}"


def _is(location: str, local_test: Callable[[str], bool], fs_test: str) -> bool:
    """`local_test` of a local path, else the fsspec filesystem's method named `fs_test`."""
    local = local_path(location)
    if local is not None:
        return local_test(local)
    fs, path = _fs(location)
    return bool(getattr(fs, fs_test)(path))


def is_file(location: str) -> bool:
    """Whether a file (or object) is at `location`."""
    return _is(location, os.path.isfile, "isfile")


def is_dir(location: str) -> bool:
    """Whether a folder (or a non-empty prefix of an object store) is at `location`."""
    return _is(location, os.path.isdir, "isdir")


def read_bytes(location: str) -> bytes:
    """The whole file at `location` (OSError subclasses on failure, as for a local file)."""
    local = local_path(location)
    if local is not None:
        with open(local, "rb") as f:
            return f.read()
    fs, path = _fs(location)
    return fs.cat_file(path)


def open_binary(location: str) -> IO[bytes]:
    """A seekable binary file object of `location` (for h5py, which reads by ranges)."""
    local = local_path(location)
    if local is not None:
        return open(local, "rb")
    fs, path = _fs(location)
    return fs.open(path, "rb")


def list_files(root: str) -> list[tuple[str, str]]:
    """Every file under the URL `root`, as (folder relative to root, file name) pairs."""
    fs, path = _fs(root)
    path = path.rstrip("/")
    out = []
    for found in fs.find(path):
        rel = found[len(path) + 1:] if found.startswith(path + "/") else found
        folder, _, name = rel.rpartition("/")
        out.append((folder or ".", name))
    return out


def open_hdf5(location: str) -> Any:
    """An h5py.File of a local HDF5 file or of one at a URL (read by ranges through fsspec)."""
    import h5py

    local = local_path(location)
    return h5py.File(local if local is not None else open_binary(location), "r")
