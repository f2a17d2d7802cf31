"""How an epoch's streams order their images, and the helpers they share with the item table.

A sampler (`train.sampling.ViewEpochSampler`) asks its dataset for the items of each image
through `ViewGroups`, a chunk of images at a time, so that no per-image table has to exist
(`train.item_table.ItemTable` holds only its exceptions). A stream (the whole mix, or one
domain) is passes over its images; `ImageOrder` draws every pass as a fresh permutation,
shuffled in place inside the sampler's own output, then turns each image into one of its usable
views (`pick_views`) a `WORK_CHUNK` at a time. `train.shard_sampling.ShardWindowOrder` is the
other `EpochOrder`. Transients the size of a dataset live in mappings of their own
(`scratch_array`), so that a freed one goes back to the system.
"""

from __future__ import annotations

import math
import mmap
from typing import Any, Protocol

import numpy as np

#: Images of a shard-window order whose views are drawn at once (it fixes the order of draws:
#: see train/shard_sampling.py).
PICK_CHUNK = 1 << 16
#: Images handled at once where the chunk does not change any result (the image order's view
#: draws, the item table's build): small, so that the temporaries (int64, about ten at a time)
#: stay a few hundred kB whatever the dataset's size, and the allocator keeps no large
#: freed blocks.
WORK_CHUNK = 1 << 13


