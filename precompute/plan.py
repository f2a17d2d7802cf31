"""The build plan: what the cache already holds, what is left to do, and whether it fits.

`make_plan` lists every dataset's images, opens the cache when one exists, and compares the
config with the one the cache was built with. Only additions are allowed on an existing cache:
new teachers, new datasets, new (teacher, dataset) pairs. Any other difference is refused with a
message naming every differing field, because a cache whose parts were built with different
settings would silently mix incompatible tokens.

The plan is read-only (a dry run prints it and touches nothing); the builder executes it.

Sizes come from cache_format.footprint (what each part of the cache stores, before it exists).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from rich.table import Table

from cache_format.errors import (
    CacheMismatchError,
    CacheNotFoundError,
    CacheVersionError,
    InsufficientSpaceError,
)
from cache_format.footprint import Footprint, index_footprint, pair_footprint
from cache_format.locate import probe_cache
from cache_format.locations import local_path
from cache_format.manifest import FORMAT_VERSION, DatasetFingerprint, Manifest
from cache_format.reader import CacheReader, open_cache
from cache_format.serde import to_dict
from cache_format.shards import num_shards
from cache_format.source_fingerprint import ALGORITHM as FINGERPRINT_ALGORITHM
from precompute.config import RUNTIME_FIELDS, CacheBuildConfig
from precompute.sources import ImageSource, open_source
from precompute.teachers.specs import get_teacher_spec
from precompute.view_params import NUM_VIEW_PARAMS


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset: its source, size, and the index shards still to write."""

    name: str
    source: ImageSource = field(compare=False, repr=False)
    fingerprint: DatasetFingerprint
    num_samples: int
    num_shards: int
    in_cache: bool
    index_todo: tuple[int, ...]
    index_size: Footprint
    index_final: bool = False  # every index shard written and the statuses consolidated

    @property
    def num_images(self) -> int:
        """Images in the dataset."""
        return self.fingerprint.num_images


@dataclass(frozen=True)
class PairPlan:
    """One (teacher, dataset) pair: the token shards still to write, and its size."""

    teacher: str
    dataset: str
    in_cache: bool
    num_samples: int
    num_shards: int
    shards_todo: tuple[int, ...]
    samples_todo: int
    finalized: bool
    size: Footprint

    @property
    def total_bytes(self) -> int:
        """Estimated bytes of the whole pair (every image ok)."""
        return self.size.nbytes(self.num_samples, self.num_shards)

    @property
    def done(self) -> bool:
        """Every shard written and the statistics finalized."""
        return not self.shards_todo and self.finalized


@dataclass(frozen=True)
class BuildPlan:
    """What a build will do. `pairs` are in run order: teacher by teacher, as configured."""

    config: CacheBuildConfig
    cache_exists: bool
    datasets: dict[str, DatasetPlan]
    pairs: tuple[PairPlan, ...]
    total_bytes: int
    todo_bytes: int
    free_bytes: int | None

    @property
    def nothing_to_do(self) -> bool:
        """The cache is complete for this config."""
        return all(d.index_final for d in self.datasets.values()) and all(
            p.done for p in self.pairs
        )

    @property
    def fits(self) -> bool:
        """Whether the estimated remaining bytes fit the free space (True when unknown)."""
        return self.free_bytes is None or self.todo_bytes <= self.free_bytes

    def pairs_of(self, teacher: str) -> tuple[PairPlan, ...]:
        """The pairs of `teacher`, in dataset order."""
        return tuple(p for p in self.pairs if p.teacher == teacher)


def pair_size(config: CacheBuildConfig, teacher: str) -> Footprint:
    """What one (teacher, dataset) pair stores, from the teacher kind's facts (without loading
    it)."""
    cfg = config.teacher(teacher)
    spec = get_teacher_spec(cfg.kind)
    return pair_footprint(config.encoding, tuple(spec.token_types),
                          config.grid[0] * config.grid[1], cfg.embed_dim or spec.dim,
                          config.samples_per_shard)


