"""MetadataReader: read-only access to everything in a cache except its tokens.

The manifest's facts (datasets, teachers, samples, shards), each dataset's sample index
(sample_index.py: keys, view parameters and statuses, read on demand without zarr-python), each
pair's calibration, statistics and done marks (pairmeta.py), and the stored size. Small reads,
done once and kept; completeness.py, verify.py and `dune-cache info` judge a cache from them.
`CacheReader` (reader.py) opens a cache and adds the token reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import torch
import zarr

from cache_format import layout, shards
from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheNotFoundError, ConfigError
from cache_format.files import files_for, read_store_options, tree_nbytes, tree_sizes
from cache_format.locations import is_url, local_path
from cache_format.manifest import MANIFEST_SHA_ATTR, Manifest
from cache_format.pairmeta import PairMeta
from cache_format.records import OpenSettings
from cache_format.sample_index import SampleIndex
from cache_format.shard_cache import ShardCacheSpec, cache_namespace
from cache_format.stats import ChannelStats, merge_all
from cache_format.v1 import V1PairMeta, V1SampleIndex


class MetadataReader:
    """Read-only view of a cache's metadata; `CacheReader`, made by `open_cache`, is the one
    callers get. `settings` records how the cache was opened."""

    def __init__(self, group: zarr.Group, manifest: Manifest, location: str,
                 settings: OpenSettings | None = None) -> None:
        self._opened: tuple[int, zarr.Group] = (os.getpid(), group)
        self.manifest = manifest
        self.location = location
        self.settings = settings or OpenSettings()
        #: Where a reopen finds the cache: `location`, made absolute (now) for a local path.
        self.source = location if is_url(location) else os.path.abspath(location)
        self._calib: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._indexes: dict[str, SampleIndex] = {}
        self._teachers_for: dict[str, tuple[str, ...]] = {}
        self._num_samples: dict[str, int] = {}
        self._pair_metas: dict[tuple[str, str], PairMeta | V1PairMeta] = {}
        self._meta_files: Any = None

    @property
    def _group(self) -> zarr.Group:
        """The cache's root group, opened again in a forked child on first use there (its store
        client may not survive a fork: s3fs's refuses to run in another process)."""
        pid, group = self._opened
        if pid != os.getpid():
            group = zarr.open_group(self.source, mode="r", zarr_format=3,
                                    storage_options=read_store_options(
                                        self.source, self.settings.storage_options))
            self._opened = (os.getpid(), group)
        return group

    def after_fork(self) -> None:
        """Go on using this reader in a forked child (a DataLoader worker) without reading again
        what the parent read: the manifest, sample indexes and their statuses, and what
        subclasses keep (token layouts, read plans, calibration, done marks) stay. Pair
        metadata readers, bound to the parent's store clients, are dropped and made again on
        use; the root group is opened again on first use (`_group`); indexes and the token
        reader renew their files and locks in their own fork hooks."""
        self._pair_metas = {}
        self._meta_files = None

    # -- what is there -----------------------------------------------------------------------
    @property
    def datasets(self) -> tuple[str, ...]:
        """Dataset names, in manifest order."""
        return tuple(self.manifest.datasets)

    @property
    def teachers(self) -> tuple[str, ...]:
        """Teacher names, in manifest order."""
        return tuple(self.manifest.teachers)

    @property
    def encoding(self) -> EncodingSpec:
        """The cache's token encoding."""
        return self.manifest.encoding

    def teachers_for(self, dataset: str) -> tuple[str, ...]:
        """Teachers whose tokens are stored for `dataset`."""
        names = self._teachers_for.get(dataset)
        if names is None:
            self._check_dataset(dataset)
            names = tuple(t for t, ds in self.manifest.assignment.items() if dataset in ds)
            self._teachers_for[dataset] = names
        return names

    def datasets_for(self, teacher: str) -> tuple[str, ...]:
        """Datasets for which `teacher`'s tokens are stored."""
        if teacher not in self.manifest.teachers:
            raise CacheNotFoundError(f"{self.location}: no teacher {teacher!r} (has "
                                     f"{list(self.teachers)})")
        return tuple(self.manifest.assignment.get(teacher, ()))

    def num_samples(self, dataset: str) -> int:
        """Samples of `dataset` (images x views per image)."""
        self._check_dataset(dataset)
        n = self.manifest.datasets[dataset].num_images * self.manifest.views_per_image
        self._num_samples[dataset] = n
        return n

    def num_shards(self, dataset: str) -> int:
        """Shards of `dataset`."""
        return shards.num_shards(self.num_samples(dataset), self.manifest.samples_per_shard)

    def check(self, **expected: Any) -> None:
        """`Manifest.check_against`: raise CacheMismatchError naming every differing field."""
        self.manifest.check_against(**expected)

    def _check_dataset(self, dataset: str) -> None:
        if dataset not in self.manifest.datasets:
            raise CacheNotFoundError(f"{self.location}: no dataset {dataset!r} (has "
                                     f"{list(self.datasets)})")

    def _check_pair(self, dataset: str, teacher: str) -> None:
        if teacher not in self.teachers_for(dataset):
            raise CacheNotFoundError(
                f"{self.location}: teacher {teacher!r} has no tokens for dataset {dataset!r} "
                f"(teachers there: {list(self.teachers_for(dataset))})")

    # -- small arrays ----------------------------------------------------------------------
    def index(self, dataset: str) -> SampleIndex:
        """The dataset's sample index (created once; cheap: statuses are read on first use,
        keys and view parameters chunk by chunk on demand, see sample_index.py)."""
        index = self._indexes.get(dataset)
        if index is None:
            self._check_dataset(dataset)
            kind = V1SampleIndex if self.manifest.format_version == 1 else SampleIndex
            index = kind.from_group(
                self._group[layout.dataset_path(dataset)], dataset,  # type: ignore[arg-type]
                views_per_image=self.manifest.views_per_image,
                view_param_names=self.manifest.view_param_names, location=self.source,
                storage_options=self.settings.storage_options,
                cache_bytes=self.settings.sample_index_cache_bytes,
                threads=self.settings.threads, num_samples=self.num_samples(dataset),
                source_fingerprint=self.manifest.datasets[dataset].source_fingerprint,
                shard_cache=self._shard_cache())
            self._indexes[dataset] = index
        return index

    def _shard_cache(self) -> ShardCacheSpec | None:
        """The node's local shard cache of a remote cache opened with one (reader.open_cache:
        the same folder and namespace as the token shards' copies), else None."""
        if not self.settings.shard_cache_dir or local_path(self.source) is not None:
            return None
        return ShardCacheSpec(self.settings.shard_cache_dir, self.settings.shard_cache_bytes,
                              cache_namespace(self.location,
                                              self._group.attrs.get(MANIFEST_SHA_ATTR)))

    def calibration(self, dataset: str, teacher: str, tok: str
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The int8 calibration (mean, std) float32 [D] of a pair's token type (None otherwise)."""
        if not self.encoding.has_scale:
            return None
        key = (dataset, teacher, tok)
        if key not in self._calib:
            meta = self.pair_meta(dataset, teacher)
            if isinstance(meta, PairMeta):  # checksums verified, a lost chunk named
                mean, std = meta.calibration(tok)
            else:
                group = self._group[layout.teacher_path(dataset, teacher)]
                mean, std = (group[name][:] for name in layout.calib_names(tok))
            self._calib[key] = (torch.from_numpy(mean), torch.from_numpy(std))
        return self._calib[key]

    def stats(self, teacher: str, tok: str, datasets: Sequence[str] | None = None
              ) -> ChannelStats:
        """Exact per-channel statistics of `teacher`'s `tok` tokens over `datasets` (default:
        all of its datasets), merged from each pair's finalized statistics."""
        names = tuple(datasets) if datasets is not None else self.datasets_for(teacher)
        fp = self.manifest.teachers[teacher]
        if tok not in fp.token_types:
            raise ConfigError(f"teacher {teacher} has no {tok!r} tokens ({fp.token_types})")
        parts = []
        for dataset in names:
            self._check_pair(dataset, teacher)
            summary = self.pair_meta(dataset, teacher).summary()
            if summary is None:
                raise CacheNotFoundError(
                    f"{self.location}: statistics of {dataset}/{teacher} were never finalized",
                    hint="finish the build (`dune-cache build` finalizes statistics)")
            parts.append(self.pair_meta(dataset, teacher).columns.parse(summary)[2][tok])
        return merge_all(parts, fp.dim)

    # -- completeness -----------------------------------------------------------------------
    def pair_meta(self, dataset: str, teacher: str) -> PairMeta | V1PairMeta:
        """The pair's metadata (done marks, ok counts, statistics; see pairmeta.py)."""
        key = (dataset, teacher)
        meta = self._pair_metas.get(key)
        if meta is None:
            self._check_pair(dataset, teacher)
            fp = self.manifest.teachers[teacher]
            group = self._group[layout.teacher_path(dataset, teacher)]
            columns = layout.PairColumns(fp.token_types, fp.dim)
            if self.manifest.format_version == 1:
                meta = V1PairMeta(group, dataset, teacher, columns,  # type: ignore[arg-type]
                                  self.manifest.num_tokens)
            else:
                if self._meta_files is None:  # small objects, each read about once: no fd kept
                    self._meta_files = files_for(self.source, self.settings.storage_options,
                                                 max_open=0)
                meta = PairMeta(group, dataset, teacher, columns,  # type: ignore[arg-type]
                                self._meta_files)
            self._pair_metas[key] = meta
        return meta

    def index_done(self, dataset: str) -> np.ndarray:
        """Which index shards of `dataset` were written completely, bool [num_shards] (one
        read when the index is complete, else one per shard)."""
        index = self.index(dataset)
        if index.summary() is not None:
            return np.ones(self.num_shards(dataset), dtype=bool)
        return index.shard_meta()[:, 0] == layout.MARK_DONE

    def index_complete(self, dataset: str) -> bool:
        """Whether every index shard of `dataset` is written and its statuses consolidated."""
        return self.index(dataset).summary() is not None

    def status_counts(self, dataset: str) -> dict[int, int]:
        """Samples per status code over the written index shards ({code: count}, codes > 0)."""
        index = self.index(dataset)
        summary = index.summary()
        counts = summary[1:] if summary is not None else index.shard_meta()[:, 1:].sum(axis=0)
        return {code: int(n) for code, n in enumerate(counts.tolist()) if n}

    def pair_done(self, dataset: str, teacher: str) -> np.ndarray:
        """Which token shards of the pair were written completely, bool [num_shards] (one read
        when the pair is complete, else one per shard)."""
        meta = self.pair_meta(dataset, teacher)
        if self.pair_complete(dataset, teacher):
            return np.ones(self.num_shards(dataset), dtype=bool)
        return meta.rows()[:, 0] == layout.MARK_DONE

    def pair_complete(self, dataset: str, teacher: str) -> bool:
        """Whether every token shard of the pair is written and its statistics merged."""
        summary = self.pair_meta(dataset, teacher).summary()
        return summary is not None and int(summary[0]) == layout.MARK_DONE

    def stats_final(self, dataset: str, teacher: str) -> bool:
        """Whether the pair's merged statistics were written (finalize_stats ran)."""
        return self.pair_meta(dataset, teacher).summary() is not None

    def shard_ok_counts(self, dataset: str, teacher: str) -> np.ndarray:
        """Ok samples each token shard of the pair holds, int64 [num_shards] (0 for a shard never
        written): a missing shard object with a count > 0 was written and then lost."""
        return self.pair_meta(dataset, teacher).rows()[:, 1].astype(np.int64)

    def nbytes(self, dataset: str | None = None, teacher: str | None = None) -> int:
        """Stored bytes of the cache, a dataset or a pair (local caches; 0 for URLs)."""
        prefix = ("" if dataset is None else layout.dataset_path(dataset) if teacher is None
                  else layout.teacher_path(dataset, teacher))
        return tree_nbytes(self.source, prefix)

    def nbytes_by_pair(self) -> tuple[int, dict[tuple[str, str], int]]:
        """Stored bytes of the cache and of every (dataset, teacher) pair, in one walk of the
        cache's folder (local caches; 0 for URLs)."""
        pairs = [(d, t) for t, names in self.manifest.assignment.items() for d in names]
        sizes = tree_sizes(self.source, ["", *(layout.teacher_path(d, t) for d, t in pairs)])
        return sizes[""], {(d, t): sizes[layout.teacher_path(d, t)] for d, t in pairs}

    def close(self) -> None:
        """Release open files and reader threads."""
        if self._meta_files is not None:
            self._meta_files.close()
        for index in self._indexes.values():
            index.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
