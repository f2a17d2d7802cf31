"""Where everything lives in a cache: group paths, array names, shapes and codec pipelines.

    /                                   root group, attribute "dune_cache" = manifest
    datasets/<dataset>/                 one group per dataset
        key            str   [num_images]           image keys, source order
        view_params    f32   [N, P]                 P = len(manifest.view_param_names)
        status         u8    [N]                    manifest.status_codes
        index_done     u8    [num_shards]           1 = index shard written
        teachers/<teacher>/             one group per (dataset, teacher)
            tokens     u8    [N, R]                 one record of R bytes per sample (below);
                                                    sharded: shard = S samples, chunk = 1 sample
            <tok>_calib_mean / <tok>_calib_std  f32 [D]   int8 only: standardization
            done       u8    [num_shards]           1 = shard written completely
            stats/<tok>_part_{count,mean,m2}        per-shard partial statistics
            stats/<tok>_{count,mean,m2}, stats/final   merged statistics, final = 1 when written

A sample's record holds everything a trainer reads for one (sample, teacher), so a random read is
one byte range and one checksum: the fields `patch_scale` f32 [T] and `cls_scale` f32 [] (int8
only), then `patch` [T, D] and `cls` [D] in the stored dtype, back to back, little endian, C
order (widest items first, so every field is aligned to its item size). The `tokens` array's
attribute "dune_record" lists the fields with their dtype, shape and byte offset.

N = num_images * views_per_image samples; sample s is image s // V, view s % V. Every chunk
carries a crc32c checksum; per-shard arrays have one chunk (= one store object) per shard so
concurrent writers of different shards never touch the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache_format.encodings import EncodingSpec

DATASETS = "datasets"
TEACHERS = "teachers"
STATS = "stats"
KEY = "key"
VIEW_PARAMS = "view_params"
STATUS = "status"
INDEX_DONE = "index_done"
DONE = "done"
FINAL = "final"
TOKENS = "tokens"
#: Attribute of the `tokens` array that lists the record's fields.
RECORD_ATTR = "dune_record"
#: Keys per chunk of the `key` array (variable-length strings; the reader reads the chunks it
#: needs, see sample_index.py).
KEY_CHUNK = 1 << 16


def dataset_path(dataset: str) -> str:
    """Group path of a dataset."""
    return f"{DATASETS}/{dataset}"


def teacher_path(dataset: str, teacher: str) -> str:
    """Group path of a (dataset, teacher) pair."""
    return f"{DATASETS}/{dataset}/{TEACHERS}/{teacher}"


def scale_name(tok: str) -> str:
    """Record field holding the per-token int8 scales of token type `tok`."""
    return f"{tok}_scale"


def calib_names(tok: str) -> tuple[str, str]:
    """Calibration (mean, std) array names of token type `tok`."""
    return f"{tok}_calib_mean", f"{tok}_calib_std"


def stats_names(tok: str, *, partial: bool) -> tuple[str, str, str]:
    """(count, mean, m2) array paths, relative to the teacher group, of `tok`'s statistics."""
    kind = "part_" if partial else ""
    return tuple(f"{STATS}/{tok}_{kind}{q}" for q in ("count", "mean", "m2"))  # type: ignore[return-value]