def scratch_array(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialized array in its own anonymous memory mapping, unmapped when the array
    (and every view of it) is freed.

    For transients the size of a dataset (a permutation, the global sequence of several ranks):
    glibc raises its mmap threshold after large frees (up to 32 MB), so a plain numpy array of
    a few MB is often carved from the heap, and once freed it stays in the process's RSS as a
    hole. A mapping of its own goes back to the system however the allocator is tuned."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(shape)
    dtype = np.dtype(dtype)
    buffer = mmap.mmap(-1, max(1, count * dtype.itemsize))
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def arange_into(out: np.ndarray) -> np.ndarray:
    """`out[:] = arange(len(out))`, a chunk at a time (no int64 array of out's length)."""
    for lo in range(0, len(out), WORK_CHUNK):
        out[lo : lo + WORK_CHUNK] = np.arange(lo, min(len(out), lo + WORK_CHUNK))
    return out


def index_dtype(count: int) -> np.dtype:
    """The unsigned dtype that holds indices in [0, count): uint32, or uint64 past 2**32."""
    return np.dtype(np.uint32 if count <= 2**32 else np.uint64)


class ViewGroups(Protocol):
    """What a sampler needs from a dataset: its items grouped by image.

    Images are numbered 0 .. num_images - 1 (their table position). The items of image i (its
    usable views) are the contiguous range `first_of(i) : first_of(i) + count_of(i)` of dataset
    indices; `domain_spans()` lists the runs of consecutive images of one domain (int64
    [spans, 3]: domain, first image, end), in ascending order. The methods take an int64 array
    of images and return int64 arrays, so that a sampler asks for a chunk at a time and no
    per-image table has to exist (`train.item_table.ItemTable` holds only its exceptions).
    Objects that carry the explicit per-image arrays instead (`image_first`, `image_count`,
    `image_domain`) are read through `ArrayGroups`.
    """

    @property
    def num_images(self) -> int: ...

    def first_of(self, images: np.ndarray) -> np.ndarray: ...

    def count_of(self, images: np.ndarray) -> np.ndarray: ...

    def domain_of(self, images: np.ndarray) -> np.ndarray: ...

    def domain_spans(self) -> np.ndarray: ...


class ArrayGroups:
    """`ViewGroups` over explicit per-image arrays `image_first`, `image_count` and
    `image_domain` (unsigned or int64 [num_images]; counts >= 1)."""

    def __init__(self, groups: Any) -> None:
        self.first = np.asarray(groups.image_first)
        self.count = np.asarray(groups.image_count)
        self.domain = np.asarray(groups.image_domain)

    @property
    def num_images(self) -> int:
        return len(self.first)

    def first_of(self, images: np.ndarray) -> np.ndarray:
        return self.first[images].astype(np.int64)

    def count_of(self, images: np.ndarray) -> np.ndarray:
        return self.count[images].astype(np.int64)

    def domain_of(self, images: np.ndarray) -> np.ndarray:
        return self.domain[images].astype(np.int64)

    def domain_spans(self) -> np.ndarray:
        d = self.domain.astype(np.int64)
        change = np.flatnonzero(d[1:] != d[:-1]) + 1
        starts = np.concatenate([[0], change]).astype(np.int64)
        ends = np.concatenate([change, [len(d)]]).astype(np.int64)
        return np.stack([d[starts], starts, ends], axis=1) if len(d) else np.zeros((0, 3), np.int64)


def view_groups(data: Any) -> ViewGroups:
    """`data` itself when it answers per chunk of images (`first_of`, ...), else its explicit
    per-image arrays read through `ArrayGroups`."""
    return data if hasattr(data, "first_of") else ArrayGroups(data)


def pick_views(groups: ViewGroups, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dataset indices (int64) of one view chosen uniformly among the usable views of each
    image."""
    counts = groups.count_of(images)
    offsets = np.floor(rng.random(len(images)) * counts).astype(np.int64)
    return groups.first_of(images) + np.minimum(offsets, counts - 1)


def _positions(spans: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The image at each rank of the concatenation of the runs `spans` (int64 [k, 2]: first,
    end)."""
    sizes = spans[:, 1] - spans[:, 0]
    before = np.cumsum(sizes) - sizes
    run = np.searchsorted(before, ranks, side="right") - 1
    return spans[run, 0] + ranks - before[run]


def _stream(groups: ViewGroups, spans: np.ndarray, out: np.ndarray, seed: int, epoch: int,
            tag: int, first_pass: int) -> None:
    """Fill `out` with dataset indices: passes over the images of the runs `spans` (int64
    [k, 2]), each a fresh permutation and view draw. A whole pass is shuffled in place inside
    `out` (the generator shuffles any 1-D array of any dtype with the same draws as
    `permutation`), then its images are replaced by their views a chunk at a time (the
    uniforms come out the same as in one call): drawing an epoch holds little beyond `out`."""
    n = int((spans[:, 1] - spans[:, 0]).sum())
    length = len(out)
    have = 0
    pass_index = first_pass
    while have < length:
        rng = np.random.default_rng([seed, epoch, pass_index, tag])
        # A whole pass is shuffled where it goes; a last, partial one (only its first images
        # are kept) in a transient of its own.
        whole = length - have >= n
        order = arange_into(out[have : have + n] if whole else scratch_array(n, index_dtype(n)))
        rng.shuffle(order)
        for start in range(0, min(n, length - have), WORK_CHUNK):
            ranks = order[start : start + WORK_CHUNK].astype(np.int64)
            picked = pick_views(groups, _positions(spans, ranks), rng)
            take = min(len(picked), length - have)
            out[have : have + take] = picked[:take]
            have += take
        pass_index += 1


class EpochOrder(Protocol):
    """How a stream of an epoch orders its images: the part of the sequence a sampler mode
    leaves open. `stream` fills `out` with dataset indices of the images of `domain` (None: of
    the whole mix), passes after passes from pass `first_pass` on, deterministic from `seed`,
    `epoch`, `tag` (the stream's slot) and the pass: every pass is a whole permutation of the
    stream's images, drawn from its own generator, so that any pass can be drawn alone. `out`
    may be a strided view. `fingerprint` is what else fixes the order (saved with the
    sampler's state and compared on resume)."""

    def stream(self, domain: int | None, out: np.ndarray, seed: int, epoch: int, tag: int,
               first_pass: int = 0) -> None: ...

    def fingerprint(self) -> dict[str, Any]: ...


class ImageOrder:
    """Every pass of a stream is a fresh permutation of its images (the default order)."""

    def __init__(self, groups: ViewGroups) -> None:
        self.groups = view_groups(groups)

    def stream(self, domain: int | None, out: np.ndarray, seed: int, epoch: int, tag: int,
               first_pass: int = 0) -> None:
        """See `EpochOrder.stream`."""
        spans = self.groups.domain_spans()
        if domain is not None:
            spans = spans[spans[:, 0] == domain]
        _stream(self.groups, spans[:, 1:], out, seed, epoch, tag, first_pass)

    def fingerprint(self) -> dict[str, Any]:
        """No shard window (states saved before the field existed read as the same)."""
        return {"shard_window": 0}
