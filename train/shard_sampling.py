"""Shard-aware epoch order: a permutation of the cache's shards, shuffled within windows.

A cache stores `samples_per_shard` consecutive samples of a dataset in one object, and
`samples_per_shard` is a multiple of `views_per_image`, so a shard holds whole images: image i
of a dataset lies in shard `i // images_per_shard` (`Manifest.images_per_shard`). Drawn in image
order (`train.sampling`'s default), every sample of a batch comes from another shard: from an
object store, one ranged request each. `ShardWindowOrder` orders each stream (the whole mix
with `uniform`, one domain with `teacher_balanced`) so that consecutive samples come from few
shards:

1. every pass of the stream draws a permutation of the stream's shards (those holding at least
   one training image: held-out and unusable images are not in the item table);
2. the permutation is cut into windows of W consecutive shards;
3. the images of a window are shuffled together, and one usable view of each is drawn exactly as
   in image order (`train.image_order.pick_views`).

A pass reads every image of its stream once, so the epoch keeps image order's guarantees: every
image once per pass, domains balanced round-robin by `teacher_balanced`, the held-out split and
the views-per-image choice untouched. Blocks, ranks, padding and resume are the sampler's
(`ViewEpochSampler` with `order=ShardWindowOrder(...)`), so the order is deterministic, DDP
block-dealt and resumable mid-epoch the same way; `shard_window` joins the sampler's state, so
a run saved with one window refuses to resume with another.

Locality: W consecutive shards hold about `W x images_per_shard` images, so any run of that many
consecutive positions of a stream touches at most 2W shards (W when it starts on a window
boundary). The price is correlation: a batch mixes only the datasets of the shards in its
window. docs/training.md ("Shard-aware sampling") gives the window that makes batches
indistinguishable from image order for the demo mix, measured by
tests/benchmarks/bench_shard_sampling.py.

Memory: one table position per non-empty shard (`shard_start`, uint32: 4 bytes per shard, a
sixteenth of a byte per sample at 64 samples per shard). Drawing a pass holds the shard
permutation and one chunk of windows' images (about `PICK_CHUNK`, or one window when that is
larger), never a table of all samples.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from cache_format.errors import ConfigError
from train.image_order import PICK_CHUNK, ViewGroups, index_dtype, pick_views


class ShardedGroups(ViewGroups, Protocol):
    """What the shard order needs beyond `ViewGroups` (`train.item_table.ItemTable` has it):
    where each dataset's images begin in the table and in the whole mix, the table position
    where a range of a dataset's image indices begins, and each item's (dataset, sample)."""

    views_per_image: int
    image_offsets: np.ndarray  # int64 [datasets + 1]: table positions
    source_offsets: np.ndarray  # int64 [datasets + 1]: images of the mix, table or not

    def positions_before(self, dataset: int, indices: np.ndarray) -> np.ndarray: ...

    def locate_many(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def shard_starts(groups: ShardedGroups, per_shard: int) -> np.ndarray:
    """Table positions where each non-empty (dataset, shard) begins, then the number of images.

    Within a dataset the table lists images by ascending index, so a shard's training images
    are one contiguous range: shard k is `start[k] : start[k + 1]`. Computed per shard, never
    per image.
    """
    parts = []
    for d in range(len(groups.image_offsets) - 1):
        size = int(groups.source_offsets[d + 1] - groups.source_offsets[d])
        bounds = groups.positions_before(d, np.arange(0, size + per_shard, per_shard))
        bounds = np.minimum(bounds, int(groups.image_offsets[d + 1]))
        parts.append(bounds[:-1][bounds[:-1] < bounds[1:]])
    parts.append(np.array([groups.num_images]))
    return np.concatenate(parts).astype(index_dtype(groups.num_images + 1))


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The concatenation of `arange(s, s + n)` for each start s and size n (int64)."""
    total = int(sizes.sum())
    offsets = np.cumsum(sizes) - sizes
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - offsets, sizes)


