"""Turning one shard's float tokens into the records and partial statistics the writer stores.

The writer checks what it is given (shapes, dtypes, finiteness of the valid rows, int8
calibration) before anything of a shard is written, then encodes the valid rows block by block
(bounding the float32 temporaries) into one uint8 record per sample (layout.record_fields), and
counts statistics over the decoded values, which is what a reader will see.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cache_format import layout
from cache_format.checksum import crc32c_value
from cache_format.encodings import (
    EncodingSpec,
    count_out_of_range,
    decode_tokens,
    encode_tokens,
)
from cache_format.errors import ConfigError, InvalidTokensError
from cache_format.manifest import TeacherFingerprint
from cache_format.stats import ChannelStats, merge

#: Samples encoded at once (bounds the float32 temporaries).
_ENCODE_BLOCK = 8
Calibration = Mapping[str, tuple[np.ndarray, np.ndarray]]


def encode_records(spec: EncodingSpec, fp: TeacherFingerprint, num_tokens: int,
                   arrays: Mapping[str, np.ndarray], valid: np.ndarray,
                   calibration: Calibration
                   ) -> tuple[np.ndarray, dict[str, ChannelStats], dict[str, tuple[int, int]]]:
    """uint8 records [n, R] of the valid rows of `arrays` (others stay zero, which zarr does
    not store), each token type's statistics of the decoded valid rows, and (int8) each token
    type's (values outside the calibrated range, values encoded)."""
    n = valid.shape[0]
    fields = {f.name: f for f in layout.record_fields(spec, fp.token_types, num_tokens, fp.dim)}
    records = np.zeros((n, layout.record_nbytes(tuple(fields.values()))), dtype=np.uint8)
    part_stats: dict[str, ChannelStats] = {}
    out_of_range: dict[str, tuple[int, int]] = {}
    for tok, x in arrays.items():
        calib = calibration[tok] if spec.has_scale else (None, None)
        values = _field_view(records, fields[tok])
        scale = (_field_view(records, fields[layout.scale_name(tok)]) if spec.has_scale
                 else None)
        stats = ChannelStats.empty(fp.dim)
        outside = encoded = 0
        for b in range(0, n, _ENCODE_BLOCK):
            rows = np.nonzero(valid[b : b + _ENCODE_BLOCK])[0] + b
            if rows.size == 0:
                continue
            v, s = encode_tokens(x[rows], spec, *calib)
            values[rows] = v
            if scale is not None:
                scale[rows] = s
                outside += count_out_of_range(x[rows], *calib)
                encoded += x[rows].size
            stats = merge(stats, ChannelStats.of(decode_tokens(v, s, spec, *calib)))
        part_stats[tok] = stats
        out_of_range[tok] = (outside, encoded)
    return records, part_stats, out_of_range


def _field_view(records: np.ndarray, field: layout.RecordField) -> np.ndarray:
    """The field `field` of every record in `records[n, R]`, as a writable [n, *shape] view."""
    raw = records[:, field.offset : field.offset + field.nbytes]
    return raw.view(field.dtype).reshape(records.shape[0], *field.shape)


def check_calibration(fp: TeacherFingerprint, calibration: Calibration | None) -> None:
    """int8, int4 and int4h need finite (mean, std [> 0]) [D] for every token type."""
    if calibration is None:
        raise ConfigError(f"teacher {fp.name}: int8, int4 and int4h need a calibration "
                          "{token type: (mean, std)}; see encodings.fit_calibration")
    for tok in fp.token_types:
        if tok not in calibration:
            raise ConfigError(f"teacher {fp.name}: calibration lacks token type {tok!r}")
        mean, std = (np.asarray(a, dtype=np.float32) for a in calibration[tok])
        if mean.shape != (fp.dim,) or std.shape != (fp.dim,):
            raise ConfigError(f"teacher {fp.name} calibration {tok}: expected mean/std of shape "
                              f"({fp.dim},), found {mean.shape} and {std.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ConfigError(f"teacher {fp.name} calibration {tok}: mean/std must be finite "
                              "and std > 0")


def check_tokens(dataset: str, teacher: str, shard: int, start: int, fp: TeacherFingerprint,
                  tokens: Mapping[str, np.ndarray], valid: np.ndarray,
                  num_tokens: int) -> dict[str, np.ndarray]:
    """Shapes, dtypes and finiteness of one shard's tokens; returns them as float32 arrays."""
    n = valid.shape[0]
    where = f"{dataset}/{teacher} shard {shard}"
    if set(tokens) != set(fp.token_types):
        raise InvalidTokensError(f"{where}: expected token types {sorted(fp.token_types)}, "
                                 f"found {sorted(tokens)}")
    arrays: dict[str, np.ndarray] = {}
    for tok in fp.token_types:
        x = np.asarray(tokens[tok])
        expected = (n, num_tokens, fp.dim) if tok == "patch" else (n, fp.dim)
        if x.shape != expected or not np.issubdtype(x.dtype, np.floating):
            raise InvalidTokensError(f"{where}: {tok} tokens must be float {expected}, found "
                                     f"{x.dtype} {x.shape}")
        x = np.asarray(x, dtype=np.float32)
        finite = np.isfinite(x.reshape(n, -1)).all(axis=1)
        bad = np.nonzero(valid & ~finite)[0]
        if bad.size:
            raise InvalidTokensError(
                f"{where}: {tok} tokens of sample(s) {(bad[:10] + start).tolist()} hold NaN or "
                "Inf; nothing was written for this shard",
                hint="check the teacher's precision (run it in float32) and the input image",
            )
        arrays[tok] = x
    return arrays


def shard_object(records: np.ndarray, samples_per_shard: int) -> bytes | None:
    """The bytes zarr's sharding codec writes for one shard of uncompressed records (inner
    codecs [bytes, crc32c], index [bytes, crc32c] at the end), or None when every record is
    zero (zarr stores no object then).

    zarr-python encodes inner chunks one by one through its async codec pipeline, about 1 ms
    per sample here; this builds the same object in one pass: each non-zero record followed by
    its crc32c, in sample order (zarr's Morton order of a one-column chunk grid), then the
    (offset, nbytes) little-endian uint64 index with 2^64-1 for records not stored, then the
    index's crc32c. `tests/test_cache_store.py` checks it byte for byte against zarr's output.
    """
    n, width = records.shape
    stored = np.flatnonzero(records.any(axis=1))
    if stored.size == 0:
        return None
    index = np.full((samples_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
    index[stored, 0] = np.arange(stored.size, dtype=np.uint64) * (width + 4)
    index[stored, 1] = width + 4
    body = bytearray((width + 4) * stored.size)
    view = memoryview(body)
    for k, row in enumerate(stored.tolist()):
        at = k * (width + 4)
        record = records[row]
        view[at : at + width] = record.data
        view[at + width : at + width + 4] = crc32c_value(record).to_bytes(4, "little")
    raw = index.tobytes()
    return bytes(body) + raw + crc32c_value(raw).to_bytes(4, "little")
