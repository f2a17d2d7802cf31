"""CacheReader: read-only access to a cache for trainers, tools and tests.

Random batches come through `read_encoded` (encoded values plus int8 scales, ready to ship to
the GPU and decode there with `EncodedTokens.decode()`); `read_sample` decodes on the CPU;
`iter_shards` scans shard by shard. Sample reads bypass zarr-python (see fastread.py); the
small arrays (index, calibration, statistics) are read with zarr.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from cache_format import layout
from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheCorruptionError, CacheNotFoundError, ConfigError
from cache_format.fastread import ReadRequest, ShardedLayout, ShardReader
from cache_format.files import BufferPool, files_for
from cache_format.manifest import ROOT_ATTR, Manifest
from cache_format.records import EncodedTokens, SampleIndex, ShardBlock, VerifyReport
from cache_format.stats import ChannelStats, merge_all

__all__ = ["CacheReader", "EncodedTokens", "SampleIndex", "ShardBlock", "VerifyReport",
           "open_cache"]


@dataclass(frozen=True)
class _PlanEntry:
    """One token type of one teacher in a batch read: its arrays and calibration."""

    teacher: str
    tok: str
    values: ShardedLayout
    scale: ShardedLayout | None
    calib_mean: torch.Tensor | None
    calib_std: torch.Tensor | None

    @property
    def arrays(self) -> tuple[ShardedLayout, ...]:
        """The arrays read for this entry: values, then the int8 scale if any."""
        return (self.values,) if self.scale is None else (self.values, self.scale)


def open_cache(path: str | os.PathLike[str], *, threads: int = 4,
               storage_options: dict[str, Any] | None = None,
               index_cache_entries: int = 65536, verify_checksums: bool = True) -> CacheReader:
    """Open a cache read-only (local folder or fsspec URL).

    Raises CacheNotFoundError when nothing is there and CacheVersionError when the cache was
    written by a newer format version. `threads` is the per-batch read parallelism;
    `index_cache_entries` bounds the number of shard indexes kept in memory (1 KB each at
    64 samples per shard). `verify_checksums=False` skips the per-chunk crc32c check of sample
    reads (shard indexes are always checked): about 40 us per MB saved, corruption then goes
    unnoticed, so keep the default unless `verify()` ran on this copy of the cache.
    """
    location = os.fspath(path)
    try:
        group = zarr.open_group(location, mode="r", storage_options=storage_options)
    except FileNotFoundError:
        raise CacheNotFoundError(f"{location}: no cache there",
                                 hint="build one with `dune-cache build`") from None
    if ROOT_ATTR not in group.attrs:
        raise CacheNotFoundError(f"{location}: a zarr group without a {ROOT_ATTR!r} manifest",
                                 hint="this is not a dune-distill cache")
    manifest = Manifest.from_dict(group.attrs[ROOT_ATTR], where=location)
    fast = ShardReader(files_for(location, storage_options), threads=threads,
                       index_cache_entries=index_cache_entries,
                       verify_checksums=verify_checksums)
    return CacheReader(group, manifest, location, fast)


class CacheReader:
    """Read-only view of a cache. Create it with `open_cache`."""

    def __init__(self, group: zarr.Group, manifest: Manifest, location: str,
                 fast: ShardReader) -> None:
        self._group = group
        self.manifest = manifest
        self.location = location
        self._fast = fast
        self._layouts: dict[tuple[str, str, str], ShardedLayout] = {}
        self._calib: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._done: dict[tuple[str, str], np.ndarray] = {}
        self._indexes: dict[str, SampleIndex] = {}
        self._plans: dict[tuple[str, tuple[str, ...]], list[_PlanEntry]] = {}
        self._buffers = BufferPool()
        self._teachers_for: dict[str, tuple[str, ...]] = {}
        self._num_samples: dict[str, int] = {}

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
        return layout.num_shards(self.num_samples(dataset), self.manifest.samples_per_shard)

    def check(self, **expected: Any) -> None:
        """`Manifest.check_against`: raise CacheMismatchError naming the first differing field."""
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
        """The dataset's keys, view parameters and statuses (read once, then cached)."""
        if dataset not in self._indexes:
            self._check_dataset(dataset)
            group = self._group[layout.dataset_path(dataset)]
            self._indexes[dataset] = SampleIndex(
                dataset=dataset, keys=np.asarray(group[layout.KEY][:], dtype=object),
                view_params=group[layout.VIEW_PARAMS][:], status=group[layout.STATUS][:],
                views_per_image=self.manifest.views_per_image,
                view_param_names=self.manifest.view_param_names)
        return self._indexes[dataset]

    def calibration(self, dataset: str, teacher: str, tok: str
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The int8 calibration (mean, std) float32 [D] of a pair's token type (None otherwise)."""
        if not self.encoding.has_scale:
            return None
        key = (dataset, teacher, tok)
        if key not in self._calib:
            self._check_pair(dataset, teacher)
            group = self._group[layout.teacher_path(dataset, teacher)]
            mean_name, std_name = layout.calib_names(tok)
            self._calib[key] = (torch.from_numpy(group[mean_name][:]),
                                torch.from_numpy(group[std_name][:]))
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
            group = self._group[layout.teacher_path(dataset, teacher)]
            if not group[f"{layout.STATS}/{layout.FINAL}"][0]:
                raise CacheNotFoundError(
                    f"{self.location}: statistics of {dataset}/{teacher} were never finalized",
                    hint="finish the build (`dune-cache build` finalizes statistics)")
            count, mean, m2 = (group[p][:] for p in layout.stats_names(tok, partial=False))
            parts.append(ChannelStats(int(count[0]), mean, m2))
        return merge_all(parts, fp.dim)

    # -- tokens ------------------------------------------------------------------------------
    def _layout(self, dataset: str, teacher: str, name: str) -> ShardedLayout:
        key = (dataset, teacher, name)
        if key not in self._layouts:
            array = self._group[f"{layout.teacher_path(dataset, teacher)}/{name}"]
            label = f"dataset {dataset!r}, teacher {teacher!r}, array {name!r}"
            self._layouts[key] = ShardedLayout.from_array(array, label)  # type: ignore[arg-type]
        return self._layouts[key]

    def _require_done(self, dataset: str, teacher: str, samples: Sequence[int]) -> None:
        """Refuse samples of shards that were never completely written (no done mark)."""
        key = (dataset, teacher)
        done = self._done.get(key)
        if done is None:  # 0 = not seen done yet; a done mark is never unset while readers run
            done = self._done[key] = bytearray(self.num_shards(dataset))
        sps = self.manifest.samples_per_shard
        for shard in {s // sps for s in samples}:
            if not done[shard]:
                path = f"{layout.teacher_path(dataset, teacher)}/{layout.DONE}"
                if not self._fast.read_done_mark(path, shard, f"{dataset}/{teacher}"):
                    raise CacheNotFoundError(
                        f"{self.location}: {dataset}/{teacher} shard {shard} (samples from "
                        f"{shard * sps}) was never completely written",
                        hint="finish the build (`dune-cache build` resumes)")
                done[shard] = 1

    def _plan(self, dataset: str, teachers: tuple[str, ...]) -> list[_PlanEntry]:
        """What a batch of `dataset` reads for `teachers` (computed once per combination)."""
        key = (dataset, teachers)
        if key not in self._plans:
            plan = []
            for teacher in teachers:
                self._check_pair(dataset, teacher)
                for tok in self.manifest.teachers[teacher].token_types:
                    scale = None
                    if self.encoding.has_scale:
                        scale = self._layout(dataset, teacher, layout.scale_name(tok))
                    calib = self.calibration(dataset, teacher, tok) or (None, None)
                    plan.append(_PlanEntry(teacher, tok, self._layout(dataset, teacher, tok),
                                           scale, *calib))
            self._plans[key] = plan
        return self._plans[key]

    def read_encoded(self, dataset: str, indices: Sequence[int] | np.ndarray,
                     teachers: Sequence[str] | None = None
                     ) -> dict[str, dict[str, EncodedTokens]]:
        """A batch of samples as stored: {teacher: {tok: EncodedTokens}} (CPU tensors).

        Rows follow `indices`. Samples whose status is not ok hold no tokens (zeros, which
        int8 decodes to the calibration mean): mask them with `index(dataset).ok`. Decode on
        any device with `EncodedTokens.decode()`. The batch arrays are recycled once the caller
        drops every tensor of the batch.
        """
        if isinstance(indices, np.ndarray):
            samples = indices.reshape(-1).tolist()
        else:
            samples = [int(i) for i in indices]
        n = self._num_samples.get(dataset) or self.num_samples(dataset)
        if samples and (min(samples) < 0 or max(samples) >= n):
            raise ConfigError(f"dataset {dataset}: sample indices must be in [0, {n}), found "
                              f"{min(samples)}..{max(samples)}")
        names = self.teachers_for(dataset) if teachers is None else tuple(teachers)
        plan = self._plans.get((dataset, names)) or self._plan(dataset, names)
        for teacher in names:
            self._require_done(dataset, teacher, samples)
        batch = len(samples)
        get_buffer = self._buffers.get
        requests = [ReadRequest(lay, samples, get_buffer((batch, *lay.sample_shape), lay.dtype))
                    for entry in plan for lay in entry.arrays]
        self._fast.read(requests)
        result: dict[str, dict[str, EncodedTokens]] = {t: {} for t in names}
        outs = iter(requests)
        for entry in plan:
            values = torch.from_numpy(next(outs).out)
            scale = torch.from_numpy(next(outs).out) if entry.scale is not None else None
            result[entry.teacher][entry.tok] = EncodedTokens(
                values, scale, self.encoding, entry.calib_mean, entry.calib_std)
        return result

    def read_sample(self, dataset: str, i: int, teachers: Sequence[str] | None = None
                    ) -> dict[str, dict[str, torch.Tensor]]:
        """Sample `i` decoded to float32 on the CPU: {teacher: {tok: [T, D] or [D]}}."""
        batch = self.read_encoded(dataset, [i], teachers)
        return {t: {tok: enc.decode()[0] for tok, enc in toks.items()}
                for t, toks in batch.items()}

    def iter_shards(self, dataset: str, teacher: str) -> Iterator[ShardBlock]:
        """Decoded tokens shard by shard (one read per shard file), for sequential scans."""
        self._check_pair(dataset, teacher)
        n, sps = self.num_samples(dataset), self.manifest.samples_per_shard
        for shard in range(self.num_shards(dataset)):
            start, stop = layout.shard_bounds(shard, n, sps)
            self._require_done(dataset, teacher, [start])
            tokens = {}
            for tok in self.manifest.teachers[teacher].token_types:
                values = self._fast.read_shard(self._layout(dataset, teacher, tok), shard,
                                               stop - start)
                scale = None
                if self.encoding.has_scale:
                    scale = torch.from_numpy(self._fast.read_shard(
                        self._layout(dataset, teacher, layout.scale_name(tok)), shard,
                        stop - start))
                calib = self.calibration(dataset, teacher, tok) or (None, None)
                tokens[tok] = EncodedTokens(torch.from_numpy(values), scale, self.encoding,
                                            *calib).decode()
            yield ShardBlock(shard, start, stop, tokens)

    def verify(self) -> VerifyReport:
        """Read every written shard of every token array and check every checksum."""
        problems: list[str] = []
        missing: list[str] = []
        checked = 0
        sps = self.manifest.samples_per_shard
        for dataset in self.datasets:
            try:
                self.index(dataset)
            except (CacheCorruptionError, ValueError) as exc:
                problems.append(f"dataset {dataset} index: {exc}")
            n = self.num_samples(dataset)
            for teacher in self.teachers_for(dataset):
                fp = self.manifest.teachers[teacher]
                names = [*fp.token_types]
                if self.encoding.has_scale:
                    names += [layout.scale_name(tok) for tok in fp.token_types]
                for shard in range(self.num_shards(dataset)):
                    start, stop = layout.shard_bounds(shard, n, sps)
                    try:
                        self._require_done(dataset, teacher, [start])
                    except CacheNotFoundError:
                        missing.append(f"{dataset}/{teacher} shard {shard}")
                        continue
                    except CacheCorruptionError as exc:
                        problems.append(str(exc))
                        continue
                    checked += 1
                    for name in names:
                        try:
                            self._fast.read_shard(self._layout(dataset, teacher, name), shard,
                                                  stop - start)
                        except CacheCorruptionError as exc:
                            problems.append(str(exc))
        return VerifyReport(checked, tuple(problems), tuple(missing))

    def close(self) -> None:
        """Release open files and reader threads."""
        self._fast.close()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
