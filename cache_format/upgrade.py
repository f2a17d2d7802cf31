"""`dune-cache upgrade`: rewrite a version-1 cache's metadata into version 2, in place.

What changes: per dataset, the keys (vlen strings -> `key_utf8` + `key_offsets`), the index
(`view_params`, `status`, `index_done` -> `index_rows`, `index_meta`, consolidated `status`,
`summary`); per pair, the done marks and statistics (`done`, `stats/*` -> `shard_meta`,
`summary`). What never changes: the token shards (`tokens`, its metadata and every shard file)
and the calibration arrays; no byte of them is read or written.

Safe to kill and rerun: every step can be redone. A group is converted in three steps: its
version-2 arrays are (re)written from the version-1 ones, then the group's attribute
`dune_upgrade` is set to "converted", then the version-1 arrays are deleted and the attribute
removed. A rerun redoes the first step where the attribute is absent and version-1 arrays
remain, and finishes the deletion where it is set. The root manifest, with its version bump, is
written last: until then, readers read the cache as version 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from cache_format import layout, v1
from cache_format.errors import CacheNotFoundError
from cache_format.manifest import (
    FORMAT_VERSION,
    MANIFEST_SHA_ATTR,
    ROOT_ATTR,
    Manifest,
    manifest_attrs,
)
from cache_format.writer import CacheWriter

#: Group attribute set once a group's version-2 arrays are complete (see the module docstring).
STEP_ATTR = "dune_upgrade"
_DATASET_V1 = (v1.KEY, v1.VIEW_PARAMS, v1.STATUS, v1.INDEX_DONE)
_PAIR_V1 = (v1.DONE, v1.STATS)


@dataclass(frozen=True)
class UpgradeReport:
    """What `upgrade_cache` did: the version found, the groups it converted, and whether it
    rewrote the manifest (version bump, or a `replay` section added)."""

    found_version: int
    converted: tuple[str, ...]
    manifest_changed: bool = False


#: Computes the manifest's `replay` section (as stored) from its `build_config`. The rules that
#: turn a build config into replay facts (view settings, sources, domains) belong to stage one,
#: which passes them in (`precompute.replay_spec`); this module never parses a build config.
ReplayOf = Callable[[Mapping[str, Any]], dict[str, Any]]


def upgrade_manifest(data: dict[str, Any], replay_of: ReplayOf | None = None) -> dict[str, Any]:
    """The version-2 manifest (as stored) of a version-1 manifest: the one place where a stored
    manifest is converted, so every section version 2 adds is filled in here.

    The `replay` section that training reads is derived from the stored `build_config` by
    `replay_of` when the manifest lacks one (without `replay_of` it stays absent, and training
    refuses the cache with a hint to run `dune-cache upgrade`).
    """
    upgraded = {**data, "format_version": FORMAT_VERSION}
    if upgraded.get("replay") is None and replay_of is not None:
        upgraded["replay"] = replay_of(upgraded.get("build_config") or {})
    return upgraded


def upgrade_cache(path: str | os.PathLike[str],
                  storage_options: dict[str, Any] | None = None, *,
                  replay_of: ReplayOf | None = None) -> UpgradeReport:
    """Upgrade the cache at `path` to the current format version in place (see the module
    docstring). A cache already at the current version is left as it is (leftovers of an
    interrupted run are cleaned)."""
    location = os.fspath(path)
    try:
        root = zarr.open_group(location, mode="r+", storage_options=storage_options)
    except FileNotFoundError:
        raise CacheNotFoundError(f"{location}: no cache there") from None
    if ROOT_ATTR not in root.attrs:
        raise CacheNotFoundError(f"{location}: a zarr group without a {ROOT_ATTR!r} manifest",
                                 hint="this is not a dune-distill cache")
    data = dict(root.attrs[ROOT_ATTR])  # type: ignore[arg-type]
    found = Manifest.from_dict(data, where=location).format_version
    upgraded = upgrade_manifest(data, replay_of)  # computed first: a bad build_config stops here
    manifest = Manifest.from_dict(upgraded, where=location)
    writer = CacheWriter(root, manifest, location)
    converted: list[str] = []
    for teacher, datasets in manifest.assignment.items():
        for dataset in datasets:
            group = root[layout.teacher_path(dataset, teacher)]
            if _convert(group, _PAIR_V1, lambda g, d=dataset, t=teacher: _pair(writer, g, d, t)):
                converted.append(f"{dataset}/{teacher}")
    for dataset in manifest.datasets:
        group = root[layout.dataset_path(dataset)]
        if _convert(group, _DATASET_V1, lambda g, d=dataset: _dataset(writer, g, d)):
            converted.append(dataset)
    rewrite = upgraded != data or MANIFEST_SHA_ATTR not in root.attrs  # checksum added too
    if rewrite:
        root.attrs.update(manifest_attrs(upgraded))  # last: the cache is version 2 from here
    return UpgradeReport(found, tuple(converted), rewrite)


def _convert(group: Any, old: tuple[str, ...], write_v2: Any) -> bool:
    """Run the three steps on one group; whether version-2 arrays were written."""
    present = [name for name in old if name in group]
    if not present and STEP_ATTR not in group.attrs:
        return False  # a version-2 group (or one converted earlier)
    wrote = STEP_ATTR not in group.attrs
    if wrote:
        write_v2(group)
        group.attrs[STEP_ATTR] = "converted"
    for name in present:
        del group[name]
    del group.attrs[STEP_ATTR]
    return wrote


def _pair(writer: CacheWriter, group: zarr.Group, dataset: str, teacher: str) -> None:
    """A pair's `shard_meta` rows and `summary` from its version-1 done marks and statistics."""
    fp = writer.manifest.teachers[teacher]
    columns = layout.PairColumns(fp.token_types, fp.dim)
    old = v1.V1PairMeta(group, dataset, teacher, columns, writer.manifest.num_tokens)
    rows, summary = old.rows(), old.summary()
    layout.create_pair_meta_arrays(group, rows.shape[0], columns.width)
    meta = group[layout.SHARD_META]
    for shard in np.nonzero(rows[:, 0] == layout.MARK_DONE)[0].tolist():
        meta[shard] = rows[shard]  # type: ignore[index]
    if summary is not None:
        group[layout.SUMMARY][:] = summary  # type: ignore[index]


