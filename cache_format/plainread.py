"""Direct reads of whole chunks of plain (unsharded) zarr v3 arrays, checksums verified.

The sample index (`key`, `view_params`, `status`; see layout.py) is stored in plain arrays whose
chunks span every column: chunk `c` is the store object `<array>/c/<c>` (`/0` appended per
further axis). It holds the whole chunk, an edge chunk padded to the full chunk shape, encoded by
`bytes` (little endian) or `vlen-utf8` (a uint32 count, then per item a uint32 length and the
UTF-8 bytes), followed by the crc32c of those bytes (4 bytes little endian). A chunk that equals
the fill value is not stored and reads as the fill value, as in zarr. zarr-python's `array[i]`
costs about a millisecond per call; `read_chunk` reads the same bytes with one positional read
(vlen chunks: one read of the whole file) and one checksum pass. `ChunkCache` keeps a few decoded
chunks, bounded in bytes.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import zarr
from numcodecs import VLenUTF8
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.codecs.vlen_utf8 import VLenUTF8Codec

from cache_format import shards
from cache_format.checksum import crc32c_value
from cache_format.errors import (
    FOREIGN_CACHE_HINT,
    VERIFY_HINT,
    CacheCorruptionError,
    CacheVersionError,
)
from cache_format.files import Files

#: How decoded strings are kept: numpy's variable-width strings hold no Python object per item.
STRINGS = np.dtypes.StringDType()
_VLEN = VLenUTF8()


@dataclass(frozen=True)
class PlainArray:
    """Where one unsharded array's chunks live and how they decode (axis 0 = rows)."""

    label: str  # for messages: "dataset 'ds', array 'view_params'"
    path: str  # store path of the array
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype  # little-endian stored dtype; STRINGS for vlen-utf8 strings
    fill_value: Any

    @property
    def vlen(self) -> bool:
        """Whether chunks are vlen-utf8 strings (else fixed-size items)."""
        return self.dtype.kind == "T"

    @property
    def rows_per_chunk(self) -> int:
        """Rows (along axis 0) per chunk."""
        return self.chunk_shape[0]

    @property
    def num_chunks(self) -> int:
        """Chunks along axis 0 (each spans every column)."""
        return shards.num_shards(self.shape[0], self.rows_per_chunk)

    @property
    def chunk_nbytes(self) -> int:
        """Encoded bytes of one fixed-size chunk, checksum excluded."""
        return math.prod(self.chunk_shape) * self.dtype.itemsize

    def chunk_key(self, chunk: int) -> str:
        """Store key of chunk `chunk` (default chunk key encoding, separator "/")."""
        return f"{self.path}/c/{chunk}" + "/0" * (len(self.shape) - 1)

    def fill_chunk(self) -> np.ndarray:
        """A decoded chunk holding only the fill value (what a chunk never stored reads as)."""
        block = np.full((self.rows_per_chunk, *self.shape[1:]), self.fill_value, self.dtype)
        block.setflags(write=False)
        return block

    @classmethod
    def from_array(cls, array: zarr.Array, label: str) -> PlainArray:
        """Read an array's metadata; refuse a layout this reader does not know."""
        meta = array.metadata
        codecs = list(meta.codecs)  # type: ignore[union-attr]
        string = bool(codecs) and isinstance(codecs[0], VLenUTF8Codec)
        tail = "/0" * (array.ndim - 1)
        problem = ""
        if array.shards is not None:
            problem = "expected an unsharded array"
        elif not (len(codecs) == 2 and isinstance(codecs[0], BytesCodec | VLenUTF8Codec)
                  and isinstance(codecs[1], Crc32cCodec)):
            problem = f"expected codecs [bytes or vlen-utf8, crc32c], found {codecs}"
        elif not string and codecs[0].endian is not None and codecs[0].endian.value != "little":
            problem = "expected a little-endian bytes codec"
        elif any(c < s for c, s in zip(array.chunks[1:], array.shape[1:], strict=True)):
            problem = f"expected chunks spanning every column, found chunks {array.chunks}"
        elif meta.encode_chunk_key((1,) + (0,) * (array.ndim - 1)) != f"c/1{tail}":
            problem = "expected the default chunk key encoding with separator '/'"
        if problem:
            raise CacheVersionError(f"{label} ({array.path}): unexpected zarr layout: {problem}",
                                    hint=FOREIGN_CACHE_HINT)
        dtype = STRINGS if string else np.dtype(array.dtype).newbyteorder("<")
        fill = "" if string else meta.fill_value
        return cls(label, array.path, tuple(array.shape), tuple(array.chunks), dtype,
                   0 if fill is None else fill)