def index_size(config: CacheBuildConfig, keys: list[str]) -> Footprint:
    """What a dataset's index stores."""
    return index_footprint(keys, config.views_per_image, config.samples_per_shard,
                           NUM_VIEW_PARAMS, fingerprinted=True)


def free_space(path: str) -> int | None:
    """Free bytes on the file system that will hold `path` (None for URLs)."""
    probe = local_path(path)
    if probe is None:
        return None
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    return shutil.disk_usage(probe).free


def open_existing(path: str) -> CacheReader | None:
    """A reader of the cache at `path` when one exists there; None when nothing is there.

    Something that exists but is not a cache (a non-empty folder, a zarr node without the
    manifest) is refused rather than written into; so is a cache of an older format version,
    which `dune-cache upgrade` converts first.
    """
    what = probe_cache(path)
    if what == "absent":
        return None
    if what == "other":
        raise CacheNotFoundError(
            f"{path}: exists but is not a dune-distill cache",
            hint="pass another --cache path (an empty or missing folder)",
        )
    reader = open_cache(path)
    if reader.manifest.format_version != FORMAT_VERSION:
        reader.close()
        raise CacheVersionError(
            f"{path}: the cache has format version {reader.manifest.format_version}; the builder "
            f"writes version {FORMAT_VERSION}",
            hint=f"convert it first (in place, token shards untouched): dune-cache upgrade {path}")
    return reader


def manifest_settings(config: CacheBuildConfig) -> dict[str, Any]:
    """The manifest fields a config determines (everything but teachers, datasets, pairs)."""
    return {
        "grid": config.grid,
        "student_patch": config.student_patch,
        "views_per_image": config.views_per_image,
        "view_mode": config.views.mode,
        "seed": config.seed,
        "samples_per_shard": config.samples_per_shard,
        "encoding": config.encoding,
    }


