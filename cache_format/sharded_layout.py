"""ShardedLayout: where a zarr v3 sharded array keeps each sample, read from its metadata.

The fast reader (fastread.py) reads shard files itself, so it must know what zarr wrote: one
sample per inner chunk, inner codecs `[bytes, zstd|blosc?, crc32c]`, the shard index at the end
with codecs `[bytes, crc32c]`, little-endian, the default chunk key encoding. `from_array`
checks exactly that and refuses any other pipeline (CacheVersionError), so a layout this
project does not write is never misread. The shard file format itself is described in
fastread.py and docs/cache-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from cache_format.errors import FOREIGN_CACHE_HINT, CacheVersionError


@dataclass(frozen=True)
class ShardedLayout:
    """What the fast reader needs to know about one sharded array (axis 0 = samples)."""

    label: str
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    samples_per_shard: int
    compressor: str
    fill_value: Any
    sample_nbytes: int = 0

    def __post_init__(self) -> None:
        # Precomputed: the hot read loop compares every chunk length against it.
        nbytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        object.__setattr__(self, "sample_nbytes", nbytes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (one inner chunk)."""
        return self.shape[1:]

    @property
    def index_nbytes(self) -> int:
        """Bytes of a shard index: 16 per inner chunk plus its 4-byte crc32c."""
        return 16 * self.samples_per_shard + 4

    def shard_key(self, shard: int) -> str:
        """Store key of shard file `shard` (default chunk key encoding, separator "/")."""
        return f"{self.path}/c/{shard}" + "/0" * (len(self.shape) - 1)

    @classmethod
    def from_array(cls, array: zarr.Array, label: str) -> ShardedLayout:
        """Read an array's metadata; refuse a codec pipeline this reader does not know."""
        meta = array.metadata
        codecs = list(meta.codecs)  # type: ignore[union-attr]
        problem = ""
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            problem = "expected one sharding_indexed codec"
        else:
            shard = codecs[0]
            inner = list(shard.codecs)
            index = list(shard.index_codecs)
            middle = inner[1:-1]
            if shard.index_location.value != "end":
                problem = "expected the shard index at the end"
            elif tuple(shard.chunk_shape) != (1, *array.shape[1:]):
                problem = f"expected one sample per inner chunk, found {shard.chunk_shape}"
            elif not (isinstance(inner[0], BytesCodec) and isinstance(inner[-1], Crc32cCodec)
                      and len(middle) <= 1
                      and all(isinstance(c, ZstdCodec | BloscCodec) for c in middle)):
                problem = f"expected inner codecs [bytes, zstd|blosc?, crc32c], found {inner}"
            elif not (len(index) == 2 and isinstance(index[0], BytesCodec)
                      and isinstance(index[1], Crc32cCodec)):
                problem = f"expected index codecs [bytes, crc32c], found {index}"
            elif (inner[0].endian is not None and inner[0].endian.value != "little") or (
                    index[0].endian is not None and index[0].endian.value != "little"):
                problem = "expected little-endian bytes codecs"
        if problem:
            raise CacheVersionError(f"{label} ({array.path}): unexpected zarr layout: {problem}",
                                    hint=FOREIGN_CACHE_HINT)
        compressor = "none"
        if middle:
            compressor = "zstd" if isinstance(middle[0], ZstdCodec) else "blosc"
        dtype = np.dtype(array.dtype).newbyteorder("<")
        layout = cls(label=label, path=array.path, shape=tuple(array.shape), dtype=dtype,
                     samples_per_shard=int(array.shards[0]),  # type: ignore[index]
                     compressor=compressor, fill_value=meta.fill_value)
        expected_key = meta.encode_chunk_key((1,) + (0,) * (len(array.shape) - 1))
        if layout.shard_key(1) != f"{array.path}/{expected_key}":
            raise CacheVersionError(f"{label}: unexpected chunk key encoding {expected_key!r}")
        return layout
