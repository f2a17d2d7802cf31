"""The training dataset over one cache: replayed student views plus still-encoded teacher tokens.

Item j is one cached sample (image, view) whose status is ok. Getting it

1. loads the source image (from where the dataset lives now: `roots` overrides the root the cache
   was built from; the ordered key list must hash to the cached fingerprint);
2. replays the view: `sample_view` is called again with the build's seed and view config and the
   result is compared with the stored row (`check_replay`), so a change in the view code, the
   seed or the images can never silently desynchronise student and teachers; the view is then
   rendered at the student's resolution (`render_view`, float32 in [0, 1], unnormalized);
3. reads the teachers' tokens of that sample still encoded (int8 + scales, fp16, or bf16 bits)
   through the reader's byte-range fast path, so that dequantization happens on the device.

Split: per dataset, `heldout_images` images (at most half of the dataset) are drawn by a seeded
permutation (the cache's seed and the dataset name; independent of the teachers and datasets a
run selects) and held out with all their views; `split="train"` is the rest. Both splits are
stable across runs over the same cache.

Items are numbered dataset by dataset, then by sample index, so the usable views of one image
are consecutive (`image_first`, `image_count`): the samplers in `train.sampling` draw one of
them per image and epoch. `collate_cached` (train/batch.py) stacks items into a `Batch`.

Memory: no whole [N, P] view array is held; stored view rows are read per batch through the
reader's `SampleIndex.view_params_of`. Workers reopen the cache with the parent reader's
`settings` (fsspec storage options, threads, checksum policy).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from cache_format.errors import BadImageError, CacheMismatchError, ConfigError
from cache_format.manifest import STATUS_OK, keys_sha256
from cache_format.reader import CacheReader, open_cache
from precompute.config import CacheBuildConfig
from precompute.render import render_view
from precompute.sources import ImageSource, open_source
from precompute.view_params import check_replay
from precompute.views import sample_view
from train.batch import Batch, EncodedBatch, EncodedItem, collate_cached, split_encoded

__all__ = ["SPLITS", "Batch", "CacheTrainData", "EncodedBatch", "EncodedItem", "collate_cached",
           "heldout_image_indices"]

SPLITS: tuple[str, ...] = ("train", "heldout")


def heldout_image_indices(num_images: int, count: int, seed: int, dataset: str) -> np.ndarray:
    """The sorted image indices of `dataset` held out of training (deterministic).

    `min(count, num_images // 2)` images, drawn by a permutation seeded with `seed` and a CRC of
    the dataset name, so that each dataset's held-out set depends on nothing else.
    """
    k = max(0, min(int(count), num_images // 2))
    rng = np.random.default_rng([int(seed), zlib.crc32(dataset.encode("utf-8"))])
    return np.sort(rng.permutation(num_images)[:k]).astype(np.int64)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    pair = tuple(int(v) for v in size)
    if len(pair) != 2:
        raise ConfigError(f"img_size: expected an int or (height, width), found {size!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class _DatasetPart:
    """One selected dataset: its sample indices kept for this split, and its teachers (the
    stored view rows are read on demand from the reader's index)."""

    name: str
    domain: str
    teachers: tuple[str, ...]  # selected teachers with features for this dataset, run order
    samples: np.ndarray  # int64 [n], sample indices (status ok, image in the split), sorted


class CacheTrainData(Dataset):
    """Cached samples of the selected datasets and teachers, one item per (image, view).

    `cache`: a path / URL or an open `CacheReader` (DataLoader workers reopen it with the same
    settings, storage options included). `teachers` / `datasets`: subsets of the
    cache's (None = all), in the order batches report them. `roots`: dataset name -> where its
    source images live now. `img_size`: the student's input size; it must equal the cache's
    grid x student patch (a mismatch is a CacheMismatchError naming both grids).
    `student_patch`: the student's patch size, checked against the cache's when given.
    `read_tokens=False` skips the token reads (online training computes targets live).
    """

    def __init__(
        self,
        cache: str | os.PathLike[str] | CacheReader,
        teachers: Sequence[str] | None = None,
        datasets: Sequence[str] | None = None,
        roots: Mapping[str, str] | None = None,
        *,
        split: str = "train",
        heldout_images: int = 8,
        img_size: int | Sequence[int] | None = None,
        student_patch: int | None = None,
        split_seed: int | None = None,
        read_tokens: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, found {split!r}")
        if heldout_images < 0:
            raise ConfigError(f"heldout_images: expected >= 0, found {heldout_images}")
        self.reader: CacheReader = cache if isinstance(cache, CacheReader) else open_cache(cache)
        self._reader_pid = os.getpid()
        manifest = self.reader.manifest
        self.manifest = manifest
        self.location = str(getattr(self.reader, "location", cache))
        self.split = split
        self.read_tokens = read_tokens
        self.grid: tuple[int, int] = (int(manifest.grid[0]), int(manifest.grid[1]))
        self.student_patch = int(manifest.student_patch)
        self.img_size = self._check_student(img_size, student_patch)
        self.teacher_names: tuple[str, ...] = self._select(
            "teachers", teachers, list(manifest.teachers)
        )
        self.dataset_names: tuple[str, ...] = self._select(
            "datasets", datasets, list(manifest.datasets)
        )
        # Domain ids follow the cache's dataset order, so they do not depend on the selection.
        all_domains = [manifest.datasets[d].domain for d in manifest.datasets]
        self.domain_names: tuple[str, ...] = tuple(dict.fromkeys(all_domains))
        build = _build_config(manifest.build_config, self.location)
        self.view_config = build.views
        self.seed = int(manifest.seed)
        self.views_per_image = int(manifest.views_per_image)
        self._build = build
        roots = dict(roots or {})
        unknown_roots = sorted(set(roots) - set(manifest.datasets))
        if unknown_roots:
            raise ConfigError(
                f"roots: {unknown_roots} are not datasets of the cache {self.location} "
                f"(it has {sorted(manifest.datasets)})"
            )
        split_seed = self.seed if split_seed is None else int(split_seed)
        self._parts: list[_DatasetPart] = []
        self._sources: list[ImageSource] = []
        for name in self.dataset_names:
            self._parts.append(self._load_part(name, heldout_images, split_seed))
            self._sources.append(self._open_source(name, roots.get(name)))
        self._build_item_tables()

    # -- construction helpers -----------------------------------------------------------------
    def _check_student(
        self, img_size: int | Sequence[int] | None, student_patch: int | None
    ) -> tuple[int, int]:
        """The student's input size, refused unless its token grid is the cache's grid."""
        gh, gw = self.grid
        cached = (gh * self.student_patch, gw * self.student_patch)
        patch = self.student_patch if student_patch is None else int(student_patch)
        size = cached if img_size is None else _size_pair(img_size)
        grid = (size[0] // patch, size[1] // patch)
        if patch != self.student_patch or size != cached:
            raise CacheMismatchError(
                f"{self.location}: the cache was built for the token grid {gh}x{gw} at student "
                f"patch {self.student_patch} ({cached[0]}x{cached[1]} px), but the student "
                f"takes {size[0]}x{size[1]} px with patch {patch}, i.e. the grid "
                f"{grid[0]}x{grid[1]}"
                + ("" if size[0] % patch == 0 and size[1] % patch == 0 else " (not a whole grid)"),
                hint=f"set the student's img_size to {cached[0]} with patch "
                f"{self.student_patch}, or build a cache for the student's grid",
            )
        return size

    def _select(
        self, what: str, wanted: Sequence[str] | None, available: list[str]
    ) -> tuple[str, ...]:
        if wanted is None or len(wanted) == 0:
            return tuple(available)
        missing = [n for n in wanted if n not in available]
        if missing or len(set(wanted)) != len(wanted):
            raise CacheMismatchError(
                f"{what}: {list(wanted)} asks for {missing or 'repeated names'}, but the cache "
                f"{self.location} has {available}",
                hint=f"choose {what} the cache holds (each once)",
            )
        return tuple(wanted)

    def _load_part(self, name: str, heldout_images: int, split_seed: int) -> _DatasetPart:
        fp = self.manifest.datasets[name]
        index = self.reader.index(name)
        # 1 byte per sample; keys and view rows stay on disk. Its length is images x views:
        # reader.index() refuses an index of any other size (CacheVersionError naming both).
        status = index.status
        v = self.views_per_image
        held = np.zeros(fp.num_images, dtype=bool)
        held[heldout_image_indices(fp.num_images, heldout_images, split_seed, name)] = True
        in_split = np.repeat(held if self.split == "heldout" else ~held, v)
        samples = np.flatnonzero((status == STATUS_OK) & in_split).astype(np.int64)
        assigned = self.manifest.assignment
        teachers = tuple(t for t in self.teacher_names if name in assigned.get(t, ()))
        return _DatasetPart(
            name=name,
            domain=fp.domain,
            teachers=teachers,
            samples=samples,
        )

    def _open_source(self, name: str, root: str | None) -> ImageSource:
        """Open where the dataset's images are now and check they are the cached list."""
        fp = self.manifest.datasets[name]
        if name not in self._build.dataset_names:
            raise CacheMismatchError(
                f"{self.location}: the manifest's build_config has no dataset {name!r}, so its "
                "source images cannot be found",
                hint="rebuild the cache with `dune-cache build`",
            )
        cfg = self._build.dataset(name)
        if root is not None:
            cfg = replace(cfg, root=str(root))
        # The build's decoding settings, so that every pixel decodes as the teachers saw it.
        source = open_source(
            cfg,
            max_pixels=self._build.build.max_pixels,
            unusual_modes=self._build.build.unusual_modes,
        )
        keys = source.keys()
        if len(keys) != fp.num_images or keys_sha256(keys) != fp.keys_sha256:
            raise CacheMismatchError(
                f"dataset {name}: the images under {cfg.root!r} are not the ones the cache "
                f"{self.location} was built from (found {len(keys)} images with key hash "
                f"{keys_sha256(keys)[:12]}..., the cache has {fp.num_images} with "
                f"{fp.keys_sha256[:12]}...)",
                hint=f"point roots.{name} at the original images, or rebuild the cache",
            )
        return source

    def _build_item_tables(self) -> None:
        """Global item numbering and the per-image grouping the samplers use."""
        counts = [len(p.samples) for p in self._parts]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        firsts, sizes, domains = [], [], []
        for d, part in enumerate(self._parts):
            images = part.samples // self.views_per_image
            uniq, first, size = np.unique(images, return_index=True, return_counts=True)
            firsts.append(first.astype(np.int64) + self._offsets[d])
            sizes.append(size.astype(np.int64))
            domains.append(np.full(len(uniq), self.domain_names.index(part.domain), np.int64))
        empty = np.zeros(0, dtype=np.int64)
        self.image_first = np.concatenate(firsts) if firsts else empty
        self.image_count = np.concatenate(sizes) if sizes else empty
        self.image_domain = np.concatenate(domains) if domains else empty
        self._dataset_domain = np.array(
            [self.domain_names.index(p.domain) for p in self._parts], dtype=np.int64
        )
        self._presence = np.array(
            [[t in p.teachers for t in self.teacher_names] for p in self._parts], dtype=bool
        ).reshape(len(self._parts), len(self.teacher_names))

    # -- facts ------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Images with at least one usable view in this split."""
        return len(self.image_first)

    def dataset_samples(self, dataset: str) -> np.ndarray:
        """Sample indices (within `dataset`) of this split's items of that dataset, in order."""
        return self._parts[self.dataset_names.index(dataset)].samples

    def locate(self, item: int) -> tuple[int, int]:
        """(dataset id, sample index within the dataset) of item `item`."""
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range [0, {len(self)})")
        d = int(np.searchsorted(self._offsets, item, side="right")) - 1
        return d, int(self._parts[d].samples[item - self._offsets[d]])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    # -- items ------------------------------------------------------------------------------
    def _reader(self) -> CacheReader:
        # File handles and thread pools do not survive a fork: each worker opens its own, the
        # way the parent's reader was opened (CacheReader.reopen: storage options, threads,
        # checksum policy), and frees its copies of the parent's fds.
        if self._reader_pid != os.getpid():
            inherited, self.reader = self.reader, self.reader.reopen()
            inherited.close()
            self._reader_pid = os.getpid()
        return self.reader

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A spawned worker: the reader pickles as a reopen, so it was just opened here.
        self.__dict__.update(state)
        self._reader_pid = os.getpid()

    def render(self, item: int) -> Tensor:
        """The student's view of item `item`, replayed and checked against the stored row."""
        d, sample = self.locate(item)
        return self._render(d, sample, self._view_rows(d, [sample])[0])

    def _view_rows(self, d: int, samples: Sequence[int]) -> np.ndarray:
        """The stored view rows float32 [n, P] of `samples` of dataset `d` (read on demand)."""
        return self._reader().index(self._parts[d].name).view_params_of(samples)

    def _render(self, d: int, sample: int, stored: np.ndarray) -> Tensor:
        part = self._parts[d]
        image_index, view_index = divmod(sample, self.views_per_image)
        try:
            image = self._sources[d].load(image_index)
        except BadImageError as exc:
            raise CacheMismatchError(
                f"dataset {part.name}, sample {sample}: the source image was usable when the "
                f"cache was built but now fails ({exc})",
                hint="restore the original image file",
            ) from exc
        params = sample_view(
            self.seed,
            part.name,
            image_index,
            view_index,
            (int(image.shape[1]), int(image.shape[2])),
            self.view_config,
        )
        check_replay(
            stored,
            params,
            where=f"{self.location}: dataset {part.name}, sample {sample} (image {image_index}, "
            f"view {view_index})",
        )
        return render_view(image, params, self.img_size)

    def _read(self, d: int, samples: Sequence[int]) -> list[EncodedItem]:
        """Encoded tokens of `samples` of dataset `d`, one batched fast-path read per dataset."""
        part = self._parts[d]
        if not self.read_tokens or not part.teachers:
            return [{} for _ in samples]
        encoded = self._reader().read_encoded(part.name, list(samples), list(part.teachers))
        return split_encoded(encoded, len(samples))

    def _item(self, d: int, sample: int, stored: np.ndarray, tokens: EncodedItem
              ) -> dict[str, Any]:
        return {
            "image": self._render(d, sample, stored),
            "dataset": d,
            "domain": int(self._dataset_domain[d]),
            "sample": sample,
            "tokens": tokens,
            "presence": self._presence[d].copy(),
            "teacher_names": self.teacher_names,
            "dataset_names": self.dataset_names,
            "domain_names": self.domain_names,
        }

    def __getitem__(self, item: int) -> dict[str, Any]:
        d, sample = self.locate(int(item))
        return self._item(d, sample, self._view_rows(d, [sample])[0], self._read(d, [sample])[0])

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any]]:
        """A whole batch at once (DataLoader calls this): one token read and one view-row read
        per dataset."""
        located = [self.locate(int(i)) for i in items]
        tokens: list[EncodedItem | None] = [None] * len(located)
        rows: list[np.ndarray | None] = [None] * len(located)
        for d in sorted({d for d, _ in located}):
            positions = [k for k, (dd, _) in enumerate(located) if dd == d]
            samples = [located[k][1] for k in positions]
            stored = self._view_rows(d, samples)
            for j, (k, enc) in enumerate(zip(positions, self._read(d, samples), strict=True)):
                tokens[k], rows[k] = enc, stored[j]
        return [
            self._item(d, s, row, tok)  # type: ignore[arg-type]
            for (d, s), row, tok in zip(located, rows, tokens, strict=True)
        ]


def _build_config(data: Mapping[str, Any], location: str) -> CacheBuildConfig:
    """The build config stored in the manifest: views, dataset sources and decoding settings."""
    if not data:
        raise CacheMismatchError(
            f"{location}: the manifest holds no build_config, so the cached views cannot be "
            "replayed (no view config, no dataset sources)",
            hint="rebuild the cache with `dune-cache build`",
        )
    try:
        return CacheBuildConfig.from_dict(data)
    except ConfigError as exc:
        raise CacheMismatchError(
            f"{location}: the manifest's build_config cannot be read by this version ({exc})",
            hint="train with the dune-distill version that built the cache, or rebuild it",
        ) from exc
