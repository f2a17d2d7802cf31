"""Where everything lives in a cache (format version 2): group paths, array names, shapes, codecs.

    /                                   root group, attribute "dune_cache" = manifest
    datasets/<dataset>/                 one group per dataset
        key_utf8     u8  [B]                    every key's UTF-8 bytes, back to back
        key_offsets  u64 [num_images + 1]       key i = key_utf8[key_offsets[i]:key_offsets[i+1]]
        index_rows   u8  [N, 4P (+ 8) + 1]      per sample: view params f32 [P], its image's
                                                content fingerprint u64 (datasets whose manifest
                                                entry names a source_fingerprint algorithm),
                                                then status u8; one chunk (= object) per shard
        index_meta   i64 [num_shards, 1 + C]    per index shard: [1 = written, samples per status
                                                code]; one row per object, written last (done mark)
        statuses     u8  [N]                    consolidated statuses (chunks of STATUS_CHUNK),
        summary      i64 [1 + C]                [1 = index complete, samples per status code];
                                                both written by finalize_index, summary last
        teachers/<teacher>/             one group per (dataset, teacher)
            tokens     u8    [N, R]             one record of R bytes per sample (below);
                                                sharded: shard = S samples, chunk = 1 sample
            <tok>_calib_mean / <tok>_calib_std  f32 [D]   int8, int4, int4h: standardization
            shard_meta f64   [num_shards, W]    per token shard: [1 = written, ok samples, per
                                                token type (count, mean [D], m2 [D]), then per
                                                token type (int8 values outside the calibrated
                                                range, values encoded)]; one row per object,
                                                written last (the done mark)
            summary    f64   [W]                same columns merged over shards; column 0 is 1
                                                (every shard merged) or 2 (only the done ones);
                                                written by finalize_stats

C = len(manifest.status_codes). A finished (dataset, shard) or (pair, shard) is two objects: its
data and its metadata row. Readers of a complete cache read the consolidated arrays (statuses,
summary), so what a trainer reads at start grows with datasets and pairs, not shards.

A sample's record holds everything a trainer reads for one (sample, teacher), so a random read is
one byte range and one checksum: the fields `patch_scale` f32 [T] and `cls_scale` f32 [] (int8; int4
and int4h: f16 [T, G] and [G], G = ceil(D / 128)), then `patch` [T, D] and `cls` [D] in the stored
dtype (int4, int4h: u8 [T, ceil(D/2)] and [ceil(D/2)], two values per byte), back to back, little
endian, C order (widest items first, so every field is aligned to its item size). The `tokens`
array's attribute "dune_record" lists the fields with their dtype, shape and byte offset.

N = num_images * views_per_image samples; sample s is image s // V, view s % V. Every chunk
carries a crc32c checksum; per-shard arrays have one chunk (= one store object) per shard so
concurrent writers of different shards never touch the same object. Keys are bytes + offsets
rather than a zarr string array so that tensorstore's zarr3 driver reads them too. Version 1's
layout (read by v1.py, converted by upgrade.py) is described in docs/cache-format.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache_format.encodings import EncodingSpec
from cache_format.shards import num_shards
from cache_format.stats import ChannelStats

DATASETS = "datasets"
TEACHERS = "teachers"
KEY_UTF8 = "key_utf8"
KEY_OFFSETS = "key_offsets"
INDEX_ROWS = "index_rows"
INDEX_META = "index_meta"
STATUSES = "statuses"
SUMMARY = "summary"
TOKENS = "tokens"
SHARD_META = "shard_meta"
#: Attribute of the `tokens` array that lists the record's fields.
RECORD_ATTR = "dune_record"
#: Entries per chunk of `key_offsets` (the reader reads the chunks it needs, see sample_index.py).
KEY_CHUNK = 1 << 16
#: Bytes per chunk of `key_utf8`.
KEY_BYTES_CHUNK = 1 << 20
#: Samples per chunk of the consolidated `statuses` array: a 128 M-sample dataset is 31 objects.
STATUS_CHUNK = 1 << 22
#: Summary / metadata column 0 values.
MARK_DONE = 1
#: A pair summary merged from the done shards only (finalize_stats(allow_incomplete=True)).
MARK_PARTIAL = 2


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

    Scales come first (int8: float32 [T] / []; int4, int4h: float16 [T, G] / [G]), then the
    token values (patch, then cls; int4 packs two channels per byte, [T, ceil(D/2)]): widest
    items first, so each field sits at a multiple of its item size.
    """
    lead = {"patch": (num_tokens,), "cls": ()}
    order = [tok for tok in ("patch", "cls") if tok in token_types]
    wanted: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    if spec.has_scale:
        wanted += [(scale_name(tok), spec.scale_dtype, lead[tok] + spec.scale_shape(dim))
                   for tok in order]
    wanted += [(tok, spec.stored_dtype.newbyteorder("<"), lead[tok] + (spec.stored_dim(dim),))
               for tok in order]
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
                              compressors=[Crc32cCodec()], fill_value=0, overwrite=True)


