"""The item table of a training split: which cached samples are items, kept per image.

Items are numbered dataset by dataset, then by sample index, so the usable views of one image are
consecutive items. At DUNE's scale (about 128 M samples, 6 views per image) a per-sample int64
table would be 1 GB in the trainer and again in every DataLoader worker, so the table is per
image, for the images of the split with at least one usable view:

- `image_first`: the image's first item (uint32; uint64 past 2**32 items),
- `image_index`: the image's index in its dataset (uint32),
- `image_views`: its usable views as a bit mask (uint8 up to 8 views per image, up to uint64),
- `image_count`: how many (uint8), `image_domain`: its domain id (uint8 up to 256 domains).

That is 11 bytes per image at up to 8 views, under 2 bytes per sample at 6 views; `locate(item)`
finds an item's image by binary search and its view as the k-th set bit of the mask. The
samplers (`train.sampling`) read `image_first`, `image_count` and `image_domain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache_format.errors import ConfigError
from train.sampling import index_dtype

#: An image's usable views are a bit mask in one unsigned integer.
MAX_VIEWS_PER_IMAGE = 64


def _mask_dtype(views_per_image: int) -> np.dtype:
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                         if np.iinfo(t).bits >= views_per_image))


def _kth_set_bit(mask: int, k: int) -> int:
    """The position of the k-th (0-based) set bit of `mask`, from the least significant."""
    left = k
    for position in range(mask.bit_length()):
        if mask >> position & 1:
            if left == 0:
                return position
            left -= 1
    raise IndexError(f"mask {mask:b} has no set bit number {k}")


@dataclass(frozen=True)
class ItemTable:
    """Per-image item tables of the datasets of a split (see the module docstring).

    `image_offsets[d]:image_offsets[d + 1]` are dataset d's images in the table and
    `item_offsets[d]:item_offsets[d + 1]` its items.
    """

    views_per_image: int
    image_first: np.ndarray
    image_count: np.ndarray
    image_domain: np.ndarray
    image_index: np.ndarray
    image_views: np.ndarray
    image_offsets: np.ndarray  # int64 [datasets + 1]
    item_offsets: np.ndarray  # int64 [datasets + 1]

    @classmethod
    def build(cls, usable: Sequence[np.ndarray], domains: Sequence[int], views_per_image: int,
              num_domains: int) -> ItemTable:
        """The table of datasets whose usable views are `usable[d]` (bool [images, views]) and
        whose domain ids are `domains[d]` (in [0, num_domains))."""
        v = int(views_per_image)
        if not 1 <= v <= MAX_VIEWS_PER_IMAGE:
            raise ConfigError(f"views_per_image: training reads 1 to {MAX_VIEWS_PER_IMAGE} views "
                              f"per image (a bit mask per image), found {v}")
        mask_dtype = _mask_dtype(v)
        bits = np.left_shift(np.ones(1, mask_dtype), np.arange(v, dtype=mask_dtype))
        domain_dtype = np.min_scalar_type(max(num_domains - 1, 0))
        indices, masks, counts, image_domains = [], [], [], []
        image_offsets, item_offsets = [0], [0]
        for views, domain in zip(usable, domains, strict=True):
            if views.ndim != 2 or views.shape[1] != v:
                raise ConfigError(f"usable views: expected [images, {v}], found {views.shape}")
            images = np.flatnonzero(views.any(axis=1))
            kept = views[images]
            indices.append(images.astype(index_dtype(len(views))))
            masks.append(np.bitwise_or.reduce(kept * bits, axis=1).astype(mask_dtype))
            counts.append(kept.sum(axis=1, dtype=np.uint8))
            image_domains.append(np.full(len(images), domain, dtype=domain_dtype))
            image_offsets.append(image_offsets[-1] + len(images))
            item_offsets.append(item_offsets[-1] + int(counts[-1].sum(dtype=np.int64)))

        def joined(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        count = joined(counts, np.dtype(np.uint8))
        first = np.zeros(len(count), dtype=index_dtype(item_offsets[-1]))
        np.cumsum(count[:-1], out=first[1:], dtype=first.dtype)
        return cls(
            views_per_image=v,
            image_first=first,
            image_count=count,
            image_domain=joined(image_domains, domain_dtype),
            image_index=joined(indices, index_dtype(max((len(u) for u in usable), default=0))),
            image_views=joined(masks, mask_dtype),
            image_offsets=np.asarray(image_offsets, dtype=np.int64),
            item_offsets=np.asarray(item_offsets, dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.item_offsets[-1])

    @property
    def num_images(self) -> int:
        """Images with at least one usable view."""
        return len(self.image_first)

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-image arrays (what each process holding the table pays)."""
        return sum(a.nbytes for a in (self.image_first, self.image_count, self.image_domain,
                                      self.image_index, self.image_views))

    def locate(self, item: int) -> tuple[int, int]:
        """(dataset id, sample index within the dataset) of item `item`."""
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range [0, {len(self)})")
        # A scalar of the table's dtype: a Python int would make numpy convert the whole array.
        first = self.image_first
        image = int(np.searchsorted(first, first.dtype.type(item), side="right")) - 1
        d = int(np.searchsorted(self.image_offsets, image, side="right")) - 1
        # The item is the k-th usable view of its image: the k-th set bit of the image's mask.
        view = _kth_set_bit(int(self.image_views[image]), item - int(self.image_first[image]))
        return d, int(self.image_index[image]) * self.views_per_image + view
