"""Stored bytes of a cache's parts, before they are written: what `dune-cache build` plans with.

Counts every chunk a build writes, as zarr stores it with codec none: each sample's record chunk
(layout.record_fields) with its crc32c, each shard's index (16 bytes per sample slot and a crc32c),
each shard's metadata row, the summaries, the calibration (int8, int4, int4h) and the dataset's
index (keys, index rows, consolidated statuses). With codec none and every image ok that is exact;
skipped images store no record, so it is then an upper bound. Not counted: the zarr.json documents
(about 1 kB per array, under 10 arrays per pair), which do not grow with the data.
With `zstd` or `blosc` the estimate assumes no gain from the codec (nor its frame header of a
dozen bytes per chunk): on transformer-like activations (cache_format.testing) zstd stores int8
records 1.06x smaller, fp16 1.08x and bf16 1.27x, so the estimate is then a slight overestimate
for int8 and fp16 and an upper bound for bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cache_format import layout
from cache_format.encodings import EncodingSpec
from cache_format.manifest import STATUS_CODES, TOKEN_TYPES

#: zarr's framing with codec none: a crc32c after every chunk, and 16 bytes (offset, length)
#: per chunk slot in a shard's index.
_CRC32C = 4
_INDEX_SLOT = 16


def _chunk(nbytes: int) -> int:
    """Stored bytes of one uncompressed chunk of `nbytes` bytes."""
    return nbytes + _CRC32C


def _chunked(nbytes: int, chunk_nbytes: int) -> int:
    """Stored bytes of an array of `nbytes` bytes in chunks of `chunk_nbytes` (edge padded)."""
    chunks = -(-nbytes // chunk_nbytes) if nbytes else 0
    return chunks * _chunk(chunk_nbytes)


@dataclass(frozen=True)
class Footprint:
    """Stored bytes of a part of the cache (codec none, zarr.json documents aside)."""

    per_sample: int  # a sample's record chunk (0 for the index: its chunks are per shard)
    per_shard: int  # what each shard adds whatever its samples (rows, shard index, metadata)
    fixed: int  # written once (summaries, calibration; the index's keys and statuses)

    def nbytes(self, samples: int, shards: int, *, fixed: bool = True) -> int:
        """Bytes of `samples` ok samples in `shards` shards (plus the fixed part if `fixed`)."""
        return samples * self.per_sample + shards * self.per_shard + (self.fixed if fixed else 0)


def bytes_per_sample(spec: EncodingSpec, num_tokens: int, dim: int,
                     token_types: Sequence[str] = TOKEN_TYPES) -> int:
    """Stored bytes of one sample of one teacher (its record chunk and crc32c, codec none):
    e.g. a ViT-L/14 at 448 px (1024 patch tokens + cls, D = 1024) takes 2,099,204 bytes in
    fp16, 1,053,704 in int8 and 541,204 in int4 / int4h."""
    fields = layout.record_fields(spec, tuple(token_types), num_tokens, dim)
    return _chunk(layout.record_nbytes(fields))


def pair_footprint(spec: EncodingSpec, token_types: Sequence[str], num_tokens: int, dim: int,
                   samples_per_shard: int) -> Footprint:
    """One (dataset, teacher) pair: a record chunk per sample; per shard its shard index and
    metadata row; once its summary and (int8, int4, int4h) calibration."""
    tokens = tuple(token_types)
    row = _chunk(8 * layout.PairColumns(tokens, dim).width)
    calibration = 2 * len(tokens) * _chunk(4 * dim) if spec.has_scale else 0
    shard_index = samples_per_shard * _INDEX_SLOT + _CRC32C
    return Footprint(per_sample=bytes_per_sample(spec, num_tokens, dim, tokens),
                     per_shard=shard_index + row, fixed=row + calibration)


def index_footprint(keys: Sequence[str], views_per_image: int, samples_per_shard: int,
                    num_view_params: int, fingerprinted: bool = True) -> Footprint:
    """A dataset's index: per shard its rows (full chunks, even the last shard's) and metadata
    row; once its keys (bytes and offsets), consolidated statuses and summary. The builder's
    rows hold source fingerprints (`fingerprinted`)."""
    codes = len(STATUS_CODES)
    rows = _chunk(samples_per_shard * layout.index_row_nbytes(num_view_params, fingerprinted))
    key_bytes = sum(len(k.encode("utf-8")) for k in keys)
    samples = len(keys) * views_per_image
    fixed = (_chunked(key_bytes, min(layout.KEY_BYTES_CHUNK, max(1, key_bytes)))
             + _chunked(8 * (len(keys) + 1), 8 * min(layout.KEY_CHUNK, len(keys) + 1))
             + _chunked(samples, min(layout.STATUS_CHUNK, samples)) + _chunk(8 * (1 + codes)))
    return Footprint(per_sample=0, per_shard=rows + _chunk(8 * (1 + codes)), fixed=fixed)