def _sharded(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any,
             samples_per_shard: int, compressors: list[Any]) -> zarr.Array:
    """Shard = `samples_per_shard` samples along axis 0, inner chunk = one sample."""
    return group.create_array(
        name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
        shards=(samples_per_shard, *shape[1:]), compressors=compressors, fill_value=0,
    )


# -- the sample index ---------------------------------------------------------------------------
#: Bytes of a source image's content fingerprint in an index row (source_fingerprint.py).
FINGERPRINT_NBYTES = 8


def index_row_nbytes(num_view_params: int, fingerprinted: bool = False) -> int:
    """Bytes of one `index_rows` row: the view parameters as float32, the image's fingerprint
    (uint64, when the dataset records them), then the status byte (always last)."""
    return 4 * num_view_params + (FINGERPRINT_NBYTES if fingerprinted else 0) + 1


def pack_index_rows(view_params: np.ndarray, status: np.ndarray,
                    fingerprints: np.ndarray | None = None) -> np.ndarray:
    """`index_rows` rows of float32 [n, P] view parameters, uint8 [n] statuses and, for a
    dataset that records them, uint64 [n] fingerprints (each sample's image's)."""
    n, p = view_params.shape
    rows = np.empty((n, index_row_nbytes(p, fingerprints is not None)), dtype=np.uint8)
    rows[:, : 4 * p] = np.ascontiguousarray(view_params, dtype="<f4").view(np.uint8).reshape(n, -1)
    if fingerprints is not None:
        packed = np.ascontiguousarray(fingerprints, dtype="<u8").view(np.uint8).reshape(n, -1)
        rows[:, 4 * p : 4 * p + FINGERPRINT_NBYTES] = packed
    rows[:, -1] = status
    return rows


def unpack_fingerprints(rows: np.ndarray, num_view_params: int) -> np.ndarray:
    """The uint64 [n] source fingerprints held by `index_rows` rows of a fingerprinted dataset."""
    at = 4 * num_view_params
    raw = np.ascontiguousarray(rows[:, at : at + FINGERPRINT_NBYTES])
    return raw.view("<u8").reshape(rows.shape[0]).astype(np.uint64)


def unpack_view_params(rows: np.ndarray, num_view_params: int) -> np.ndarray:
    """The float32 [n, P] view parameters held by `index_rows` rows (a new array)."""
    raw = np.ascontiguousarray(rows[:, : 4 * num_view_params])
    return raw.view("<f4").reshape(rows.shape[0], num_view_params).astype(np.float32)


def index_meta_row(status: np.ndarray, num_codes: int) -> np.ndarray:
    """An `index_meta` row (or a dataset `summary`): [MARK_DONE, samples per status code]."""
    counts = np.bincount(np.asarray(status, dtype=np.int64), minlength=num_codes)
    return np.concatenate([[MARK_DONE], counts]).astype(np.int64)


