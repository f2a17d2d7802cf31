"""Direct byte-range reads of single samples from zarr v3 shard files, checksums verified.

zarr-python's generic `array[i]` costs milliseconds per call on a sharded array (it re-reads the
shard index and runs an async codec pipeline for each call); a trainer needs thousands of random
samples per second. This module reads what zarr wrote, the same bytes, without that overhead:

- a shard file (codec `sharding_indexed`, index at the end) ends with its index: one
  (offset, nbytes) little-endian uint64 pair per inner chunk in C order of the inner chunk grid
  (2^64-1, 2^64-1 for a chunk that was never written or equals the fill value), followed by the
  index's crc32c (4 bytes little-endian);
- each inner chunk (one sample) is `[bytes, optional zstd|blosc, crc32c]`: the encoded bytes
  followed by their crc32c (4 bytes little-endian).

The index of each shard file is read once (verified, cached), then every sample is fetched with
one positional read (`os.preadv` scattering the chunk straight into the output arrays, one per
record field, for local files; fsspec `cat_file(path, start, end)` for URLs), on a small thread
pool for batches, and every chunk's crc32c is checked (checksum.py: the fastest crc32c here on
one thread; on the pool's threads, the fastest that releases the GIL). Missing chunks read as
the fill value, like zarr. A random read is one syscall and one checksum pass over the bytes
plus a few microseconds of Python, so the hot path avoids per-call objects and locks.
"""

from __future__ import annotations

import os
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numcodecs import Blosc, Zstd

from cache_format.checksum import crc32c_extend as _crc_extend
from cache_format.checksum import crc32c_value as _crc_value
from cache_format.checksum import threaded_crc32c_extend as _crc_extend_threaded
from cache_format.checksum import threaded_crc32c_value as _crc_value_threaded
from cache_format.errors import REPAIR_DAMAGED, CacheCorruptionError
from cache_format.files import Files, LocalFiles
from cache_format.sharded_layout import ShardedLayout

MISSING = np.uint64(2**64 - 1)
_MISSING_INT = 2**64 - 1
_EMPTY_ENTRY = struct.pack("<QQ", _MISSING_INT, _MISSING_INT)
_unpack_entry = struct.Struct("<QQ").unpack_from
_DECOMPRESSORS: dict[str, Any] = {"zstd": Zstd(), "blosc": Blosc()}

#: What `ShardReader.read` fills: (array, output arrays). Row r of every output array, in
#: order, receives the bytes of the r-th sample (a record's fields land straight in their own
#: C-contiguous arrays); the bytes of one row of all outputs together are the array's
#: `sample_nbytes`.
ReadTarget = tuple[ShardedLayout, Sequence[np.ndarray]]
#: What `ShardReader.read_records` fills: (array, scatter list [record buffer uint8 [1, R],
#: 4-byte checksum buffer], the chunk length of a stored uncompressed record, or -1 for a
#: compressed array),
#: made once by whoever keeps the buffers (readplan.SampleSlot).
RecordTarget = tuple[ShardedLayout, list[Any], int]
#: Live readers, reset in a forked child (see _reset_after_fork).
_READERS: weakref.WeakSet[ShardReader] = weakref.WeakSet()


