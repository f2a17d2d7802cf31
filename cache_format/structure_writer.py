"""StructureWriter: creates or opens a cache and builds its structure, from one process.

`create` / `open` give a store whose manifest this class alone rewrites: the planned pairs,
the build config and replay sections, and each dataset (`add_dataset`: keys and empty index
arrays) and (dataset, teacher) pair (`add_teacher`: empty record array and int8 calibration)
as it is added. Shard writes, done marks and statistics, which many processes do at once, are
`CacheWriter`'s (writer.py), the class callers use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Self

import numpy as np
import zarr

from cache_format import layout, shards
from cache_format.errors import CacheNotFoundError, CacheVersionError, ConfigError
from cache_format.manifest import (
    FORMAT_VERSION,
    ROOT_ATTR,
    DatasetFingerprint,
    Manifest,
    TeacherFingerprint,
    check_manifest_sha,
    keys_sha256,
    manifest_attrs,
)
from cache_format.replay import ReplaySpec
from cache_format.serde import json_problem, to_dict
from cache_format.shard_encode import Calibration, check_calibration


def _location(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


class StructureWriter:
    """A cache's store and manifest, and the arrays of its datasets and pairs; `CacheWriter`
    adds the shard writes. Use `CacheWriter.create` or `CacheWriter.open`, not the class."""

    def __init__(self, group: zarr.Group, manifest: Manifest, location: str) -> None:
        self._group = group
        self._manifest = manifest
        self.location = location
        self._arrays: dict[str, zarr.Array] = {}
        self._calibrations: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], manifest: Manifest, *, exist_ok: bool = False,
               storage_options: dict[str, Any] | None = None) -> Self:
        """Create an empty cache at `path` (local folder or fsspec URL) with `manifest`.

        The manifest must not list teachers, datasets or assignments yet: those arrive with
        `add_dataset` / `add_teacher`, which create their arrays. With `exist_ok`, an existing
        cache whose settings (grid, encoding, views, seed, shard size, ...) equal `manifest`'s
        is opened instead; any difference raises CacheMismatchError naming the field.
        """
        location = _location(path)
        if manifest.teachers or manifest.datasets or manifest.assignment:
            raise ConfigError(
                "CacheWriter.create: the manifest must have empty teachers, datasets and "
                "assignment; add them with add_dataset() and add_teacher()"
            )
        try:
            group = zarr.open_group(location, mode="w-", zarr_format=3,
                                    storage_options=storage_options)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            if not exist_ok:
                raise ConfigError(
                    f"{location}: a cache (or other zarr node) already exists there",
                    hint="use CacheWriter.open() to extend it, or pick another path",
                ) from None
            writer = cls.open(location, storage_options=storage_options)
            grown = ("teachers", "datasets", "assignment", "build_config", "replay", "planned")
            settings = {k: v for k, v in to_dict(manifest).items() if k not in grown}
            settings["encoding"] = manifest.encoding
            writer.manifest.check_against(**settings)
            return writer
        group.require_group(layout.DATASETS)
        group.attrs.update(manifest_attrs(manifest.to_dict()))
        return cls(group, manifest, location)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *,
             storage_options: dict[str, Any] | None = None) -> Self:
        """Open an existing cache for writing (shards, or new datasets and teachers)."""
        location = _location(path)
        try:
            group = zarr.open_group(location, mode="r+", zarr_format=3,
                                    storage_options=storage_options)
        except FileNotFoundError:
            raise CacheNotFoundError(f"{location}: no cache there",
                                     hint="create it with CacheWriter.create()") from None
        if ROOT_ATTR not in group.attrs:
            raise CacheNotFoundError(f"{location}: a zarr group without a {ROOT_ATTR!r} manifest")
        check_manifest_sha(group.attrs, location)  # the build refuses an edited manifest
        manifest = Manifest.from_dict(group.attrs[ROOT_ATTR], where=location)
        if manifest.format_version != FORMAT_VERSION:
            raise CacheVersionError(
                f"{location}: format version {manifest.format_version}; this writer writes "
                f"version {FORMAT_VERSION} only",
                hint=f"upgrade the cache first: `dune-cache upgrade {location}`")
        return cls(group, manifest, location)

    @property
    def manifest(self) -> Manifest:
        """The manifest as this writer last wrote or read it."""
        return self._manifest

    def _save_manifest(self, manifest: Manifest) -> None:
        # The manifest and its checksum in one update of the root metadata (manifest_attrs).
        self._group.attrs.update(manifest_attrs(manifest.to_dict()))
        self._manifest = manifest

    def set_planned(self, planned: Mapping[str, Sequence[str]]) -> None:
        """Record every (teacher, dataset) pair the build asks for, before any is added, so
        that readers judge completeness against it (a pair that was never added because its
        `add_teacher` died is then missing, not absent by choice). Pairs already planned stay
        planned. Only the root manifest attribute is rewritten."""
        merged = {t: tuple(d) for t, d in self._manifest.planned.items()}
        for teacher, datasets in planned.items():
            merged[teacher] = tuple(dict.fromkeys([*merged.get(teacher, ()), *datasets]))
        if merged != self._manifest.planned:
            self._save_manifest(replace(self._manifest, planned=merged))

    def set_build_config(self, config: dict[str, Any]) -> None:
        """Replace the manifest's `build_config`, the record of how the cache was built.

        The builder calls it when a run adds teachers or datasets, so that the stored config
        describes the whole cache (the trainer reads dataset roots and teacher domains there;
        `verify --recompute` reruns the teachers from it). Only the root manifest attribute is
        rewritten; no array is touched. `config` must be plain JSON (dicts with str keys, lists,
        str, finite numbers, bool, None): anything else is a ConfigError naming the entry, raised
        before anything is written.
        """
        problem = (json_problem(config, "build_config") if isinstance(config, dict)
                   else f"build_config: expected a dict, found {type(config).__name__}")
        if problem:
            raise ConfigError(
                f"{self.location}: set_build_config: {problem}",
                hint="store CacheBuildConfig.to_dict() (serde.to_dict gives JSON types)")
        stored = json.loads(json.dumps(config))  # a copy, as a reader will see it
        self._save_manifest(replace(self._manifest, build_config=stored))

    def set_replay(self, spec: ReplaySpec) -> None:
        """Replace the manifest's replay section (what stage two replays views from; see
        cache_format/replay.py). Only the root manifest attribute is rewritten."""
        self._save_manifest(replace(self._manifest, replay=spec))

    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            self._arrays[path] = self._group[path]  # type: ignore[assignment]
        return self._arrays[path]

    # -- structure ---------------------------------------------------------------------------
    def has_dataset(self, dataset: str) -> bool:
        """Whether `dataset` was added (its index arrays exist)."""
        return dataset in self._manifest.datasets

    def has_teacher(self, dataset: str, teacher: str) -> bool:
        """Whether the (dataset, teacher) pair was added (its record array exists)."""
        return dataset in self._manifest.assignment.get(teacher, ())

    def num_samples(self, dataset: str) -> int:
        """Samples of `dataset` (num_images * views_per_image)."""
        return self._dataset_fp(dataset).num_images * self._manifest.views_per_image

    def num_shards(self, dataset: str) -> int:
        """Shards of `dataset` (the unit of writing; the last one may be partial)."""
        return shards.num_shards(self.num_samples(dataset), self._manifest.samples_per_shard)

    def shard_bounds(self, dataset: str, shard: int) -> tuple[int, int]:
        """[start, stop) sample range of `shard` of `dataset`."""
        n_shards = self.num_shards(dataset)
        if not 0 <= shard < n_shards:
            raise ConfigError(f"dataset {dataset}: shard {shard} is out of range [0, {n_shards})")
        return shards.shard_bounds(shard, self.num_samples(dataset),
                                   self._manifest.samples_per_shard)

    def _dataset_fp(self, dataset: str) -> DatasetFingerprint:
        try:
            return self._manifest.datasets[dataset]
        except KeyError:
            raise CacheNotFoundError(
                f"{self.location}: no dataset {dataset!r} (has {sorted(self._manifest.datasets)})",
                hint="add it with add_dataset()",
            ) from None

    def _teacher_fp(self, dataset: str, teacher: str) -> TeacherFingerprint:
        if not self.has_teacher(dataset, teacher):
            raise CacheNotFoundError(
                f"{self.location}: no teacher {teacher!r} for dataset {dataset!r}",
                hint="add it with add_teacher()",
            )
        return self._manifest.teachers[teacher]

    def add_dataset(self, fingerprint: DatasetFingerprint, keys: Sequence[str]) -> None:
        """Add a dataset: store its ordered keys and create its (empty) index arrays.

        Idempotent: adding a dataset that exists with an equal fingerprint does nothing; a
        different fingerprint raises CacheMismatchError naming the differing field.
        """
        name = fingerprint.name
        if len(keys) != fingerprint.num_images:
            raise ConfigError(f"dataset {name}: {len(keys)} keys given, fingerprint says "
                              f"num_images={fingerprint.num_images}")
        if keys_sha256(keys) != fingerprint.keys_sha256:
            raise ConfigError(f"dataset {name}: the keys' sha256 {keys_sha256(keys)} differs "
                              f"from fingerprint.keys_sha256 {fingerprint.keys_sha256}")
        if name in self._manifest.datasets:
            self._manifest.check_against(datasets={name: fingerprint})
            return
        m = self._manifest
        # A group without a manifest entry is a crashed earlier attempt: replace it.
        group = self._group.require_group(layout.DATASETS).create_group(name, overwrite=True)
        encoded = [k.encode("utf-8") for k in keys]
        offsets = np.zeros(len(encoded) + 1, dtype=np.uint64)
        np.cumsum([len(k) for k in encoded], out=offsets[1:])
        layout.create_index_arrays(group, int(offsets[-1]), fingerprint.num_images,
                                   m.views_per_image, m.samples_per_shard,
                                   len(m.view_param_names), len(m.status_codes),
                                   fingerprinted=bool(fingerprint.source_fingerprint))
        text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        group[layout.KEY_UTF8][:] = text
        group[layout.KEY_OFFSETS][:] = offsets
        del encoded, text
        self._save_manifest(replace(m, datasets={**m.datasets, name: fingerprint}))

    def add_teacher(self, dataset: str, fingerprint: TeacherFingerprint,
                    calibration: Calibration | None = None) -> None:
        """Add a (dataset, teacher) pair: create its record array and store its calibration.

        `calibration` maps each of the teacher's token types to (mean, std) float32 [D] (see
        encodings.fit_calibration); int8 needs it, fp16/bf16 ignore it. Idempotent: an existing
        pair keeps its stored calibration (the one its shards were encoded with).
        """
        self._dataset_fp(dataset)
        m, teacher = self._manifest, fingerprint.name
        if teacher in m.teachers:
            m.check_against(teachers={teacher: fingerprint})
        if self.has_teacher(dataset, teacher):
            return
        if m.encoding.has_scale:
            check_calibration(fingerprint, calibration)
        teachers = self._group.require_group(f"{layout.dataset_path(dataset)}/{layout.TEACHERS}")
        # A group without a manifest entry is a crashed earlier attempt: replace it.
        group = teachers.create_group(teacher, overwrite=True)
        self._calibrations = {k: v for k, v in self._calibrations.items()
                              if k[:2] != (dataset, teacher)}
        layout.create_teacher_arrays(group, m.encoding, self.num_samples(dataset), m.num_tokens,
                                     fingerprint.dim, fingerprint.token_types,
                                     m.samples_per_shard)
        if m.encoding.has_scale and calibration is not None:
            for tok in fingerprint.token_types:
                mean_name, std_name = layout.calib_names(tok)
                group[mean_name][:] = np.asarray(calibration[tok][0], dtype=np.float32)
                group[std_name][:] = np.asarray(calibration[tok][1], dtype=np.float32)
        assignment = {**m.assignment, teacher: (*m.assignment.get(teacher, ()), dataset)}
        self._save_manifest(replace(m, teachers={**m.teachers, teacher: fingerprint},
                                    assignment=assignment))

    def calibration(self, dataset: str, teacher: str, tok: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored int8 calibration (mean, std) of a pair's token type (read once: it never
        changes after add_teacher)."""
        key = (dataset, teacher, tok)
        if key not in self._calibrations:
            base = layout.teacher_path(dataset, teacher)
            mean_name, std_name = layout.calib_names(tok)
            self._calibrations[key] = (self._array(f"{base}/{mean_name}")[:],
                                       self._array(f"{base}/{std_name}")[:])
        return self._calibrations[key]