class ShardWindowOrder:
    """Each pass: a permutation of the stream's shards, images shuffled within windows of
    `window` consecutive shards (see the module docstring). An `EpochOrder` for
    `train.sampling.ViewEpochSampler`."""

    def __init__(self, groups: ShardedGroups, images_per_shard: int, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(
                f"data.shard_window: expected a whole number of shards >= 1 (0 turns shard-aware "
                f"order off), found {window!r}"
            )
        if images_per_shard < 1:
            raise ConfigError(f"images_per_shard: expected >= 1, found {images_per_shard}",
                              hint="pass the cache's Manifest.images_per_shard")
        self.groups = groups
        self.window = window
        self.images_per_shard = int(images_per_shard)
        self.shard_start = shard_starts(groups, self.images_per_shard)

    @property
    def num_shards(self) -> int:
        """Shards holding at least one image of the table."""
        return len(self.shard_start) - 1

    def fingerprint(self) -> dict[str, Any]:
        """The window fixes the order beside the sampler's settings."""
        return {"shard_window": self.window}

    def locate_shards(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset id, shard within the dataset) of each dataset index in `items` (int64
        arrays): what a prefetcher fetches next, and what the tests check locality with."""
        dataset, sample = self.groups.locate_many(np.asarray(items, dtype=np.int64))
        return dataset, sample // self.groups.views_per_image // self.images_per_shard

    def stream(self, domain: int | None, out: np.ndarray, seed: int, epoch: int, tag: int,
               first_pass: int = 0) -> None:
        """Fill `out` with dataset indices of the images of `domain` (None: all), passes after
        passes (see `train.image_order.EpochOrder`)."""
        starts = self.shard_start[:-1]
        sizes = np.diff(self.shard_start).astype(np.int64)
        if domain is None:
            shards = np.arange(len(starts))
        else:
            shards = np.flatnonzero(self.groups.domain_of(starts.astype(np.int64)) == domain)
        if not len(shards):
            raise ConfigError(f"shard order: no shard holds an image of domain {domain}")
        length = len(out)
        have = 0
        pass_index = first_pass
        while have < length:
            rng = np.random.default_rng([seed, epoch, pass_index, tag])
            order = shards[rng.permutation(len(shards))]
            have = self._one_pass(starts[order], sizes[order], rng, out, have)
            pass_index += 1

    def _one_pass(self, starts: np.ndarray, sizes: np.ndarray, rng: np.random.Generator,
                  out: np.ndarray, have: int) -> int:
        """Write one pass over the shards (`starts`, `sizes`: in the pass's order) into
        `out[have:]` until it is full; returns the new fill. Windows are shuffled a chunk of
        about PICK_CHUNK images at a time: one sort keyed by (window, random) shuffles every
        window of the chunk at once."""
        w = self.window
        window_sizes = np.add.reduceat(sizes, np.arange(0, len(sizes), w))
        window_ends = np.cumsum(window_sizes)
        first = 0
        while first < len(window_sizes) and have < len(out):
            done = int(window_ends[first - 1]) if first else 0
            last = max(first + 1,
                       int(np.searchsorted(window_ends, done + PICK_CHUNK, side="right")))
            images = _ranges(starts[first * w : last * w], sizes[first * w : last * w])
            # Key = (window in the chunk, 40 random bits): a chunk has at most PICK_CHUNK
            # windows (2**16), so the key fits 56 bits. A stable sort keeps equal keys in
            # place, so the order is the same on every machine whatever sort numpy picks.
            window_of = np.repeat(np.arange(last - first, dtype=np.uint64),
                                  window_sizes[first:last])
            keys = window_of << np.uint64(40) | rng.integers(0, 1 << 40, len(images),
                                                             dtype=np.uint64)
            images = images[np.argsort(keys, kind="stable")]
            take = min(len(images), len(out) - have)
            out[have : have + take] = pick_views(self.groups, images[:take], rng)
            have += take
            first = last
        return have