def _diff(path: str, stored: Any, wanted: Any, out: list[str]) -> None:
    """Append "path: cache has X, config has Y" for every leaf where the two differ."""
    if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
        for key in sorted(set(stored) | set(wanted), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in stored:
                out.append(f"{sub}: not in the cache's config, config has {wanted[key]!r}")
            elif key not in wanted:
                out.append(f"{sub}: cache has {stored[key]!r}, not in the config")
            else:
                _diff(sub, stored[key], wanted[key], out)
        return
    if isinstance(stored, list | tuple) and isinstance(wanted, list | tuple):
        stored, wanted = list(stored), list(wanted)
    if stored != wanted:
        out.append(f"{path}: cache has {stored!r}, config has {wanted!r}")


def _without(entry: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != key}


def config_changes(manifest: Manifest, config: CacheBuildConfig) -> list[str]:
    """Every difference between the cache's build and `config`, except allowed additions.

    Compared: the manifest settings, every build-config field except the runtime ones, each
    teacher and dataset the cache holds (field by field), and the (teacher, dataset) pairs the
    cache holds (each must still be assigned). New teachers, datasets and pairs are additions.
    """
    changes: list[str] = []
    settings = to_dict(manifest_settings(config))
    _diff("", {k: to_dict(getattr(manifest, k)) for k in settings}, settings, changes)
    stored = dict(manifest.build_config)
    wanted = config.to_dict()
    if stored:
        skip = {*RUNTIME_FIELDS, "teachers", "datasets", "sharing"}
        _diff("", {k: v for k, v in stored.items() if k not in skip},
              {k: v for k, v in wanted.items() if k not in skip}, changes)
        for part in ("teachers", "datasets"):
            old = {e["name"]: e for e in stored.get(part, []) if isinstance(e, Mapping)}
            new = {e["name"]: e for e in wanted[part]}
            for name, entry in old.items():
                if name not in new:
                    changes.append(f"{part}[{name}]: in the cache, missing from the config")
                else:  # `init` states intent; the weights themselves are fingerprinted
                    _diff(f"{part}[{name}]", _without(entry, "init"),
                          _without(new[name], "init"), changes)
    assignment = config.assignment()
    for teacher, datasets in manifest.assignment.items():
        if teacher not in assignment:
            changes.append(f"teachers[{teacher}]: in the cache, missing from the config")
            continue
        dropped = [d for d in datasets if d not in assignment[teacher]]
        if dropped:
            changes.append(
                f"sharing: the cache holds teacher {teacher} on {dropped}, the config's "
                f"strategy {config.sharing.strategy!r} no longer assigns them"
            )
    for name in manifest.datasets:
        if name not in config.dataset_names:
            changes.append(f"datasets[{name}]: in the cache, missing from the config")
    return list(dict.fromkeys(changes))


def _check_dataset_fingerprint(location: str, manifest: Manifest,
                               fp: DatasetFingerprint) -> None:
    stored = manifest.datasets[fp.name]
    for name in ("num_images", "keys_sha256", "source_kind"):
        if getattr(stored, name) != getattr(fp, name):
            raise CacheMismatchError(
                f"{location}: dataset {fp.name}: {name} is {getattr(stored, name)!r} in the "
                f"cache but {getattr(fp, name)!r} in the source ({fp.root}); the images changed "
                "since the cache was built",
                hint="restore the original images, or build a new cache",
            )


def make_plan(config: CacheBuildConfig) -> BuildPlan:
    """Plan a build: list the sources, read what the cache holds, refuse config changes."""
    for teacher in config.teachers:  # before any work: a wrong weights path fails here
        teacher.check_weights_source()
    location = config.cache
    reader = open_existing(location)
    try:
        return _make_plan(config, reader)
    finally:
        if reader is not None:
            reader.close()


def _make_plan(config: CacheBuildConfig, reader: CacheReader | None) -> BuildPlan:
    location = config.cache
    manifest = reader.manifest if reader is not None else None
    if manifest is not None:
        changes = config_changes(manifest, config)
        if changes:
            raise CacheMismatchError(
                f"{location}: the cache was built with another config; only adding teachers or "
                f"datasets is allowed. Differences:\n  " + "\n  ".join(changes),
                hint="restore those fields, or build into a new --cache path",
            )
    sps = config.samples_per_shard
    datasets: dict[str, DatasetPlan] = {}
    total = todo = 0
    for cfg in config.datasets:
        source = open_source(cfg, config.build.max_pixels, config.build.unusual_modes)
        # New datasets record each image's content fingerprint; one already in the cache keeps
        # what it records (a dataset indexed before fingerprints existed resumes without them).
        fp = DatasetFingerprint(**source.describe(),  # type: ignore[arg-type]
                                source_fingerprint=FINGERPRINT_ALGORITHM)
        n = fp.num_images * config.views_per_image
        shards = num_shards(n, sps)
        in_cache = manifest is not None and cfg.name in manifest.datasets
        if in_cache:
            assert manifest is not None and reader is not None
            _check_dataset_fingerprint(location, manifest, fp)
            fp = replace(fp, source_fingerprint=manifest.datasets[cfg.name].source_fingerprint)
            marks = reader.index_done(cfg.name)
            index_todo = tuple(int(s) for s in np.nonzero(~marks)[0])
            index_final = reader.index_complete(cfg.name)
        else:
            index_todo, index_final = tuple(range(shards)), False
        index = index_size(config, source.keys())
        total += index.nbytes(0, shards)
        todo += index.nbytes(0, len(index_todo), fixed=not in_cache)
        datasets[cfg.name] = DatasetPlan(cfg.name, source, fp, n, shards, in_cache, index_todo,
                                         index, index_final)
    pairs: list[PairPlan] = []
    for teacher, names in config.assignment().items():
        size = pair_size(config, teacher)
        for name in names:
            d = datasets[name]
            in_cache = manifest is not None and name in manifest.assignment.get(teacher, ())
            finalized = False
            shards_todo = tuple(range(d.num_shards))
            if in_cache:
                assert reader is not None
                marks = reader.pair_done(name, teacher)
                finalized = reader.pair_complete(name, teacher)
                if local_path(location) is not None and d.index_final:
                    # A done shard whose file is gone was lost: redone, never "nothing to do"
                    # (one existence check per shard; object stores: `verify` finds them).
                    lost = reader.lost_shard_files(name, teacher)
                    marks[lost] = False
                    finalized = finalized and not lost
                shards_todo = tuple(int(s) for s in np.nonzero(~marks)[0])
            samples_todo = sum(
                min(sps, d.num_samples - s * sps) for s in shards_todo
            )
            pairs.append(PairPlan(teacher, name, in_cache, d.num_samples, d.num_shards,
                                  shards_todo, samples_todo, finalized, size))
            total += size.nbytes(d.num_samples, d.num_shards)
            todo += size.nbytes(samples_todo, len(shards_todo), fixed=not in_cache)
    return BuildPlan(config, manifest is not None, datasets, tuple(pairs), total, todo,
                     free_space(location))


def check_fits(plan: BuildPlan) -> None:
    """Refuse, before anything runs, a build whose estimated remaining size exceeds free space."""
    if not plan.fits:
        raise InsufficientSpaceError(
            f"{plan.config.cache}: the build needs about {plan.todo_bytes / 1e9:.2f} GB more "
            f"but only {plan.free_bytes / 1e9:.2f} GB are free there",  # type: ignore[operator]
            hint="free some space, pick another --cache path, or use a smaller encoding (int8)",
        )


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.3f} GB"


