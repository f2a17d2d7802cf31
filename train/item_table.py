"""The item table of a training split: which cached samples are items, held by its exceptions.

Items are numbered dataset by dataset, then by sample index, so the usable views of one image are
consecutive items; the images with at least one usable view are numbered the same way (their
*table position*). At DUNE's scale (about 128 M samples, 6 views per image) even a per-image
table costs bytes per sample in the trainer and again in every DataLoader worker, and almost
every image has all its views usable. So the table is implicit: an image whose views are all
usable ("regular") costs nothing, and only the exceptions are kept:

- the images absent from the table (held out, or no usable view): `gone_shifted`, each one's
  index in the whole mix minus the number of absent images before it (4 bytes per absent image);
- the images with some views unusable ("partial"): their table position `part_position`, their
  usable views as a bit mask `part_views`, and where their items end `part_end` (about 9 bytes
  each), with `part_missing`, the running count of missing views before each.

Then the image at table position p starts at item `p x V - (views missing before p)` and holds
V items unless it is partial: `first_of`, `count_of` and `domain_of` answer for a chunk of
positions with a few binary searches over the exceptions, and `locate_many` inverts it. A run
with no failed view and no held-out image holds a few per-dataset numbers. Building reads the
usable views a chunk of images at a time (`ItemTable.from_rows`), so no array the size of the
dataset is made either. `image_first`, `image_count`, `image_domain`, `image_index` and
`image_views` materialize the explicit per-image arrays, on each call, for tests and tools.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cache_format.errors import ConfigError
from train.image_order import WORK_CHUNK, index_dtype

#: An image's usable views are a bit mask in one unsigned integer.
MAX_VIEWS_PER_IMAGE = 64
#: Usable views of `hi - lo` images of dataset d: bool [hi - lo, views], from (d, lo, hi).
UsableRows = Callable[[int, int, int], np.ndarray]


def _mask_dtype(views_per_image: int) -> np.dtype:
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                         if np.iinfo(t).bits >= views_per_image))


def kth_set_bits(masks: np.ndarray, k: np.ndarray, bits: int) -> np.ndarray:
    """The position of the k-th (0-based) set bit of each mask, from the least significant
    (int64; -1 where the mask has fewer than k + 1 set bits)."""
    masks = np.asarray(masks).astype(np.uint64)
    k = np.asarray(k, dtype=np.int64)
    out = np.full(masks.shape, -1, dtype=np.int64)
    seen = np.zeros(masks.shape, dtype=np.int64)
    for position in range(bits):
        bit = ((masks >> np.uint64(position)) & np.uint64(1)).astype(bool)
        out[bit & (seen == k)] = position
        seen += bit
    return out


@dataclass(frozen=True)
class ItemTable:
    """The items of the datasets of a split, held by their exceptions (see the module docstring).

    `image_offsets[d]:image_offsets[d + 1]` are dataset d's table positions,
    `item_offsets[d]:item_offsets[d + 1]` its items and `source_offsets[d]:source_offsets[d + 1]`
    its images in the whole mix (table or not); `dataset_domain[d]` is its domain id.
    """

    views_per_image: int
    num_domains: int
    dataset_domain: np.ndarray  # int64 [datasets]
    image_offsets: np.ndarray  # int64 [datasets + 1]
    item_offsets: np.ndarray  # int64 [datasets + 1]
    source_offsets: np.ndarray  # int64 [datasets + 1]
    gone_shifted: np.ndarray  # unsigned [absent images], non-decreasing
    part_position: np.ndarray  # unsigned [partial images], ascending
    part_views: np.ndarray  # mask dtype [partial images]
    part_end: np.ndarray  # unsigned [partial images]: each one's last item + 1
    part_missing: np.ndarray  # unsigned [partial images + 1]: views missing before each

    @classmethod
    def build(cls, usable: Sequence[np.ndarray], domains: Sequence[int], views_per_image: int,
              num_domains: int) -> ItemTable:
        """The table of datasets whose usable views are `usable[d]` (bool [images, views]) and
        whose domain ids are `domains[d]` (in [0, num_domains))."""
        v = int(views_per_image)
        for views in usable:
            if views.ndim != 2 or views.shape[1] != v:
                raise ConfigError(f"usable views: expected [images, {v}], found {views.shape}")
        return cls.from_rows([len(u) for u in usable], lambda d, lo, hi: usable[d][lo:hi],
                             domains, v, num_domains)

    @classmethod
    def from_rows(cls, sizes: Sequence[int], rows: UsableRows, domains: Sequence[int],
                  views_per_image: int, num_domains: int) -> ItemTable:
        """The table of datasets of `sizes[d]` images, whose usable views `rows` gives a chunk
        of images at a time (so that building holds no array of a dataset's size)."""
        v = int(views_per_image)
        if not 1 <= v <= MAX_VIEWS_PER_IMAGE:
            raise ConfigError(f"views_per_image: training reads 1 to {MAX_VIEWS_PER_IMAGE} views "
                              f"per image (a bit mask per image), found {v}")
        mask_dtype = _mask_dtype(v)
        bits = np.left_shift(np.ones(1, np.uint64), np.arange(v, dtype=np.uint64))
        source_offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        gone, partial, masks = [], [], []
        for d, n in enumerate(sizes):
            for lo in range(0, int(n), WORK_CHUNK):
                hi = min(int(n), lo + WORK_CHUNK)
                views = np.asarray(rows(d, lo, hi), dtype=bool).reshape(hi - lo, v)
                count = views.sum(axis=1)
                base = int(source_offsets[d]) + lo
                gone.append(np.flatnonzero(count == 0) + base)
                some = np.flatnonzero((count > 0) & (count < v))
                partial.append(some + base)
                masks.append(np.bitwise_or.reduce(views[some] * bits, axis=1).astype(mask_dtype))
        gone_at = np.concatenate(gone) if gone else np.zeros(0, np.int64)
        part_at = np.concatenate(partial) if partial else np.zeros(0, np.int64)
        part_views = np.concatenate(masks) if masks else np.zeros(0, mask_dtype)
        total = int(source_offsets[-1])
        # Table positions: an image's index in the mix minus the absent images before it.
        image_offsets = source_offsets - np.searchsorted(gone_at, source_offsets)
        part_position = part_at - np.searchsorted(gone_at, part_at)
        counts = np.bitwise_count(part_views).astype(np.int64)
        part_missing = np.concatenate([[0], np.cumsum(v - counts)])
        items = int(image_offsets[-1]) * v - int(part_missing[-1])
        item_dtype = index_dtype(items + 1)
        part_end = (part_position + 1) * v - part_missing[1:]
        missing_before = part_missing[np.searchsorted(part_position, image_offsets)]
        return cls(
            views_per_image=v, num_domains=int(num_domains),
            dataset_domain=np.asarray(domains, dtype=np.int64).reshape(len(sizes)),
            image_offsets=image_offsets.astype(np.int64),
            item_offsets=(image_offsets * v - missing_before).astype(np.int64),
            source_offsets=source_offsets,
            gone_shifted=(gone_at - np.arange(len(gone_at))).astype(index_dtype(total + 1)),
            part_position=part_position.astype(index_dtype(total + 1)),
            part_views=part_views,
            part_end=part_end.astype(item_dtype),
            part_missing=part_missing.astype(item_dtype),
        )

    # -- sizes ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.item_offsets[-1])

    @property
    def num_images(self) -> int:
        """Images with at least one usable view."""
        return int(self.image_offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays (what each process holding the table pays)."""
        return sum(getattr(self, name).nbytes for name in (
            "dataset_domain", "image_offsets", "item_offsets", "source_offsets", "gone_shifted",
            "part_position", "part_views", "part_end", "part_missing"))

    # -- per table position (the samplers' view: `train.image_order.ViewGroups`) -------------------
    def _partial(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rank among the partial images, whether the image is partial) of each position."""
        k = np.searchsorted(self.part_position, images)
        hit = np.zeros(len(k), dtype=bool)
        inside = k < len(self.part_position)
        hit[inside] = self.part_position[k[inside]] == images[inside]
        return k, hit

    def first_of(self, images: np.ndarray) -> np.ndarray:
        """The first item of the image at each table position (int64)."""
        images = np.asarray(images, dtype=np.int64)
        missing = self.part_missing[np.searchsorted(self.part_position, images)]
        return images * self.views_per_image - missing.astype(np.int64)

    def count_of(self, images: np.ndarray) -> np.ndarray:
        """How many usable views the image at each table position has (int64)."""
        images = np.asarray(images, dtype=np.int64)
        k, hit = self._partial(images)
        counts = np.full(len(images), self.views_per_image, dtype=np.int64)
        counts[hit] = np.bitwise_count(self.part_views[k[hit]])
        return counts

    def dataset_of(self, images: np.ndarray) -> np.ndarray:
        """The dataset id of the image at each table position (int64)."""
        return np.searchsorted(self.image_offsets, np.asarray(images, np.int64), side="right") - 1

    def domain_of(self, images: np.ndarray) -> np.ndarray:
        """The domain id of the image at each table position (int64)."""
        return self.dataset_domain[self.dataset_of(images)]

    def domain_spans(self) -> np.ndarray:
        """int64 [spans, 3]: (domain, first, end) runs of table positions, ascending."""
        lo, hi = self.image_offsets[:-1], self.image_offsets[1:]
        keep = hi > lo
        return np.stack([self.dataset_domain[keep], lo[keep], hi[keep]], axis=1)

    def index_of(self, images: np.ndarray) -> np.ndarray:
        """The index within its dataset of the image at each table position (int64)."""
        images = np.asarray(images, dtype=np.int64)
        mix = images + np.searchsorted(self.gone_shifted, images, side="right")
        return mix - self.source_offsets[self.dataset_of(images)]

    def positions_before(self, dataset: int, indices: np.ndarray) -> np.ndarray:
        """The table position of the first image of `dataset` whose index is >= each of
        `indices` (its end when none is): where a range of the dataset's images begins."""
        mix = np.asarray(indices, dtype=np.int64) + self.source_offsets[dataset]
        # Absent image j sits at mix index gone_shifted[j] + j.
        gone = self.gone_shifted.astype(np.int64) + np.arange(len(self.gone_shifted))
        return mix - np.searchsorted(gone, mix)

    # -- items ------------------------------------------------------------------------------
    def locate_many(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset id, sample index within the dataset) of each item (int64 arrays)."""
        r = np.asarray(items, dtype=np.int64)
        v = self.views_per_image
        if len(r) and (r.min() < 0 or r.max() >= len(self)):
            raise IndexError(f"items out of range [0, {len(self)})")
        image, view = r // v, r % v
        if len(self.part_position):
            # j: the partial images whose items all end at or before r. r lies in partial image
            # j when that one begins at or before r, else in a regular image after image j - 1.
            j = np.searchsorted(self.part_end, r, side="right")
            last = len(self.part_position) - 1
            nxt = np.minimum(j, last)
            part_first = (self.part_position[nxt].astype(np.int64) * v
                          - self.part_missing[nxt].astype(np.int64))
            in_part = (j <= last) & (part_first <= r)
            prev = np.maximum(j - 1, 0)
            base_image = np.where(j > 0, self.part_position[prev].astype(np.int64) + 1, 0)
            base_item = np.where(j > 0, self.part_end[prev].astype(np.int64), 0)
            image = base_image + (r - base_item) // v
            view = (r - base_item) % v
            image[in_part] = self.part_position[nxt[in_part]]
            view[in_part] = kth_set_bits(self.part_views[nxt[in_part]],
                                         (r - part_first)[in_part], v)
        mix = image + np.searchsorted(self.gone_shifted, image, side="right")
        dataset = np.searchsorted(self.source_offsets, mix, side="right") - 1
        return dataset, (mix - self.source_offsets[dataset]) * v + view

    def locate(self, item: int) -> tuple[int, int]:
        """(dataset id, sample index within the dataset) of item `item`."""
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range [0, {len(self)})")
        dataset, sample = self.locate_many(np.array([item]))
        return int(dataset[0]), int(sample[0])

    # -- the explicit per-image arrays (materialized on each call) ------------------------------
    def _explicit(self, of: Callable[[np.ndarray], np.ndarray], dtype: np.dtype) -> np.ndarray:
        out = np.empty(self.num_images, dtype=dtype)
        for lo in range(0, self.num_images, WORK_CHUNK):
            hi = min(self.num_images, lo + WORK_CHUNK)
            out[lo:hi] = of(np.arange(lo, hi))
        return out

    @property
    def image_first(self) -> np.ndarray:
        """Each image's first item (uint32; uint64 past 2**32 items)."""
        return self._explicit(self.first_of, index_dtype(len(self)))

    @property
    def image_count(self) -> np.ndarray:
        """Each image's number of usable views (uint8)."""
        return self._explicit(self.count_of, np.dtype(np.uint8))

    @property
    def image_domain(self) -> np.ndarray:
        """Each image's domain id (the smallest unsigned dtype of the domain ids)."""
        return self._explicit(self.domain_of, np.min_scalar_type(max(self.num_domains - 1, 0)))

    @property
    def image_index(self) -> np.ndarray:
        """Each image's index in its dataset (uint32; uint64 past 2**32 images)."""
        largest = int(np.diff(self.source_offsets).max(initial=0))
        return self._explicit(self.index_of, index_dtype(largest))

    @property
    def image_views(self) -> np.ndarray:
        """Each image's usable views, as a bit mask."""
        full = (1 << self.views_per_image) - 1

        def views(images: np.ndarray) -> np.ndarray:
            k, hit = self._partial(images)
            out = np.full(len(images), full, dtype=np.uint64)
            out[hit] = self.part_views[k[hit]]
            return out

        return self._explicit(views, _mask_dtype(self.views_per_image))