def create_index_arrays(group: zarr.Group, keys_nbytes: int, num_images: int,
                        views_per_image: int, samples_per_shard: int, num_view_params: int,
                        num_codes: int, fingerprinted: bool = False) -> None:
    """Create a dataset group's key, index-row, metadata, status and summary arrays
    (`fingerprinted`: the rows hold each image's source fingerprint)."""
    n = num_images * views_per_image
    _plain(group, KEY_UTF8, (keys_nbytes,), "uint8", (max(1, min(KEY_BYTES_CHUNK, keys_nbytes)),))
    _plain(group, KEY_OFFSETS, (num_images + 1,), "uint64", (min(KEY_CHUNK, num_images + 1),))
    width = index_row_nbytes(num_view_params, fingerprinted)
    _plain(group, INDEX_ROWS, (n, width), "uint8", (samples_per_shard, width))
    _plain(group, INDEX_META, (num_shards(n, samples_per_shard), 1 + num_codes), "int64",
           (1, 1 + num_codes))
    _plain(group, STATUSES, (n,), "uint8", (min(STATUS_CHUNK, n),))
    _plain(group, SUMMARY, (1 + num_codes,), "int64", (1 + num_codes,))


# -- a pair's metadata rows ---------------------------------------------------------------------
@dataclass(frozen=True)
class PairColumns:
    """The columns of a pair's `shard_meta` rows and `summary`: [mark, ok samples, then per token
    type count, mean [D], m2 [D], then per token type the int8 values outside the calibrated
    range and the values encoded (zeros for other encodings)] as float64 (counts are exact up
    to 2^53). Everything a finished token shard says about itself is this one row, one store
    object, so a (pair, shard) stays two objects: its data and its row."""

    token_types: tuple[str, ...]
    dim: int

    @property
    def width(self) -> int:
        """Columns of one row."""
        return 2 + len(self.token_types) * (1 + 2 * self.dim) + 2 * len(self.token_types)

    def row(self, mark: int, ok: int, stats: Mapping[str, ChannelStats],
            out_of_range: Mapping[str, tuple[int, int]] | None = None) -> np.ndarray:
        """One row: `mark` (MARK_DONE / MARK_PARTIAL), `ok` samples, each token type's stats and
        its (outside, encoded) int8 value counts (None: zeros)."""
        parts = [np.array([mark, ok], dtype=np.float64)]
        for tok in self.token_types:
            s = stats[tok]
            parts += [np.array([s.count], dtype=np.float64), s.mean, s.m2]
        counts = out_of_range or {}
        parts.append(np.array([n for tok in self.token_types for n in counts.get(tok, (0, 0))],
                              dtype=np.float64))
        return np.concatenate(parts).astype(np.float64)

    def out_of_range(self, row: np.ndarray) -> dict[str, tuple[int, int]]:
        """{token type: (int8 values outside the calibrated range, values encoded)} of a row."""
        at = self.width - 2 * len(self.token_types)
        return {tok: (int(row[at + 2 * i]), int(row[at + 2 * i + 1]))
                for i, tok in enumerate(self.token_types)}

    def parse(self, row: np.ndarray) -> tuple[int, int, dict[str, ChannelStats]]:
        """(mark, ok samples, {tok: ChannelStats}) of a row (mark 0: never written)."""
        stats, at, d = {}, 2, self.dim
        for tok in self.token_types:
            stats[tok] = ChannelStats(int(row[at]), np.array(row[at + 1 : at + 1 + d]),
                                      np.array(row[at + 1 + d : at + 1 + 2 * d]))
            at += 1 + 2 * d
        return int(row[0]), int(row[1]), stats


def create_teacher_arrays(group: zarr.Group, spec: EncodingSpec, num_samples: int,
                          num_tokens: int, dim: int, token_types: tuple[str, ...],
                          samples_per_shard: int) -> None:
    """Create the record, calibration, shard-metadata and summary arrays of one pair."""
    n, s = num_samples, samples_per_shard
    fields = record_fields(spec, token_types, num_tokens, dim)
    tokens = _sharded(group, TOKENS, (n, record_nbytes(fields)), "uint8", s,
                      token_compressors(spec, spec.stored_dtype))
    tokens.attrs[RECORD_ATTR] = record_attr(fields)
    if spec.has_scale:
        for tok in token_types:
            for name in calib_names(tok):
                _plain(group, name, (dim,), "float32", (dim,))
    create_pair_meta_arrays(group, num_shards(n, s), PairColumns(token_types, dim).width)


def create_pair_meta_arrays(group: zarr.Group, shards: int, width: int) -> None:
    """The pair's `shard_meta` [shards, width] (a row per object) and `summary` [width]."""
    _plain(group, SHARD_META, (shards, width), "float64", (1, width))
    _plain(group, SUMMARY, (width,), "float64", (width,))
