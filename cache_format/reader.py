"""CacheReader: opens a cache read-only and reads its tokens, for trainers, tools and tests.

Random batches come through `read_encoded` (encoded values plus int8 scales, ready to ship to
the GPU and decode there with `EncodedTokens.decode()`); `read_sample` decodes on the CPU;
`iter_shards` scans shard by shard. Sample reads bypass zarr-python (see fastread.py). What the
cache holds besides tokens (manifest facts, sample indexes, calibration, statistics, done
marks) comes from the base class, MetadataReader (metadata_reader.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import zarr

from cache_format import layout, shards
from cache_format.bufferpool import BufferPool
from cache_format.errors import (
    FOREIGN_CACHE_HINT,
    CacheCorruptionError,
    CacheNotFoundError,
    CacheVersionError,
    ConfigError,
)
from cache_format.fastread import ShardReader
from cache_format.files import FsspecFiles, files_for, read_store_options
from cache_format.manifest import (
    MANIFEST_SHA_ATTR,
    ROOT_ATTR,
    STATUS_OK,
    Manifest,
    check_manifest_sha,
)
from cache_format.metadata_reader import MetadataReader
from cache_format.readplan import (
    PlanPart,
    ReadPlan,
    SampleSlot,
    TokenSlot,
    field_array,
    plan_outputs,
)
from cache_format.records import EncodedTokens, OpenSettings, ShardBlock, VerifyReport
from cache_format.sample_index import DEFAULT_CACHE_BYTES
from cache_format.shard_cache import CachedFiles, DiskShardCache, cache_namespace
from cache_format.sharded_layout import ShardedLayout

__all__ = ["CacheReader", "open_cache"]


def open_cache(path: str | os.PathLike[str], *, threads: int = 4,
               storage_options: dict[str, Any] | None = None,
               index_cache_entries: int = 65536, verify_checksums: bool = True,
               sample_index_cache_bytes: int = DEFAULT_CACHE_BYTES,
               shard_cache_dir: str | os.PathLike[str] | None = None,
               shard_cache_bytes: int = 0) -> CacheReader:
    """Open a cache read-only (local folder or fsspec URL).

    Raises CacheNotFoundError when nothing is there and CacheVersionError when the cache was
    written by a newer format version. `threads`: per-batch read parallelism; `storage_options`:
    for fsspec URLs; `index_cache_entries`: shard indexes kept (1 KB each at 64 samples per
    shard); `sample_index_cache_bytes`: decoded key / view-parameter chunks each `SampleIndex`
    keeps. `verify_checksums=False` skips the crc32c check of sample reads (shard indexes and
    the sample index are always checked): about 20-65 us per MB saved, by CPU (see
    checksum.py), corruption then goes unnoticed, so keep the default unless `verify()` ran
    on this copy of the cache.
    `shard_cache_dir` / `shard_cache_bytes`: a local folder of at most that many bytes that keeps
    whole token shard files of a remote cache (shard_cache.py; shared by the processes that
    name the same folder; ignored for a local cache, which is read in place). The reader
    remembers these settings (`CacheReader.settings`) for processes that reopen the cache.
    """
    location = os.fspath(path)
    settings = OpenSettings(threads=threads, storage_options=storage_options,
                            index_cache_entries=index_cache_entries,
                            verify_checksums=verify_checksums,
                            sample_index_cache_bytes=sample_index_cache_bytes,
                            shard_cache_dir=None if shard_cache_dir is None
                            else os.fspath(shard_cache_dir),
                            shard_cache_bytes=shard_cache_bytes)
    try:
        group = zarr.open_group(location, mode="r", zarr_format=3,
                                storage_options=read_store_options(
                                    location, settings.storage_options))
    except FileNotFoundError:
        raise CacheNotFoundError(f"{location}: no cache there",
                                 hint="build one with `dune-cache build`") from None
    except (ValueError, TypeError, KeyError) as exc:  # zarr.json is not JSON zarr can read
        raise CacheCorruptionError(
            f"{location}: the root zarr.json does not parse ({type(exc).__name__}: {exc})",
            hint="the cache's root metadata is damaged: restore zarr.json from a copy, or "
            "rebuild the cache") from None
    if ROOT_ATTR not in group.attrs:
        raise CacheNotFoundError(f"{location}: a zarr group without a {ROOT_ATTR!r} manifest",
                                 hint="this is not a dune-distill cache")
    check_manifest_sha(group.attrs, location)
    manifest = Manifest.from_dict(group.attrs[ROOT_ATTR], where=location)
    files = files_for(location, settings.storage_options)
    if settings.shard_cache_dir and isinstance(files, FsspecFiles):
        cache = DiskShardCache(settings.shard_cache_dir, settings.shard_cache_bytes,
                               cache_namespace(location, group.attrs.get(MANIFEST_SHA_ATTR)))
        files = CachedFiles(files, cache)
    fast = ShardReader(files, threads=threads,
                       index_cache_entries=index_cache_entries,
                       verify_checksums=verify_checksums)
    return CacheReader(group, manifest, location, fast, settings)


def _reopen(location: str, settings: OpenSettings) -> CacheReader:
    """Unpickling a reader: open the cache again, as the pickled reader was opened."""
    return open_cache(location, **settings.kwargs())


class CacheReader(MetadataReader):
    """Read-only view of a cache: its metadata (MetadataReader) and its tokens. Create it with
    `open_cache`; a pickled reader unpickles by opening the cache again with its `settings`."""

    def __init__(self, group: zarr.Group, manifest: Manifest, location: str,
                 fast: ShardReader, settings: OpenSettings | None = None) -> None:
        super().__init__(group, manifest, location, settings)
        self._fast = fast
        self._layouts: dict[tuple[str, str, str], ShardedLayout] = {}
        self._record_attrs: dict[tuple[str, str], Any] = {}  # the token arrays' RECORD_ATTR
        self._done: dict[tuple[str, str], bytearray] = {}
        self._plans: dict[tuple[str, tuple[str, ...] | None], ReadPlan] = {}
        self._buffers = BufferPool()
        self._pair_of_path: dict[str, tuple[str, str]] = {}
        fast.expected = self._expected_records

    def reopen(self) -> CacheReader:
        """A new reader of the same cache, opened with the same settings (e.g. in a worker)."""
        return _reopen(self.source, self.settings)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.source, self.settings))

    # -- files ------------------------------------------------------------------------------
    def lost_shard_files(self, dataset: str, teacher: str) -> list[int]:
        """Token shards of a pair whose done mark and index say they hold ok samples but whose
        file is gone (one existence check, a stat, per such shard; for the build's plan)."""
        lay, _ = self._records(dataset, teacher)
        done = self.pair_done(dataset, teacher)
        ok = self.index(dataset).status == STATUS_OK
        starts = np.arange(0, ok.size, self.manifest.samples_per_shard)
        holding = done & (np.add.reduceat(ok, starts) > 0 if ok.size else done)
        return [shard for shard in np.flatnonzero(holding).tolist()
                if not self._fast.files.exists(lay.shard_key(shard))]

    # -- tokens ------------------------------------------------------------------------------
    def _layout(self, dataset: str, teacher: str, name: str) -> ShardedLayout:
        key = (dataset, teacher, name)
        if key not in self._layouts:
            array = self._group[f"{layout.teacher_path(dataset, teacher)}/{name}"]
            label = f"dataset {dataset!r}, teacher {teacher!r}, array {name!r}"
            self._layouts[key] = ShardedLayout.from_array(array, label)  # type: ignore[arg-type]
            if name == layout.TOKENS:
                self._pair_of_path[self._layouts[key].path] = (dataset, teacher)
                # kept for `_records`: asking the group again would read zarr.json again
                self._record_attrs[(dataset, teacher)] = array.attrs.get(layout.RECORD_ATTR)
        return self._layouts[key]

    def _expected_records(self, lay: ShardedLayout, shard: int) -> np.ndarray | None:
        """The samples of a token shard that must have a stored record: those whose status is
        ok (the writer stores exactly those). Asked once per shard index the fast reader
        loads (fastread.ShardReader.expected)."""
        pair = self._pair_of_path.get(lay.path)
        if pair is None:
            return None
        start, stop = shards.shard_bounds(shard, self.num_samples(pair[0]),
                                          self.manifest.samples_per_shard)
        return self.index(pair[0]).status[start:stop] == STATUS_OK

    def _done_marks(self, dataset: str, teacher: str) -> bytearray:
        """The pair's done marks seen so far (1 = done; 0 = not seen done yet). A done mark is
        never unset while readers run, so a 1 is never read again."""
        key = (dataset, teacher)
        done = self._done.get(key)
        if done is None:
            # A complete pair: one read of its summary says every shard is done.
            mark = 1 if self.pair_complete(dataset, teacher) else 0
            done = self._done[key] = bytearray([mark]) * self.num_shards(dataset)
        return done

    def _require_done(self, dataset: str, teacher: str, samples: Sequence[int]) -> None:
        """Refuse samples of shards that were never completely written (no done mark)."""
        done = self._done_marks(dataset, teacher)
        sps = self.manifest.samples_per_shard
        for shard in {s // sps for s in samples}:
            if not done[shard]:
                if not self.pair_meta(dataset, teacher).done_mark(shard):
                    raise CacheNotFoundError(
                        f"{self.location}: {dataset}/{teacher} shard {shard} (samples from "
                        f"{shard * sps}) was never completely written",
                        hint="finish the build (`dune-cache build` resumes)")
                done[shard] = 1

    def _records(self, dataset: str, teacher: str
                 ) -> tuple[ShardedLayout, tuple[layout.RecordField, ...]]:
        """The pair's record array and fields, checked against what the manifest implies."""
        fp = self.manifest.teachers[teacher]
        lay = self._layout(dataset, teacher, layout.TOKENS)
        fields = layout.record_fields(self.encoding, fp.token_types, self.manifest.num_tokens,
                                      fp.dim)
        found = self._record_attrs[(dataset, teacher)]
        expected = layout.record_attr(fields)
        if found != expected or lay.sample_nbytes != expected["nbytes"]:
            raise CacheVersionError(
                f"{self.location}: {lay.label}: record layout {layout.RECORD_ATTR}={found!r} "
                f"differs from the expected {expected!r}",
                hint=FOREIGN_CACHE_HINT)
        return lay, fields

    def _plan(self, dataset: str, teachers: Sequence[str] | None) -> ReadPlan:
        """What a batch of `dataset` reads for `teachers` (None: all of its teachers), computed
        once per combination."""
        names = self.teachers_for(dataset) if teachers is None else tuple(teachers)
        key = (dataset, names)
        if key not in self._plans:
            parts, at = [], 0
            for teacher in names:
                self._check_pair(dataset, teacher)
                records, fields = self._records(dataset, teacher)
                where = {f.name: at + i for i, f in enumerate(fields)}
                toks = tuple(
                    TokenSlot(tok, where[tok], where.get(layout.scale_name(tok)),
                              *(self.calibration(dataset, teacher, tok) or (None, None)))
                    for tok in self.manifest.teachers[teacher].token_types)
                parts.append(PlanPart(teacher, records, fields, at, at + len(fields),
                                      self._done_marks(dataset, teacher), toks))
                at += len(fields)
            self._plans[key] = ReadPlan(key, self.num_samples(dataset),
                                        self.manifest.samples_per_shard, self.encoding,
                                        tuple(parts))
        if teachers is None:
            self._plans[(dataset, None)] = self._plans[key]
        return self._plans[key]

    def read_encoded(self, dataset: str, indices: Sequence[int] | np.ndarray,
                     teachers: Sequence[str] | None = None
                     ) -> dict[str, dict[str, EncodedTokens]]:
        """A batch of samples as stored: {teacher: {tok: EncodedTokens}} (CPU tensors).

        Rows follow `indices`. Samples whose status is not ok hold no tokens (zeros, which
        int8 decodes to the calibration mean): mask them with `index(dataset).ok`. Decode on
        any device with `EncodedTokens.decode()`. The batch arrays are recycled once the caller
        drops every tensor of the batch; so are a one-sample read's tensors and EncodedTokens
        objects, once the caller drops them and every view of them (readplan.SampleSlot).
        """
        # The random-access hot path: a few microseconds of Python per call are a tenth of a
        # sample's read time, so no per-call objects beyond what is returned, and one sample
        # (what a random-access trainer asks for) is read right here (docs/benchmarks.md).
        plan = self._plans.get((dataset, teachers if teachers is None else tuple(teachers)))
        if plan is None:
            plan = self._plan(dataset, teachers)
        if type(indices) is list and len(indices) == 1:
            sample = int(indices[0])
        else:
            if isinstance(indices, np.ndarray):
                samples = indices.reshape(-1).tolist()
            else:
                samples = [int(i) for i in indices]
            if len(samples) != 1:
                return self._read_batch(dataset, plan, samples)
            sample = samples[0]
        # One sample: into a prepared SampleSlot (its record buffers, tensors and
        # EncodedTokens made once), whose objects the result holds.
        if not 0 <= sample < plan.num_samples:
            self._out_of_range(dataset, plan, [sample])
        shard = sample // plan.samples_per_shard
        for teacher, _, _, _, _, done, _ in plan.parts:
            if not done[shard]:
                self._require_done(dataset, teacher, [sample])
        slot = self._buffers.get(plan, SampleSlot, SampleSlot.free)
        self._fast.read_records(sample, slot.targets)
        return slot.result()

    def _read_batch(self, dataset: str, plan: ReadPlan, samples: list[int]
                    ) -> dict[str, dict[str, EncodedTokens]]:
        """`read_encoded` of any number of samples but one, into recycled batch arrays."""
        if samples and (min(samples) < 0 or max(samples) >= plan.num_samples):
            self._out_of_range(dataset, plan, samples)
        sps = plan.samples_per_shard
        for teacher, _, _, _, _, done, _ in plan.parts:
            for sample in samples:
                if not done[sample // sps]:
                    self._require_done(dataset, teacher, samples)
                    break
        # One recycled set of output arrays for the whole batch: part by part, field by field.
        outs = self._buffers.get((plan, len(samples)), plan_outputs)
        self._fast.read(samples, [(records, outs[start:stop])
                                  for _, records, _, start, stop, _, _ in plan.parts])
        spec, make, tensor = plan.spec, EncodedTokens._of, torch.from_numpy
        result: dict[str, dict[str, EncodedTokens]] = {}
        for teacher, _, _, _, _, _, toks in plan.parts:
            result[teacher] = {tok: make(
                tensor(outs[values]), None if scale is None else tensor(outs[scale]), spec,
                mean, std) for tok, values, scale, mean, std in toks}
        return result

    @staticmethod
    def _out_of_range(dataset: str, plan: ReadPlan, samples: Sequence[int]) -> None:
        raise ConfigError(f"dataset {dataset}: sample indices must be in "
                          f"[0, {plan.num_samples}), found {min(samples)}..{max(samples)}")

    def fill_shard_cache(self, dataset: str, shard: int,
                         teachers: Sequence[str] | None = None) -> bool:
        """Fetch the token shard files of `shard` of `dataset` (for `teachers`, default all of
        the dataset's) into the local shard cache, ahead of the reads that need them (a
        prefetcher calls this). False, doing nothing, when the reader has no shard cache."""
        fill = getattr(self._fast.files, "fill", None)
        if fill is None:
            return False
        names = self.teachers_for(dataset) if teachers is None else tuple(teachers)
        for teacher in names:
            self._check_pair(dataset, teacher)
            fill(self._layout(dataset, teacher, layout.TOKENS).shard_key(shard))
        return True

    def read_sample(self, dataset: str, i: int, teachers: Sequence[str] | None = None
                    ) -> dict[str, dict[str, torch.Tensor]]:
        """Sample `i` decoded to float32 on the CPU: {teacher: {tok: [T, D] or [D]}}."""
        batch = self.read_encoded(dataset, [i], teachers)
        return {t: {tok: enc.decode()[0] for tok, enc in toks.items()}
                for t, toks in batch.items()}

    def iter_shards(self, dataset: str, teacher: str) -> Iterator[ShardBlock]:
        """Decoded tokens shard by shard (one read per shard file), for sequential scans."""
        self._check_pair(dataset, teacher)
        lay, fields = self._records(dataset, teacher)
        by_name = {f.name: f for f in fields}
        n, sps = self.num_samples(dataset), self.manifest.samples_per_shard
        for shard in range(self.num_shards(dataset)):
            start, stop = shards.shard_bounds(shard, n, sps)
            self._require_done(dataset, teacher, [start])
            records = self._fast.read_shard(lay, shard, stop - start)
            tokens = {}
            for tok in self.manifest.teachers[teacher].token_types:
                scale_field = by_name.get(layout.scale_name(tok))
                scale = None if scale_field is None else torch.from_numpy(
                    field_array(records, scale_field))
                calib = self.calibration(dataset, teacher, tok) or (None, None)
                tokens[tok] = EncodedTokens(torch.from_numpy(field_array(records, by_name[tok])),
                                            scale, self.encoding, *calib).decode()
            yield ShardBlock(shard, start, stop, tokens)

    def verify(self) -> VerifyReport:
        """Read every chunk of every array (metadata included), check every checksum and that
        the metadata agrees with the data (see verify.py). Never raises for damage found."""
        from cache_format.verify import verify_cache

        return verify_cache(self)

    def close(self) -> None:
        """Release open files and reader threads."""
        self._fast.close()
        super().close()
