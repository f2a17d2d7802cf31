"""Per-pair record of values outside the calibrated range (encodings.INT8_Z_BOUND) of the
calibrated encodings (int8, int4, int4h).

The int8 encoding is bounded whatever its calibration saw (out-of-range tokens fall back, see
encodings.py), but a calibration that does not fit the data still costs precision. The writer
counts, per token shard and token type, the values outside the calibrated range and the values
encoded, in the shard's metadata row (layout.PairColumns: no object of their own, so a finished
(pair, shard) stays two store objects); finalize_stats sums them into the pair's summary.
`dune-cache info` shows the fraction and `verify` reports a pair above
encodings.OUT_OF_RANGE_LIMIT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from cache_format.encodings import OUT_OF_RANGE_LIMIT

if TYPE_CHECKING:
    from cache_format.reader import CacheReader


def reader_counts(reader: CacheReader, dataset: str, teacher: str
                  ) -> dict[str, tuple[int, int]] | None:
    """{token type: (outside, encoded)} of a pair, from its summary once finalized (one read),
    else summed over its shards' metadata rows; None unless the encoding is calibrated."""
    if not reader.manifest.encoding.has_scale:
        return None
    meta = reader.pair_meta(dataset, teacher)
    summary = meta.summary()
    if summary is not None:
        return meta.columns.out_of_range(summary)
    totals: dict[str, tuple[int, int]] = {}
    for row in meta.rows():
        for tok, (outside, encoded) in meta.columns.out_of_range(row).items():
            before = totals.get(tok, (0, 0))
            totals[tok] = (before[0] + outside, before[1] + encoded)
    return totals


def fractions(reader: CacheReader, dataset: str, teacher: str) -> dict[str, float]:
    """{token type: fraction of values outside the calibrated range} ({} if not calibrated)."""
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
                f"{label} {tok}: {outside} of {encoded} values "
                f"({fraction(outside, encoded):.2%}) lie outside the calibrated range, expected "
                f"at most {OUT_OF_RANGE_LIMIT:.2%} (those tokens were encoded with the fallback "
                "gain; hint: calibrate on more samples, or transcode from an fp16 cache)")
    return found
