"""What a dataset of the mix is (`DatasetConfig`) and how each source kind lists its images'
keys: the folder walk, the list file's checks, the HDF5 rows and keys (sources.py documents the
three kinds; this module is the listing half, sources.py the reading and decoding half).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_format.errors import ConfigError
from cache_format.locations import is_url
from cache_format.manifest import check_node_name
from cache_format.serde import PathStr, check_choice, check_types
from precompute import url_files

SOURCE_KINDS: tuple[str, ...] = ("folder", "list", "hdf5")
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm",
)  # fmt: skip

@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """One dataset of the data mix (keyword arguments only, so that no field can be swapped).

    `root`: the folder (folder, list) or the HDF5 file (hdf5). `list_file`: required for "list"
    (a path as given, relative to the working directory when not absolute). `hdf5_key`: required
    for "hdf5". `domain`: the teacher domain the images belong to (data-sharing strategies use it).
    `max_images`: keep only the first N images.
    """

    name: str
    kind: str
    root: PathStr
    domain: str
    list_file: PathStr | None = None
    hdf5_key: str | None = None
    max_images: int | None = None

    def __post_init__(self) -> None:
        check_types(self, "DatasetConfig")
        for field in ("name", "domain"):
            check_node_name(getattr(self, field), f"DatasetConfig.{field}")
        where = f"dataset {self.name!r}: DatasetConfig"
        check_choice(self.kind, SOURCE_KINDS, f"{where}.kind")
        if not self.root:
            raise ConfigError(f"{where}.root: expected a path, found {self.root!r}")
        for field, kind in (("list_file", "list"), ("hdf5_key", "hdf5")):
            value = getattr(self, field)
            if self.kind == kind and not value:
                raise ConfigError(f"{where}.{field}: required for kind {kind!r}, found {value!r}")
            if self.kind != kind and value is not None:
                raise ConfigError(
                    f"{where}.{field}: only used by kind {kind!r}, but kind is {self.kind!r} "
                    f"(remove {field})"
                )
        n = self.max_images
        if n is not None and n < 1:
            raise ConfigError(f"{where}.max_images: expected a positive int or None, found {n!r}")



def list_folder(root: str) -> list[str]:
    """Image files under root, recursively, as sorted POSIX paths relative to root."""
    if is_url(root):
        return sorted(name if folder == "." else f"{folder}/{name}"
                      for folder, name in url_files.list_files(root)
                      if is_image_name(name)
                      and (folder == "." or not any(p.startswith(".") for p in folder.split("/"))))
    keys: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if is_image_name(name):
                key = name if rel == "." else f"{rel}/{name}"
                keys.append(key.replace(os.sep, "/"))
    return sorted(keys)


def is_image_name(name: str) -> bool:
    """A file the folder kind lists: not hidden, with an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def read_list(cfg: DatasetConfig) -> list[str]:
    where = f"dataset {cfg.name!r}: list_file {cfg.list_file!r}"
    try:
        text = url_files.read_bytes(cfg.list_file).decode("utf-8")  # type: ignore[arg-type]
        lines = text.splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot be read ({exc})") from None
    keys: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key:
            continue
        if os.path.isabs(key):
            raise ConfigError(f"{where}, line {number}: {key!r} is absolute; list paths are "
                              "relative to root")
        if ".." in key.replace("\\", "/").split("/"):
            raise ConfigError(f"{where}, line {number}: {key!r} has a '..' part, so it may "
                              f"point outside root {cfg.root!r}; list paths stay inside root",
                              hint="write the path relative to root without '..', or move "
                              "root up to a folder that holds every image")
        if key in first_line:
            raise ConfigError(f"{where}, line {number}: {key!r} repeats line {first_line[key]}; "
                              "every image must be listed once")
        first_line[key] = number
        keys.append(key)
    return keys


def checked_rows(f: Any, cfg: DatasetConfig, where: str) -> Any:
    """The h5py dataset of encoded images `cfg.hdf5_key` of the open file `f`, refused unless it
    is 1-D rows of whole encoded files."""
    import h5py

    if cfg.hdf5_key not in f or not isinstance(f[cfg.hdf5_key], h5py.Dataset):
        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
        raise ConfigError(f"{where}: no dataset {cfg.hdf5_key!r} (field hdf5_key); its "
                          f"datasets are {found}")
    rows = f[cfg.hdf5_key]
    dtype = rows.dtype
    if rows.ndim != 1 or not (
        h5py.check_vlen_dtype(dtype) in (np.uint8, bytes) or dtype.kind == "V"
    ):
        raise ConfigError(
            f"{where}: dataset {cfg.hdf5_key!r} must be 1-D rows of encoded files "
            f"(variable-length uint8, bytes or opaque), found shape {rows.shape} {dtype}"
        )
    return rows


def row_number_keys(n: int, first: int, stop: int) -> list[str]:
    """Keys of rows [first, stop) of an HDF5 file of `n` rows without a keys dataset: the
    zero-padded row numbers (at least 9 digits)."""
    width = max(9, len(str(n - 1)))
    return [f"{i:0{width}d}" for i in range(first, stop)]


def hdf5_keys(cfg: DatasetConfig) -> list[str]:
    where = f"dataset {cfg.name!r}: hdf5 file {cfg.root!r}"
    try:
        with url_files.open_hdf5(cfg.root) as f:
            n = checked_rows(f, cfg, where).shape[0]
            names = f.get(f"{cfg.hdf5_key}_keys")
            if names is None:
                return row_number_keys(n, 0, n)
            keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in names[()]]
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be opened as HDF5 ({exc})") from None
    if len(keys) != n or len(set(keys)) != n or any("\0" in k for k in keys):
        raise ConfigError(f"{where}: {cfg.hdf5_key}_keys must hold {n} distinct keys without "
                          f"NUL, found {len(keys)} ({len(set(keys))} distinct)")
    return keys