#: `read_chunk`'s `required`: whether a missing chunk file is damage (a bool, or a function
#: asked only when the file is missing, so that the check costs nothing on the read path).
Required = bool | Callable[[], bool]


def read_chunk(files: Files, array: PlainArray, chunk: int, fix: str = "",
               required: Required = False) -> tuple[np.ndarray, int]:
    """Chunk `chunk` of `array` decoded to [rows_per_chunk, ...] (read-only; an edge chunk keeps
    its padding), and an estimate of the bytes it holds. `fix` ends the hint of the
    CacheCorruptionError raised for a damaged chunk (naming array, chunk and file).

    A chunk file that does not exist reads as the fill value (zarr stores no chunk equal to it)
    unless `required` says the metadata promises it was written: then it was lost, and that is
    a CacheCorruptionError too."""
    key = array.chunk_key(chunk)
    if array.vlen:
        raw = files.read_all(key)
        expected = None
    else:
        expected = array.chunk_nbytes + 4
        raw = files.read(key, 0, expected + 1)  # one byte more: a longer file is damage too
    if raw is None:  # never stored (all fill value, as zarr reads it) or lost
        if required if isinstance(required, bool) else required():
            _corrupt(files, array, chunk, "chunk file missing, though the metadata says it "
                     "was written", fix)
        block = array.fill_chunk()
        return block, block.nbytes
    if len(raw) < 4 or (expected is not None and len(raw) != expected):
        size = f"{expected} bytes" if expected is not None else "at least 4 bytes"
        _corrupt(files, array, chunk, f"chunk file of {len(raw)} bytes, expected {size}", fix)
    payload = memoryview(raw)[:-4]
    if crc32c_value(payload) != int.from_bytes(raw[-4:], "little"):
        _corrupt(files, array, chunk, "chunk checksum mismatch", fix)
    if not array.vlen:
        block = np.frombuffer(payload, dtype=array.dtype).reshape(array.chunk_shape)
        return (block[:, : array.shape[1]] if block.ndim > 1 else block), len(raw)
    try:
        strings = _VLEN.decode(payload)
    except Exception as exc:  # numcodecs' own errors vary; all mean a bad chunk
        _corrupt(files, array, chunk, f"chunk does not decode ({exc})", fix)
    if strings.shape != (array.rows_per_chunk,):
        _corrupt(files, array, chunk, f"chunk holds {strings.shape[0]} strings, expected "
                 f"{array.rows_per_chunk}", fix)
    block = strings.astype(STRINGS)  # the Python strings go away with `strings`
    block.setflags(write=False)
    return block, block.nbytes + len(raw)  # StringDType's nbytes leaves out its string arena


def _corrupt(files: Files, array: PlainArray, chunk: int, what: str, fix: str) -> NoReturn:
    start, stop = shards.shard_bounds(chunk, array.shape[0], array.rows_per_chunk)
    raise CacheCorruptionError(
        f"{array.label}, chunk {chunk} (rows {start}..{stop - 1}): {what} in chunk file "
        f"{files.describe(array.chunk_key(chunk))}",
        hint=VERIFY_HINT + (f"; {fix}" if fix else ""))


class ChunkCache:
    """Decoded chunks, least recently used evicted first, within a byte budget (an estimate;
    the newest chunk is always kept, so a chunk larger than the budget still caches)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        """The chunk cached under `key` (now the most recently used), or None."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, chunk: np.ndarray, cost: int) -> None:
        """Cache `chunk` (about `cost` bytes), evicting the least recently used over budget."""
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (chunk, cost)
            self.nbytes += cost
            while self.nbytes > self.max_bytes and len(self._entries) > 1:
                self.nbytes -= self._entries.popitem(last=False)[1][1]

    def chunks(self) -> list[np.ndarray]:
        """The cached chunks, least recently used first (for tests and memory accounting)."""
        with self._lock:
            return [chunk for chunk, _ in self._entries.values()]

    def after_fork(self) -> None:
        """In a forked child: a lock held by another parent thread would never be released."""
        self._lock = threading.Lock()
