"""Per-pair record of int8 values outside the calibrated range (encodings.INT8_Z_BOUND).

The int8 encoding is bounded whatever its calibration saw (out-of-range tokens fall back, see
encodings.py), but a calibration that does not fit the data still costs precision. The writer
counts, per token shard and token type, the values outside the calibrated range and the values
encoded, in the pair's `out_of_range` array (int64 [num_shards, 2 x token types], one chunk per
shard, written before the shard's done mark). `dune-cache info` shows the fraction and `verify`
reports a pair above encodings.OUT_OF_RANGE_LIMIT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import zarr

from cache_format import layout
from cache_format.encodings import OUT_OF_RANGE_LIMIT

if TYPE_CHECKING:
    from cache_format.reader import CacheReader

#: Array of a int8 pair: [outside, encoded] per token type, one row per token shard.
OUT_OF_RANGE = "out_of_range"


def create_array(group: zarr.Group, shards: int, token_types: tuple[str, ...]) -> None:
    """The pair's `out_of_range` array (rows of zeros until their shard is written)."""
    width = 2 * len(token_types)
    layout.plain_array(group, OUT_OF_RANGE, (shards, width), "int64", (1, width))


def shard_row(counts: Mapping[str, tuple[int, int]], token_types: tuple[str, ...]) -> np.ndarray:
    """One shard's row: (outside, encoded) per token type, in the teacher's token order."""
    return np.array([n for tok in token_types for n in counts[tok]], dtype=np.int64)


def pair_counts(group: zarr.Group, token_types: tuple[str, ...]
                ) -> dict[str, tuple[int, int]] | None:
    """{token type: (outside, encoded)} summed over the written shards of a pair's group, or
    None when the pair has no such array (fp16 / bf16, or a cache written before it existed)."""
    if OUT_OF_RANGE not in group:
        return None
    totals = np.asarray(group[OUT_OF_RANGE][:], dtype=np.int64).sum(axis=0)
    return {tok: (int(totals[2 * i]), int(totals[2 * i + 1]))
            for i, tok in enumerate(token_types)}


def reader_counts(reader: CacheReader, dataset: str, teacher: str
                  ) -> dict[str, tuple[int, int]] | None:
    """`pair_counts` of a pair of an open cache."""
    group = reader._group[layout.teacher_path(dataset, teacher)]
    return pair_counts(group, reader.manifest.teachers[teacher].token_types)  # type: ignore[arg-type]


def fractions(reader: CacheReader, dataset: str, teacher: str) -> dict[str, float]:
    """{token type: fraction of int8 values outside the calibrated range} ({} unless int8)."""
    counts = reader_counts(reader, dataset, teacher)
    return {tok: fraction(*c) for tok, c in (counts or {}).items()}


def fraction(outside: int, encoded: int) -> float:
    """outside / encoded (0 when nothing was encoded)."""
    return outside / encoded if encoded else 0.0


def problems(label: str, counts: Mapping[str, tuple[int, int]] | None) -> list[str]:
    """verify's findings: each token type whose out-of-range fraction exceeds the limit."""
    found = []
    for tok, (outside, encoded) in (counts or {}).items():
        if fraction(outside, encoded) > OUT_OF_RANGE_LIMIT:
            found.append(
                f"{label} {tok}: {outside} of {encoded} int8 values "
                f"({fraction(outside, encoded):.2%}) lie outside the calibrated range, expected "
                f"at most {OUT_OF_RANGE_LIMIT:.2%} (those tokens were encoded with the fallback "
                "gain; hint: calibrate on more samples, or transcode from an fp16 cache)")
    return found
