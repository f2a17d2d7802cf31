"""How samples map to shards: `samples_per_shard` consecutive samples, the last shard partial.

The shard is the unit of writing (one unit of work of the builder, one object of data and one of
metadata per dataset or pair) and of sequential reading; both stages share this rule.
"""

from __future__ import annotations


def num_shards(num_samples: int, samples_per_shard: int) -> int:
    """Number of shards covering `num_samples` (the last one may be partial)."""
    return -(-num_samples // samples_per_shard)


def shard_bounds(shard: int, num_samples: int, samples_per_shard: int) -> tuple[int, int]:
    """[start, stop) sample range of `shard`."""
    start = shard * samples_per_shard
    return start, min(start + samples_per_shard, num_samples)