def plan_table(plan: BuildPlan) -> Table:
    """The plan as a table: one row per (teacher, dataset) pair, plus the index."""
    table = Table(title=f"build plan for {plan.config.cache}")
    for column in ("teacher", "dataset", "images", "samples", "shards to do", "est. size"):
        table.add_column(column, justify="left" if column in ("teacher", "dataset") else "right")
    for d in plan.datasets.values():
        table.add_row("(index)", d.name, str(d.num_images), str(d.num_samples),
                      f"{len(d.index_todo)}/{d.num_shards}",
                      _gb(d.index_size.nbytes(0, d.num_shards)))
    for p in plan.pairs:
        d = plan.datasets[p.dataset]
        todo = f"{len(p.shards_todo)}/{p.num_shards}" + ("" if p.in_cache else " (new)")
        table.add_row(p.teacher, p.dataset, str(d.num_images), str(p.num_samples), todo,
                      _gb(p.total_bytes))
    return table


def plan_lines(plan: BuildPlan) -> list[str]:
    """The plan's totals in words: views, sizes, free space, and whether it fits."""
    config = plan.config
    lines = [
        f"{len(config.teachers)} teacher(s) x {len(config.datasets)} dataset(s), strategy "
        f"{config.sharing.strategy!r}, {config.views_per_image} view(s) per image "
        f"({config.views.mode}), grid {config.grid[0]}x{config.grid[1]}, "
        f"encoding {config.encoding.name}",
        f"estimated cache size {_gb(plan.total_bytes)}; still to write {_gb(plan.todo_bytes)}; "
        f"free space there {_gb(plan.free_bytes)}",
    ]
    if plan.nothing_to_do:
        index_shards = sum(d.num_shards for d in plan.datasets.values())
        token_shards = sum(p.num_shards for p in plan.pairs)
        lines.append(
            f"the cache is complete for this config: {len(plan.datasets)} dataset(s) x "
            f"{len(config.teachers)} teacher(s) in {len(plan.pairs)} pair(s), "
            f"{index_shards} index and {token_shards} token shard(s) written, statistics "
            "final: nothing to do")
    elif not plan.fits:
        lines.append("the build does NOT fit in the free space")
    return lines
