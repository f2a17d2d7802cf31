"""Remembering that an HDF5 source matched its cache, so that a trainer lists it once, not at
every start.

Stage two never replays views from other images than the cache's: `open_replay_source` lists
the source's keys and compares their count and ordered hash with the cache's dataset
fingerprint. For an HDF5 file of DUNE's size (about 20 M images) that listing costs about a
minute and gigabytes of Python strings in every trainer, at every start of every run.

A passed check of a local HDF5 file is therefore remembered: one small JSON record in the check
folder, named by a hash of what was checked (the cache's fingerprint of the dataset: name, key
hash, image count; the source: its real path, `hdf5_key`, `max_images`), holding the file's
identity when it passed: device, inode, size, modification and change times in nanoseconds, as
`os.stat` gives them. The next start with that same file, unchanged in every one of those
fields, opens it without listing its keys (`HDF5Source.unlisted`; its rows are still counted
against the cache). Any difference, a missing or unreadable record, a URL source, a folder or
list source (those need their key list anyway, to find each file): the full check runs again.
The absence of a record is never read as "checked". The change time cannot be set by a user
(`touch`, `cp -p` and `rsync -t` set only the modification time) and moves on every write, so a
file rewritten in place, with or without its old times, is checked again.

The check folder: `DUNE_SOURCE_CHECKS`, else `$XDG_CACHE_HOME/dune-distill/source-checks`, else
`~/.cache/dune-distill/source-checks`. A record that cannot be written is not an error: the next
start checks again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cache_format.locations import is_url
from cache_format.manifest import DatasetFingerprint
from precompute.dataset_keys import DatasetConfig

#: Environment variable naming the folder of remembered source checks.
CHECKS_ENV = "DUNE_SOURCE_CHECKS"
_STAT_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def checks_folder() -> Path:
    """Where passed source checks are remembered (see the module docstring)."""
    if os.environ.get(CHECKS_ENV):
        return Path(os.environ[CHECKS_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dune-distill" / "source-checks"


def _what(cfg: DatasetConfig, fingerprint: DatasetFingerprint) -> dict[str, Any] | None:
    """What a record is about; None when the source cannot be remembered (not a local HDF5
    file)."""
    if cfg.kind != "hdf5" or is_url(cfg.root):
        return None
    return {"dataset": fingerprint.name, "keys_sha256": fingerprint.keys_sha256,
            "num_images": fingerprint.num_images, "root": os.path.realpath(cfg.root),
            "hdf5_key": cfg.hdf5_key, "max_images": cfg.max_images}


def _identity(root: str) -> dict[str, int] | None:
    try:
        stat = os.stat(root)
    except OSError:
        return None
    return {field: int(getattr(stat, field)) for field in _STAT_FIELDS}


def _record_path(what: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()
    return checks_folder() / f"{name}.json"


def was_checked(cfg: DatasetConfig, fingerprint: DatasetFingerprint) -> bool:
    """Whether this very source file, unchanged, already passed the check against
    `fingerprint` (a remembered record, every field equal)."""
    what = _what(cfg, fingerprint)
    if what is None:
        return False
    identity = _identity(cfg.root)
    try:
        record = json.loads(_record_path(what).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return identity is not None and record == {"what": what, "identity": identity}


def remember_checked(cfg: DatasetConfig, fingerprint: DatasetFingerprint,
                     identity: dict[str, int] | None) -> None:
    """Record that the source passed the check; `identity` is the file's (`file_identity`) taken
    before it was listed, so that a write during the listing makes the record stale."""
    what = _what(cfg, fingerprint)
    if what is None or identity is None or identity != _identity(cfg.root):
        return
    path = _record_path(what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps({"what": what, "identity": identity}), encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass  # not remembered: the next start lists the source again


def file_identity(cfg: DatasetConfig) -> dict[str, int] | None:
    """The source file's identity now (None for sources that are not remembered)."""
    return None if cfg.kind != "hdf5" or is_url(cfg.root) else _identity(cfg.root)
