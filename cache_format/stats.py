"""Streaming per-channel statistics (count, mean, M2) with Chan et al.'s exact parallel merge.

Each shard writer computes the statistics of the tokens it wrote; merging partials in any order
gives the statistics of everything (up to float64 rounding), so a cache has exact per-channel
mean and std without a second pass over the data. M2 is the sum of squared deviations from the
mean; the (population) variance is M2 / count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Rows per block when computing statistics, so float64 temporaries stay a few tens of MB.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of `count` rows: `mean` and `m2` are float64 [D]."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def dim(self) -> int:
        """Number of channels."""
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        """Population variance per channel (M2 / count; zeros when count is 0)."""
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel."""
        return np.sqrt(np.maximum(self.var, 0.0))

    @classmethod
    def empty(cls, dim: int) -> ChannelStats:
        """Statistics of zero rows (the identity of `merge`)."""
        return cls(0, np.zeros(dim, np.float64), np.zeros(dim, np.float64))

    @classmethod
    def of(cls, x: np.ndarray) -> ChannelStats:
        """Statistics of the rows of `x[..., D]` (all leading axes pooled), in float64 blocks."""
        flat = np.asarray(x).reshape(-1, x.shape[-1])
        rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, flat.shape[1]))
        total = cls.empty(flat.shape[1])
        for start in range(0, flat.shape[0], rows_per_block):
            block = flat[start : start + rows_per_block]
            mean = block.mean(axis=0, dtype=np.float64)
            centered = block.astype(np.float64) - mean
            m2 = np.einsum("ij,ij->j", centered, centered)
            total = merge(total, cls(block.shape[0], mean, m2))
        return total


def merge(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    """Chan's merge: the statistics of the union of the rows behind `a` and `b`."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    count = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / count)
    return ChannelStats(count, mean, m2)


def merge_all(parts: Iterable[ChannelStats], dim: int) -> ChannelStats:
    """Merge any number of partial statistics (empty input gives `ChannelStats.empty(dim)`)."""
    total = ChannelStats.empty(dim)
    for part in parts:
        total = merge(total, part)
    return total