class ShardReader:
    """Reads samples of sharded arrays through cached, verified shard indexes."""

    def __init__(self, files: Files, *, threads: int = 4, index_cache_entries: int = 65536,
                 verify_checksums: bool = True):
        self.files = files
        self.verify_checksums = verify_checksums
        self.threads = max(1, threads)
        self._local = isinstance(files, LocalFiles)
        self._index_capacity = index_cache_entries
        self._index_cache: dict[tuple[str, int], tuple[bytes, str]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        #: Which samples of a shard must have a stored chunk (bool [samples in the shard]), or
        #: None when unknown: the reader's index statuses. Asked once per shard index loaded,
        #: never per sample, so that "never written" and "written, then lost" differ at no
        #: cost on the hot path.
        self.expected: Callable[[ShardedLayout, int], np.ndarray | None] | None = None
        _READERS.add(self)

    def after_fork(self) -> None:
        """In a forked child (a DataLoader worker): threads and locks did not survive."""
        self._lock = threading.Lock()
        self._pool = None
        self.files.reinit_after_fork()

    def _corrupt(self, layout: ShardedLayout, shard: int, sample: int | None, what: str) -> None:
        where = f"sample {sample}" if sample is not None else f"shard {shard}"
        raise CacheCorruptionError(
            f"{layout.label}, {where}: {what} in shard file "
            f"{self.files.describe(layout.shard_key(shard))}",
            hint=f"the cache is damaged: {REPAIR_DAMAGED}",
        )

    def shard_index(self, layout: ShardedLayout, shard: int) -> tuple[bytes, str]:
        """The verified raw index of one shard file and the file's key (cached).

        The index is S little-endian (offset, nbytes) uint64 pairs; entry k decodes with
        struct.unpack_from("<QQ", index, 16 * k).
        """
        cache_key = (layout.path, shard)
        hit = self._index_cache.get(cache_key)  # lock-free hit: dict.get is atomic
        if hit is not None:
            return hit
        key = layout.shard_key(shard)
        tail = self.files.tail(key, layout.index_nbytes)
        if tail is None:  # zarr writes no file for a shard whose chunks all equal the fill
            index = _EMPTY_ENTRY * layout.samples_per_shard
        else:
            try:
                index = self._parse_index(layout, shard, *tail)
            except CacheCorruptionError:
                if not self._refetch(key):
                    raise
                tail = self.files.tail(key, layout.index_nbytes)
                if tail is None:
                    self._corrupt(layout, shard, None, "shard object vanished")
                index = self._parse_index(layout, shard, *tail)  # type: ignore[misc]
        self._check_expected(layout, shard, index, tail is None)
        with self._lock:
            self._index_cache[cache_key] = (index, key)
            while len(self._index_cache) > self._index_capacity:  # oldest first
                del self._index_cache[next(iter(self._index_cache))]
        return index, key

    def _refetch(self, key: str) -> bool:
        """Drop a damaged local copy of `key` so that the next read fetches it again (files
        with a local shard cache, shard_cache.CachedFiles); False when there is no copy to drop
        (the damage is the store's own)."""
        discard = getattr(self.files, "discard", None)
        if discard is None:
            return False
        discard(key)
        return True

    def _parse_index(self, layout: ShardedLayout, shard: int, raw: bytes, size: int) -> bytes:
        if len(raw) != layout.index_nbytes:
            self._corrupt(layout, shard, None, f"file of {size} bytes is shorter than its index")
        body = np.frombuffer(raw, dtype=np.uint8, count=layout.index_nbytes - 4)
        if _crc_value(body) != int.from_bytes(raw[-4:], "little"):
            self._corrupt(layout, shard, None, "shard index checksum mismatch")
        index = np.frombuffer(raw, dtype="<u8", count=2 * layout.samples_per_shard).reshape(-1, 2)
        present = index[:, 0] != MISSING
        ends = index[present, 0] + index[present, 1]
        if ends.size and int(ends.max()) > size - layout.index_nbytes:
            self._corrupt(layout, shard, None, "index points past the data (truncated file?)")
        return bytes(raw[:-4])

    def _check_expected(self, layout: ShardedLayout, shard: int, index: bytes,
                        absent: bool) -> None:
        """Refuse a shard whose index lacks a chunk that `expected` says was written: its
        file or record was lost (read as the fill value, it would decode as the calibration
        mean)."""
        if self.expected is None:
            return
        wanted = self.expected(layout, shard)
        if wanted is None:
            return
        entries = np.frombuffer(index, dtype="<u8").reshape(-1, 2)[: wanted.size, 0]
        lost = np.flatnonzero(wanted & (entries == MISSING))
        if lost.size:
            first = shard * layout.samples_per_shard + int(lost[0])
            what = ("shard file missing" if absent else
                    f"{lost.size} record(s) absent from the shard index (first: sample {first})")
            self._corrupt(layout, shard, None, f"{what}, though the index says "
                          f"{int(wanted.sum())} sample(s) of this shard are ok and were written")

    def read(self, samples: Sequence[int], targets: Sequence[ReadTarget]) -> None:
        """Fill the output arrays of every target with `samples`, verifying each chunk's crc32c.

        The batch hot path (one sample: `read_records`): one positional read and one checksum
        pass per sample and array, everything else kept to a few dict lookups.
        """
        cached_index = self._index_cache.get
        # One work item per present chunk: (layout, sample, key, offset, nbytes, row buffers).
        items: list[tuple[ShardedLayout, int, str, int, int, Sequence[np.ndarray]]] = []
        for lay, outs in targets:
            sps = lay.samples_per_shard
            for row, sample in enumerate(samples):
                shard, local = divmod(sample, sps)
                hit = cached_index((lay.path, shard))
                index, key = hit if hit is not None else self.shard_index(lay, shard)
                offset, nbytes = _unpack_entry(index, 16 * local)
                # One-row slices, not out[row]: on a 1-d array that would be a scalar copy.
                rows = [out[row : row + 1] for out in outs]
                if offset == _MISSING_INT:
                    _fill(rows, lay.fill_value)
                else:
                    items.append((lay, sample, key, offset, nbytes, rows))
        if not items:
            return
        if not self._local:
            self._run(items, self._read_remote)
            return
        token = self.files.begin()  # type: ignore[union-attr]
        try:
            self._run(items, self._read_local)
        finally:
            self.files.end(token)  # type: ignore[union-attr]

    def read_records(self, sample: int, targets: Sequence[RecordTarget]) -> None:
        """Fill each target's record buffer with sample `sample`, verifying its crc32c.

        The one-sample hot path (a random read through `CacheReader.read_encoded`), where a
        few microseconds of Python are a tenth of a small record's read: the common case, a
        stored uncompressed record of a local file, is one `os.preadv` into the prepared
        scatter list and one checksum pass; anything else (a missing or compressed chunk, a
        remote file, a short read or a checksum that does not match) goes through `read`,
        which reads again and names what is wrong.
        """
        if not self._local:
            self.read((sample,), [(lay, scatter[:1]) for lay, scatter, _ in targets])
            return
        cached_index = self._index_cache.get
        preadv = self.files.preadv  # type: ignore[union-attr]
        for lay, scatter, plain_nbytes in targets:
            shard, local = divmod(sample, lay.samples_per_shard)
            hit = cached_index((lay.path, shard))  # inlined shard_index() hit
            index, key = hit if hit is not None else self.shard_index(lay, shard)
            offset, nbytes = _unpack_entry(index, 16 * local)
            if (nbytes != plain_nbytes or preadv(key, scatter, offset) != nbytes
                    or (self.verify_checksums and _crc_value(scatter[0])
                        != int.from_bytes(scatter[1], "little"))):
                self.read((sample,), [(lay, scatter[:1])])

    def _run(self, items: list, work: Any) -> None:
        """`work(items, threaded)`, on the calling thread or split over the pool's."""
        if self.threads == 1 or len(items) < 2:
            work(items, False)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dune-cache-read")
        n_parts = min(self.threads, len(items))
        parts = [items[i::n_parts] for i in range(n_parts)]
        for future in [self._pool.submit(work, part, True) for part in parts]:
            future.result()

    def _read_local(self, items: list, threaded: bool) -> None:
        fd_of = self.files.fd  # type: ignore[union-attr]
        value, extend = ((_crc_value_threaded, _crc_extend_threaded) if threaded
                         else (_crc_value, _crc_extend))
        for layout, sample, key, offset, nbytes, rows in items:
            self._read_chunk(fd_of(key), layout, sample, offset, nbytes, rows, value, extend)

    def _read_chunk(self, fd: int | None, layout: ShardedLayout, sample: int, offset: int,
                    nbytes: int, rows: Sequence[np.ndarray], crc_value: Callable[[Any], int],
                    crc_extend: Callable[[int, Any], int]) -> None:
        """Read one local chunk into `rows` and check its crc32c (with `crc_value` and
        `crc_extend`: the calling thread's choice of implementation)."""
        if fd is None:
            self._corrupt(layout, sample // layout.samples_per_shard, sample,
                          "shard file vanished")
        if nbytes == layout.sample_nbytes + 4 and layout.compressor == "none":
            # Straight into the output rows, checksum into `crc`: no intermediate copy.
            crc = bytearray(4)
            ok = os.preadv(fd, [*rows, crc], offset) == nbytes  # type: ignore[arg-type]
            if ok and self.verify_checksums:
                check = crc_value(rows[0])
                for part in rows[1:]:
                    check = crc_extend(check, part)
                ok = check == int.from_bytes(crc, "little")
            if ok:
                return
            # Read again through the general path, which names what is wrong.
            verify = True
        else:
            verify = self.verify_checksums
        self._decode_chunk(layout, sample // layout.samples_per_shard, sample,
                           os.pread(fd, nbytes, offset), nbytes, rows, verify,  # type: ignore[arg-type]
                           crc_value)

    def _read_remote(self, items: list, threaded: bool) -> None:
        crc_value = _crc_value_threaded if threaded else _crc_value
        for layout, sample, key, offset, nbytes, rows in items:
            try:
                self._read_remote_chunk(layout, sample, key, offset, nbytes, rows, crc_value)
            except CacheCorruptionError:
                if not self._refetch(key):
                    raise
                # A fresh copy; its index again (a repaired shard may be laid out otherwise).
                shard, local = divmod(sample, layout.samples_per_shard)
                with self._lock:
                    self._index_cache.pop((layout.path, shard), None)
                index, _ = self.shard_index(layout, shard)
                offset, nbytes = _unpack_entry(index, 16 * local)
                if offset == _MISSING_INT:
                    _fill(rows, layout.fill_value)
                else:
                    self._read_remote_chunk(layout, sample, key, offset, nbytes, rows,
                                            crc_value)

    def _read_remote_chunk(self, layout: ShardedLayout, sample: int, key: str, offset: int,
                           nbytes: int, rows: Sequence[np.ndarray],
                           crc_value: Callable[[Any], int]) -> None:
        shard = sample // layout.samples_per_shard
        raw = self.files.read(key, offset, nbytes)
        if raw is None:
            self._corrupt(layout, shard, sample, "shard object vanished")
        self._decode_chunk(layout, shard, sample, raw, nbytes, rows,  # type: ignore[arg-type]
                           self.verify_checksums, crc_value)

    def _decode_chunk(self, layout: ShardedLayout, shard: int, sample: int, raw: bytes,
                      nbytes: int, rows: Sequence[np.ndarray], verify: bool = True,
                      crc_value: Callable[[Any], int] | None = None) -> None:
        """Verify one chunk's crc32c (unless `verify` is False; with `crc_value`, default the
        single-thread choice), decode it into `rows`."""
        if len(raw) != nbytes:
            self._corrupt(layout, shard, sample, f"short read ({len(raw)} of {nbytes} bytes)")
        payload = np.frombuffer(raw, dtype=np.uint8, count=nbytes - 4)
        if verify and (crc_value or _crc_value)(payload) != int.from_bytes(raw[-4:], "little"):
            self._corrupt(layout, shard, sample, "chunk checksum mismatch")
        if layout.compressor == "none":
            if payload.size != layout.sample_nbytes:
                self._corrupt(layout, shard, sample, f"chunk of {payload.size} bytes, "
                              f"expected {layout.sample_nbytes}")
            _scatter(payload, rows)
            return
        # Decompress straight into a lone output row, else into scratch, then split.
        flat = (rows[0].reshape(-1).view(np.uint8) if len(rows) == 1
                else np.empty(layout.sample_nbytes, dtype=np.uint8))
        try:
            decoded = _DECOMPRESSORS[layout.compressor].decode(payload, out=flat)
            ok = np.asarray(decoded).nbytes == layout.sample_nbytes
        except Exception as exc:  # the codec's own errors vary; all mean a bad chunk
            self._corrupt(layout, shard, sample, f"chunk does not decode ({exc})")
        if not ok:
            self._corrupt(layout, shard, sample, "chunk decodes to the wrong size")
        if len(rows) > 1:
            _scatter(flat, rows)

    def read_shard(self, layout: ShardedLayout, shard: int, count: int) -> np.ndarray:
        """All `count` samples of one shard from one read of its file (sequential scans)."""
        try:
            return self._read_shard(layout, shard, count)
        except CacheCorruptionError:
            if not self._refetch(layout.shard_key(shard)):
                raise
            return self._read_shard(layout, shard, count)

    def _read_shard(self, layout: ShardedLayout, shard: int, count: int) -> np.ndarray:
        out = np.empty((count, *layout.sample_shape), dtype=layout.dtype)
        key = layout.shard_key(shard)
        tail = self.files.tail(key, layout.index_nbytes)
        if tail is None:
            self._check_expected(layout, shard, _EMPTY_ENTRY * layout.samples_per_shard, True)
            out[...] = layout.fill_value
            return out
        index = self._parse_index(layout, shard, *tail)
        self._check_expected(layout, shard, index, False)
        raw = self.files.read(key, 0, tail[1])
        if raw is None or len(raw) != tail[1]:
            self._corrupt(layout, shard, None, "shard file changed while being read")
        for local in range(count):
            offset, nbytes = _unpack_entry(index, 16 * local)
            if offset == _MISSING_INT:
                out[local] = layout.fill_value
                continue
            sample = shard * layout.samples_per_shard + local
            self._decode_chunk(layout, shard, sample, raw[offset : offset + nbytes], nbytes,
                               [out[local : local + 1]])
        return out

    def stored_samples(self, layout: ShardedLayout, shard: int) -> int:
        """How many samples of shard `shard` have a stored chunk (0 when its file is absent)."""
        index = np.frombuffer(self.shard_index(layout, shard)[0], dtype="<u8").reshape(-1, 2)
        return int((index[:, 0] != MISSING).sum())

    def close(self) -> None:
        """Stop the thread pool and close cached files."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.files.close()


def _reset_after_fork() -> None:
    """Runs in a forked child: give every live reader fresh locks and no thread pool."""
    for reader in list(_READERS):
        reader.after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def _fill(rows: Sequence[np.ndarray], value: Any) -> None:
    """Set every byte of `rows` to the (uint8) fill value, as zarr reads a missing chunk."""
    for row in rows:
        row.reshape(-1).view(np.uint8)[:] = value


def _scatter(payload: np.ndarray, rows: Sequence[np.ndarray]) -> None:
    """Copy one sample's bytes into its output rows, in order."""
    at = 0
    for row in rows:
        flat = row.reshape(-1).view(np.uint8)
        flat[:] = payload[at : at + flat.size]
        at += flat.size
