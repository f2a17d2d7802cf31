"""A dataset's sample index, read on demand: statuses in memory, keys and view parameters by chunk.

At DUNE's scale (about 128 M samples with 20 view parameters each) the whole index is several GB
per process, and an object array of Python strings is the classic fork trap: every DataLoader
worker that touches a key writes its refcount and so copies the page. So `SampleIndex` keeps in
memory only the statuses (1 byte per sample, a read-only numpy array whose pages stay shared
after a fork) and reads keys and view parameters when asked, one chunk at a time, straight from
the chunk files through `index_chunks.py` (zarr-python's `array[i]` costs about a
millisecond per call). A few decoded chunks stay in a small LRU bounded in bytes; key chunks are
kept as numpy `StringDType` arrays, so no Python object per key (or per sample) outlives a call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from cache_format import layout, shards
from cache_format.errors import (
    FOREIGN_CACHE_HINT,
    REPAIR_DAMAGED,
    VERIFY_HINT,
    CacheCorruptionError,
    CacheVersionError,
    ConfigError,
)
from cache_format.index_chunks import IndexChunks
from cache_format.locations import local_path
from cache_format.manifest import STATUS_OK
from cache_format.plainread import STRINGS, PlainArray
from cache_format.shard_cache import ShardCacheSpec

#: Default bound on the decoded chunks an index keeps (an estimate of their bytes).
DEFAULT_CACHE_BYTES = 8 << 20


class SampleIndex(IndexChunks):
    """A dataset's sample index: sample s is image s // V (key `key_of(s)`), view s % V.

    Statuses are read once (on first use) and kept: `status`, `ok`. Keys and view parameters are
    read on demand, one positional read and one crc32c check per chunk touched:
    `key_of(sample)`, `keys_of(images)`, `view_params_of(samples)`. `keys` and `view_params` load
    everything (whole arrays, not kept): for small caches and tools only. A chunk whose crc32c
    does not match raises CacheCorruptionError naming the dataset, array, chunk and file.

    The index pickles as what it needs to reopen its files (location, storage options, array
    layouts) and works in a forked child (DataLoader workers): locks are renewed after a fork.
    """

    def __init__(self, dataset: str, arrays: Mapping[str, PlainArray], *, views_per_image: int,
                 view_param_names: Sequence[str], location: str,
                 storage_options: Mapping[str, Any] | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, threads: int = 4,
                 source_fingerprint: str = "", shard_cache: ShardCacheSpec | None = None) -> None:
        self.dataset = dataset
        self.views_per_image = int(views_per_image)
        self.view_param_names = tuple(view_param_names)
        #: The algorithm of the source fingerprints in the rows ("" = the rows hold none).
        self.source_fingerprint = source_fingerprint
        # Absolute, so that a copy unpickled in another working directory finds the files.
        location = local_path(location) or location
        self.location = location
        self.storage_options = dict(storage_options) if storage_options else None
        self.cache_bytes = int(cache_bytes)
        self.threads = max(1, int(threads))
        #: The node's local shard cache (a remote cache): view rows are read through it.
        self.shard_cache = shard_cache
        self._arrays = dict(arrays)
        self._check_shapes()
        self._init_state()

    #: The arrays this index reads, by name (v1.V1SampleIndex reads version 1's).
    ARRAYS: tuple[str, ...] = (layout.KEY_OFFSETS, layout.KEY_UTF8, layout.INDEX_ROWS,
                               layout.STATUSES, layout.SUMMARY, layout.INDEX_META)
    #: The array whose length is the number of samples.
    STATUS_ARRAY = layout.STATUSES
    #: View rows, rewritten identically if ever (a repair replays the same views), travel with
    #: their token shard through the local shard cache; statuses and marks may change.
    CACHED = (layout.INDEX_ROWS,)

    @classmethod
    def from_group(cls, group: zarr.Group, dataset: str, *, num_samples: int | None = None,
                   **kwargs: Any) -> SampleIndex:
        """The index of the dataset group `group` (reads array metadata only, no chunk);
        `num_samples`, when given, is what the manifest says the arrays must hold."""
        arrays = {}
        for name in cls.ARRAYS:
            label = f"dataset {dataset!r}, array {name!r}"
            arrays[name] = PlainArray.from_array(group[name], label)  # type: ignore[arg-type]
        index = cls(dataset, arrays, **kwargs)
        if num_samples is not None and index.num_samples != num_samples:
            raise CacheVersionError(
                f"dataset {dataset!r} ({group.path}): {index.num_samples} index rows, the "
                f"manifest says {num_samples}",
                hint=FOREIGN_CACHE_HINT)
        return index

    def _init_state(self) -> None:
        self._status: np.ndarray | None = None
        self._init_io()

    def _check_shapes(self) -> None:
        offsets, text, rows, status = (self._arrays[n] for n in (
            layout.KEY_OFFSETS, layout.KEY_UTF8, layout.INDEX_ROWS, layout.STATUSES))
        n, v, p = status.shape[0], self.views_per_image, len(self.view_param_names)
        problem = ""
        if (offsets.dtype != np.uint64 or text.dtype != np.uint8 or rows.dtype != np.uint8
                or status.dtype != np.uint8):
            problem = (f"dtypes key_offsets {offsets.dtype}, key_utf8 {text.dtype}, index_rows "
                       f"{rows.dtype}, status {status.dtype}; expected uint64, then uint8")
        elif rows.shape != (n, self._row_nbytes) or len(status.shape) != 1:
            what = (f" and a {self.source_fingerprint} source fingerprint"
                    if self.source_fingerprint else " and no source fingerprint")
            problem = (f"index_rows {rows.shape} and status {status.shape}, expected "
                       f"({n}, {self._row_nbytes}) for {p} view parameters{what}")
        elif offsets.shape != (n // v + 1,) or n % v:
            problem = f"{offsets.shape[0]} key offsets for {n} samples at {v} views per image"
        if problem:
            raise CacheVersionError(f"dataset {self.dataset!r}: index arrays disagree: {problem}",
                                    hint=FOREIGN_CACHE_HINT)

    @property
    def _row_nbytes(self) -> int:
        return layout.index_row_nbytes(len(self.view_param_names), bool(self.source_fingerprint))

    # -- pickling and fork -------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Open files, locks and the chunk cache do not travel; statuses are read again on use.
        return {name: self.__dict__[name] for name in (
            "dataset", "views_per_image", "view_param_names", "location", "storage_options",
            "cache_bytes", "threads", "_arrays", "source_fingerprint", "shard_cache")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    # -- what callers use --------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Number of samples (images x views)."""
        return self._arrays[self.STATUS_ARRAY].shape[0]

    @property
    def num_images(self) -> int:
        """Number of images (keys)."""
        return self.num_samples // self.views_per_image

    @property
    def status(self) -> np.ndarray:
        """Per-sample status codes, uint8 [N] (read once, then kept; read-only)."""
        status = self._status
        if status is None:
            status = self._load_status()
            status.setflags(write=False)  # shared pages stay shared after a fork
            self._status = status
        return status

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the samples whose status is ok (their tokens are stored)."""
        return self.status == STATUS_OK

    def key_of(self, sample: int) -> str:
        """Image key of `sample`."""
        rows = self._rows([sample], self.num_samples, "sample")
        return self.keys_of(rows // self.views_per_image)[0]

    def fill_shard_cache(self, start: int, stop: int) -> bool:
        """Fetch the view-row chunks of samples [start, stop) (a token shard's) into the local
        shard cache, ahead of the reads that need them (a prefetcher calls this). False, doing
        nothing, without a shard cache."""
        cached = self._cached_files()
        rows = self._arrays.get(layout.INDEX_ROWS)
        stop = min(stop, self.num_samples)
        if cached is None or rows is None or stop <= start:
            return False
        per = rows.rows_per_chunk
        for chunk in range(start // per, (stop - 1) // per + 1):
            cached.fill(rows.chunk_key(chunk))
        return True

    def summary(self) -> np.ndarray | None:
        """The dataset's `summary` row [1, samples per status code] once its index is complete
        (finalize_index), else None. One read, not kept."""
        row = self._read_chunk(self._arrays[layout.SUMMARY], 0)[0]
        return None if int(row[0]) != layout.MARK_DONE else np.array(row)

    def shard_meta(self) -> np.ndarray:
        """Every index shard's metadata row, int64 [num_shards, 1 + C] (zeros: never written);
        one read per shard, for writers and tools."""
        return self._load(self._arrays[layout.INDEX_META])

    def _load_status(self) -> np.ndarray:
        summary = self.summary()
        if summary is not None:  # complete: the consolidated array, a few large chunks
            status = self._load(self._arrays[layout.STATUSES])
            counts = layout.index_meta_row(status, summary.size - 1)
            if not np.array_equal(counts, summary):
                raise CacheCorruptionError(
                    f"dataset {self.dataset!r}, array {layout.STATUSES!r}: the statuses count "
                    f"{counts[1:].tolist()} samples per status, the dataset's summary says "
                    f"{summary[1:].tolist()}",
                    hint=f"the cache is damaged: {REPAIR_DAMAGED}")
            return status
        rows = self._arrays[layout.INDEX_ROWS]
        out = np.empty(self.num_samples, dtype=np.uint8)
        column = rows.shape[1] - 1

        def fill(chunk: int) -> None:
            start, stop = shards.shard_bounds(chunk, self.num_samples, rows.rows_per_chunk)
            out[start:stop] = self._read_chunk(rows, chunk)[0][: stop - start, column]

        self._map(fill, list(range(rows.num_chunks)))
        return out

    def _offsets(self, images: np.ndarray) -> np.ndarray:
        """key_offsets[images] as int64 (one read per chunk touched)."""
        out = np.empty(images.size, dtype=np.int64)
        for block, where, local in self._by_chunk(self._arrays[layout.KEY_OFFSETS], images):
            out[where] = block[local]
        return out

    def _key_bytes(self, start: int, stop: int) -> bytes:
        """key_utf8[start:stop], from the (cached) chunks it spans."""
        text = self._arrays[layout.KEY_UTF8]
        per = text.rows_per_chunk
        parts = []
        for chunk in range(start // per, (stop - 1) // per + 1 if stop > start else 0):
            block = self._chunk(text, chunk)
            parts.append(block[max(start - chunk * per, 0) : stop - chunk * per].tobytes())
        return b"".join(parts)

    def _decode_key(self, raw: bytes, image: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CacheCorruptionError(
                f"dataset {self.dataset!r}, key of image {image}: not UTF-8 ({exc})",
                hint=VERIFY_HINT) from None

    def keys_of(self, images: Sequence[int] | np.ndarray) -> list[str]:
        """Keys of `images` (image indices, any order, repeats allowed), one read per chunk."""
        rows = self._rows(images, self.num_images, "image")
        starts, stops = self._offsets(rows), self._offsets(rows + 1)
        # Decoded in the text's order, so that each key_utf8 chunk is read once even when the
        # chunk cache holds only one (in the callers' random order, it was read per key).
        order = np.argsort(starts, kind="stable")
        keys: list[str] = [""] * rows.size
        for at, a, b, i in zip(order.tolist(), starts[order].tolist(), stops[order].tolist(),
                               rows[order].tolist(), strict=True):
            keys[at] = self._decode_key(self._key_bytes(a, b), i)
        return keys

    def view_params_of(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        """View parameters of `samples`, float32 [n, P] (a new array), one read per chunk."""
        rows = self._rows(samples, self.num_samples, "sample")
        p = len(self.view_param_names)
        out = np.empty((rows.size, p), dtype=np.float32)
        for block, where, local in self._by_chunk(self._arrays[layout.INDEX_ROWS], rows):
            out[where] = layout.unpack_view_params(block[local], p)
        return out

    def source_fingerprints_of(self, samples: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """Source fingerprints of `samples`' images, uint64 [n] (None when the dataset records
        none), one read per chunk."""
        return self.view_rows_of(samples)[1]

    def view_rows_of(self, samples: Sequence[int] | np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """(view parameters float32 [n, P], source fingerprints uint64 [n] or None when the
        dataset records none) of `samples`: both from the same rows, one read per chunk."""
        rows = self._rows(samples, self.num_samples, "sample")
        p = len(self.view_param_names)
        params = np.empty((rows.size, p), dtype=np.float32)
        prints = np.empty(rows.size, dtype=np.uint64) if self.source_fingerprint else None
        for block, where, local in self._by_chunk(self._arrays[layout.INDEX_ROWS], rows):
            picked = block[local]
            params[where] = layout.unpack_view_params(picked, p)
            if prints is not None:
                prints[where] = layout.unpack_fingerprints(picked, p)
        return params, prints

    @property
    def keys(self) -> np.ndarray:
        """Every key, StringDType [num_images]. Loads everything (not kept): prefer `keys_of`."""
        offsets = self._load(self._arrays[layout.KEY_OFFSETS]).astype(np.int64)
        text = self._load(self._arrays[layout.KEY_UTF8]).tobytes()
        return np.array([self._decode_key(text[a:b], i) for i, (a, b) in
                         enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))],
                        dtype=STRINGS)

    @property
    def view_params(self) -> np.ndarray:
        """Every view parameter row, float32 [N, P]. Loads everything (not kept): prefer
        `view_params_of`."""
        return layout.unpack_view_params(self._load(self._arrays[layout.INDEX_ROWS]),
                                         len(self.view_param_names))

    def verify(self) -> tuple[str, ...]:
        """Read every chunk of the index arrays (metadata included) and check that they agree:
        each written shard's statuses match its metadata row, a complete index's consolidated
        statuses match its rows. The problems found (empty when all is well)."""
        problems = list(self._verify_chunks())
        if problems:
            return tuple(problems)
        meta = self.shard_meta()
        rows = self._arrays[layout.INDEX_ROWS]
        status = np.zeros(self.num_samples, np.uint8)
        codes = meta.shape[1] - 1
        for shard in range(rows.num_chunks):
            start, stop = shards.shard_bounds(shard, self.num_samples, rows.rows_per_chunk)
            status[start:stop] = self._read_chunk(rows, shard)[0][: stop - start, -1]
            if meta[shard, 0] and not np.array_equal(
                    meta[shard], layout.index_meta_row(status[start:stop], codes)):
                problems.append(
                    f"dataset {self.dataset!r}, index shard {shard}: its rows hold statuses "
                    f"{np.bincount(status[start:stop], minlength=codes).tolist()}, its metadata "
                    f"row says {meta[shard, 1:].tolist()} (rows lost or damaged)")
        summary = self.summary()
        if summary is not None:
            consolidated = self._load(self._arrays[layout.STATUSES])
            if not (meta[:, 0] == layout.MARK_DONE).all():
                problems.append(f"dataset {self.dataset!r}: the index is marked complete but "
                                f"{int((meta[:, 0] == 0).sum())} index shard(s) have no metadata")
            elif not np.array_equal(consolidated, status):
                problems.append(f"dataset {self.dataset!r}: the consolidated statuses differ "
                                "from the index rows")
            elif not np.array_equal(summary, layout.index_meta_row(status, codes)):
                problems.append(f"dataset {self.dataset!r}: the summary's status counts "
                                f"{summary[1:].tolist()} differ from the statuses")
        return tuple(problems)

    def _verify_chunks(self) -> tuple[str, ...]:
        """Read every chunk of every index array; the damaged ones."""
        problems: list[str] = []

        def check(job: tuple[PlainArray, int]) -> None:
            try:
                self._read_chunk(*job)
            except CacheCorruptionError as exc:
                problems.append(str(exc))

        jobs = [(array, c) for array in self._arrays.values() for c in range(array.num_chunks)]
        self._map(check, jobs)
        return tuple(sorted(problems))

    # -- reading -----------------------------------------------------------------------------
    def _rows(self, wanted: Sequence[int] | np.ndarray, limit: int, what: str) -> np.ndarray:
        rows = np.asarray(wanted).reshape(-1)
        if rows.size and rows.dtype.kind not in "iu":
            raise ConfigError(f"dataset {self.dataset}: {what} indices must be integers, found "
                              f"dtype {rows.dtype}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= limit):
            raise ConfigError(f"dataset {self.dataset}: {what} indices must be in [0, {limit}), "
                              f"found {int(rows.min())}..{int(rows.max())}")
        return rows

    def _chunk_required(self, array: PlainArray, chunk: int) -> bool:
        """Whether chunk `chunk` of `array` must exist (asked only when its file is missing).

        Keys are written when the dataset is added; an index shard's rows before its metadata
        row (its done mark); the consolidated statuses before the summary. None of them can
        equal the fill value once written (a written status is never 0, "pending"), so a
        missing one was lost, never skipped by zarr."""
        name = array.path.rsplit("/", 1)[-1]
        if name in (layout.KEY_UTF8, layout.KEY_OFFSETS):
            return True
        if name == layout.STATUSES:
            return self.summary() is not None
        if name == layout.INDEX_ROWS:
            if self.summary() is not None:
                return True
            meta = self._read_chunk(self._arrays[layout.INDEX_META], chunk)[0]
            return int(meta[0, 0]) == layout.MARK_DONE
        return False

    def _fix_hint(self, array: PlainArray, chunk: int) -> str:
        """How to repair a damaged chunk of `array` (the end of the error's hint)."""
        if array.path.endswith(f"/{layout.INDEX_ROWS}"):
            return REPAIR_DAMAGED
        return "rebuild the cache, or `dune-cache upgrade` again if it was upgraded"