@dataclass(frozen=True)
class RecordField:
    """One field of a sample's record: `shape` items of `dtype` (little endian) at `offset`."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        """Bytes of the field in one record."""
        count = 1
        for n in self.shape:
            count *= n
        return count * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        """The field as stored in the "dune_record" attribute."""
        return {"name": self.name, "dtype": self.dtype.str, "shape": list(self.shape),
                "offset": self.offset}


def record_fields(spec: EncodingSpec, token_types: tuple[str, ...], num_tokens: int,
                  dim: int) -> tuple[RecordField, ...]:
    """The fields of one sample's record, in their order in the record.

    int8 scales (float32) come first, then the token values (patch, then cls): widest items
    first, so each field sits at a multiple of its item size.
    """
    shapes = {"patch": (num_tokens, dim), "cls": (dim,)}
    order = [tok for tok in ("patch", "cls") if tok in token_types]
    wanted: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    if spec.has_scale:
        wanted += [(scale_name(tok), np.dtype("<f4"), shapes[tok][:-1]) for tok in order]
    wanted += [(tok, spec.stored_dtype.newbyteorder("<"), shapes[tok]) for tok in order]
    fields, offset = [], 0
    for name, dtype, shape in wanted:
        field = RecordField(name, dtype, shape, offset)
        fields.append(field)
        offset += field.nbytes
    return tuple(fields)


def record_nbytes(fields: tuple[RecordField, ...]) -> int:
    """Bytes of one record."""
    return sum(f.nbytes for f in fields)


def record_attr(fields: tuple[RecordField, ...]) -> dict[str, Any]:
    """The "dune_record" attribute of a `tokens` array."""
    return {"nbytes": record_nbytes(fields), "fields": [f.to_json() for f in fields]}


def num_shards(num_samples: int, samples_per_shard: int) -> int:
    """Number of shards covering `num_samples` (the last one may be partial)."""
    return -(-num_samples // samples_per_shard)


def shard_bounds(shard: int, num_samples: int, samples_per_shard: int) -> tuple[int, int]:
    """[start, stop) sample range of `shard`."""
    start = shard * samples_per_shard
    return start, min(start + samples_per_shard, num_samples)


def token_compressors(spec: EncodingSpec, dtype: np.dtype) -> list[Any]:
    """Bytes-to-bytes codecs of one record chunk: the optional lossless codec, then crc32c.

    blosc's shuffle works on items of `dtype` (the token values' dtype, not the record's
    uint8), so bitshuffle groups the bits of fp16/bf16 values as it would on a float array.
    """
    codecs: list[Any] = []
    if spec.codec == "zstd":
        codecs.append(ZstdCodec(level=spec.level))
    elif spec.codec == "blosc":
        codecs.append(BloscCodec(cname="zstd", clevel=spec.level, shuffle="bitshuffle",
                                 typesize=dtype.itemsize))
    codecs.append(Crc32cCodec())
    return codecs


def _plain(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any,
           chunks: tuple[int, ...]) -> zarr.Array:
    """An unsharded array with crc32c on each chunk and fill value 0."""
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                              compressors=[Crc32cCodec()], fill_value=0)


def _sharded(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any,
             samples_per_shard: int, compressors: list[Any]) -> zarr.Array:
    """Shard = `samples_per_shard` samples along axis 0, inner chunk = one sample."""
    return group.create_array(
        name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
        shards=(samples_per_shard, *shape[1:]), compressors=compressors, fill_value=0,
    )


def create_index_arrays(group: zarr.Group, num_images: int, views_per_image: int,
                        samples_per_shard: int, num_view_params: int) -> None:
    """Create a dataset group's `key`, `view_params`, `status` and `index_done` arrays."""
    n = num_images * views_per_image
    group.create_array(KEY, shape=(num_images,), dtype=str,
                       chunks=(min(KEY_CHUNK, num_images),), compressors=[Crc32cCodec()])
    _plain(group, VIEW_PARAMS, (n, num_view_params), "float32",
           (samples_per_shard, max(1, num_view_params)))
    _plain(group, STATUS, (n,), "uint8", (samples_per_shard,))
    _plain(group, INDEX_DONE, (num_shards(n, samples_per_shard),), "uint8", (1,))


def create_teacher_arrays(group: zarr.Group, spec: EncodingSpec, num_samples: int,
                          num_tokens: int, dim: int, token_types: tuple[str, ...],
                          samples_per_shard: int) -> None:
    """Create the record, calibration, done-mark and statistics arrays of one pair."""
    n, s = num_samples, samples_per_shard
    shards = num_shards(n, s)
    fields = record_fields(spec, token_types, num_tokens, dim)
    tokens = _sharded(group, TOKENS, (n, record_nbytes(fields)), "uint8", s,
                      token_compressors(spec, spec.stored_dtype))
    tokens.attrs[RECORD_ATTR] = record_attr(fields)
    stats = group.require_group(STATS)
    for tok in token_types:
        if spec.has_scale:
            for name in calib_names(tok):
                _plain(group, name, (dim,), "float32", (dim,))
        part_count, part_mean, part_m2 = (p.split("/", 1)[1]
                                          for p in stats_names(tok, partial=True))
        _plain(stats, part_count, (shards,), "int64", (1,))
        _plain(stats, part_mean, (shards, dim), "float64", (1, dim))
        _plain(stats, part_m2, (shards, dim), "float64", (1, dim))
        count, mean, m2 = (p.split("/", 1)[1] for p in stats_names(tok, partial=False))
        _plain(stats, count, (1,), "int64", (1,))
        _plain(stats, mean, (dim,), "float64", (dim,))
        _plain(stats, m2, (dim,), "float64", (dim,))
    _plain(stats, FINAL, (1,), "uint8", (1,))
    _plain(group, DONE, (shards,), "uint8", (1,))