def _dataset(writer: CacheWriter, group: zarr.Group, dataset: str) -> None:
    """A dataset's version-2 index from its version-1 keys, view parameters and statuses."""
    m = writer.manifest
    keys = [str(k) for k in group[v1.KEY][:]]  # type: ignore[index]
    encoded = [k.encode("utf-8") for k in keys]
    offsets = np.zeros(len(keys) + 1, dtype=np.uint64)
    np.cumsum([len(k) for k in encoded], out=offsets[1:])
    layout.create_index_arrays(group, int(offsets[-1]), len(keys), m.views_per_image,
                               m.samples_per_shard, len(m.view_param_names), len(m.status_codes))
    group[layout.KEY_UTF8][:] = np.frombuffer(b"".join(encoded), dtype=np.uint8)  # type: ignore[index]
    group[layout.KEY_OFFSETS][:] = offsets  # type: ignore[index]
    done = np.asarray(group[v1.INDEX_DONE][:], dtype=bool)  # type: ignore[index]
    params, status = group[v1.VIEW_PARAMS], group[v1.STATUS]
    for shard in np.nonzero(done)[0].tolist():
        start, stop = writer.shard_bounds(dataset, shard)
        writer.write_index_shard(dataset, shard, params[start:stop],  # type: ignore[index]
                                 status[start:stop])  # type: ignore[index]
    if done.all():
        writer.finalize_index(dataset)
