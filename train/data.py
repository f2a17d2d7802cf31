"""The training dataset over one cache: replayed student views plus still-encoded teacher tokens.

Item j is one cached sample (image, view) whose status is ok. Getting it

1. loads the source image (from where the dataset lives now: `roots` overrides the root the cache
   was built from; the ordered key list must hash to the cached fingerprint);
2. replays the view (`train.view_replay`): `sample_view` is called again with the seed and view
   settings of the manifest's replay section and the result is compared with the stored row
   (`check_replay`), so a change in the view code, the seed or the images can never silently
   desynchronise student and teachers; the view is then rendered at the student's resolution
   (`render_view`, float32 in [0, 1], unnormalized);
3. reads the teachers' tokens of that sample still encoded (int8 + scales, fp16, or bf16 bits)
   through the reader's byte-range fast path, so that dequantization happens on the device.

Split: per dataset, `heldout_images` images (at most half of the dataset) are drawn by a seeded
permutation (the cache's seed and the dataset name; independent of the teachers and datasets a
run selects) and held out with all their views; `split="train"` is the rest. Both splits are
stable across runs over the same cache.

Items are numbered dataset by dataset, then by sample index, so the usable views of one image
are consecutive (`first_of`, `count_of`): the samplers in `train.sampling` draw one of them per
image and epoch. `collate_cached` (train/batch.py) stacks items into a `Batch`.

Memory: the item table holds only its exceptions (`train.item_table`: held-out images and
images with a failed view), and is built from the reader's statuses a chunk of images at a
time; the statuses (1 byte per sample, kept by the reader) are the only per-sample array. No
whole [N, P] view array is held either: stored view rows are read per batch through the
reader's `SampleIndex.view_params_of`. Forked workers go on with the parent's reader and what
it read (`_reader`); spawned ones reopen the cache with the parent reader's `settings` (fsspec
storage options, threads, checksum policy).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from cache_format.errors import CacheMismatchError, ConfigError
from cache_format.manifest import STATUS_OK
from cache_format.reader import CacheReader, open_cache
from cache_format.serde import check_choice
from precompute.sources import ImageSource
from train.batch import EncodedItem, split_encoded
from train.image_order import arange_into, index_dtype, scratch_array
from train.item_table import ItemTable, UsableRows
from train.preflight import grid_hint, grid_problem, replay_spec, roots_problem, select_names
from train.view_replay import fingerprint_algorithm, open_replay_source, replay_view, view_config

SPLITS: tuple[str, ...] = ("train", "heldout")


def heldout_image_indices(num_images: int, count: int, seed: int, dataset: str) -> np.ndarray:
    """The sorted image indices of `dataset` held out of training (deterministic).

    `min(count, num_images // 2)` images, drawn by a permutation seeded with `seed` and a CRC of
    the dataset name, so that each dataset's held-out set depends on nothing else.
    """
    k = max(0, min(int(count), num_images // 2))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed), zlib.crc32(dataset.encode("utf-8"))])
    # The same draws as rng.permutation(num_images), in half its bytes, in a mapping that is
    # returned to the system after the table is built.
    order = arange_into(scratch_array(num_images, index_dtype(num_images)))
    rng.shuffle(order)
    return np.sort(order[:k]).astype(np.int64)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    pair = tuple(int(v) for v in size)
    if len(pair) != 2:
        raise ConfigError(f"img_size: expected an int or (height, width), found {size!r}")
    return pair  # type: ignore[return-value]


#: A sample's stored view row float32 [P] and its image's source fingerprint (None: unchecked).
_StoredView = tuple[np.ndarray, int | None]


@dataclass(frozen=True)
class _DatasetPart:
    """One selected dataset: its name, domain and teachers (its items live in the per-image
    tables; the stored view rows are read on demand from the reader's index)."""

    name: str
    domain: str
    teachers: tuple[str, ...]  # selected teachers with features for this dataset, run order


class CacheTrainData(Dataset):
    """Cached samples of the selected datasets and teachers, one item per (image, view).

    `cache`: a path / URL or an open `CacheReader` (DataLoader workers reopen it with the same
    settings, storage options included). `teachers` / `datasets`: subsets of the
    cache's (None = all), in the order batches report them. `roots`: dataset name -> where its
    source images live now. `img_size`: the student's input size; it must equal the cache's
    grid x student patch (a mismatch is a CacheMismatchError naming both grids).
    `student_patch`: the student's patch size, checked against the cache's when given.
    `read_tokens=False` skips the token reads (online training computes targets live).
    `check_source_fingerprints`: refuse a source image whose content fingerprint differs from
    the one the cache's index recorded (datasets recorded without fingerprints are not checked;
    `fingerprint_datasets` names the checked ones).
    A cache without the manifest's replay section is a CacheVersionError (`dune-cache upgrade`).
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
        check_source_fingerprints: bool = True,
    ) -> None:
        check_choice(split, SPLITS, "split")
        if heldout_images < 0:
            raise ConfigError(f"heldout_images: expected >= 0, found {heldout_images}")
        self.reader: CacheReader = cache if isinstance(cache, CacheReader) else open_cache(cache)
        self._reader_pid = os.getpid()
        manifest = self.reader.manifest
        self.manifest = manifest
        self.location = str(getattr(self.reader, "location", cache))
        self.split = split
        self.read_tokens = read_tokens
        self.replay = replay_spec(manifest, self.location)
        self.grid: tuple[int, int] = (int(manifest.grid[0]), int(manifest.grid[1]))
        self.student_patch = int(manifest.student_patch)
        self.img_size = self._check_student(img_size, student_patch)
        self.teacher_names = select_names("teachers", teachers, manifest, self.location)
        self.dataset_names = select_names("datasets", datasets, manifest, self.location)
        # Domain ids follow the cache's dataset order, so they do not depend on the selection.
        all_domains = [manifest.datasets[d].domain for d in manifest.datasets]
        self.domain_names: tuple[str, ...] = tuple(dict.fromkeys(all_domains))
        self.view_config = view_config(self.replay)
        self.seed = self.replay.seed
        self.views_per_image = self.replay.views_per_image
        roots = dict(roots or {})
        problem = roots_problem(roots, manifest)
        if problem:
            raise ConfigError(f"{self.location}: {problem}")
        split_seed = self.seed if split_seed is None else int(split_seed)
        assigned = manifest.assignment
        self._parts = [
            _DatasetPart(name, manifest.datasets[name].domain,
                         tuple(t for t in self.teacher_names if name in assigned.get(t, ())))
            for name in self.dataset_names
        ]
        self._sources: list[ImageSource] = [
            open_replay_source(self.replay, manifest.datasets[name], self.location,
                               roots.get(name))
            for name in self.dataset_names
        ]
        self._checked = [check_source_fingerprints and fingerprint_algorithm(
            manifest.datasets[name], self.location) != "" for name in self.dataset_names]
        #: The datasets whose images are checked against the index's source fingerprints.
        self.fingerprint_datasets = tuple(
            name for name, on in zip(self.dataset_names, self._checked, strict=True) if on)
        self._build_item_tables(heldout_images, split_seed)
        self._read_metadata()

    # -- construction helpers -----------------------------------------------------------------
    def _check_student(
        self, img_size: int | Sequence[int] | None, student_patch: int | None
    ) -> tuple[int, int]:
        """The student's input size, refused unless its token grid is the cache's grid."""
        gh, gw = self.grid
        patch = self.student_patch if student_patch is None else int(student_patch)
        size = (gh * patch, gw * patch) if img_size is None else _size_pair(img_size)
        problem = grid_problem(self.manifest, size, patch)
        if problem:
            raise CacheMismatchError(f"{self.location}: {problem}", hint=grid_hint(self.manifest))
        return size

    def _usable_rows(self, heldout_images: int, split_seed: int) -> UsableRows:
        """The usable views of a chunk of images of dataset d (bool [hi - lo, views]): status
        ok and image in this split. Statuses are 1 byte per sample, kept by the reader's index
        and read here a chunk at a time; keys and view rows stay on disk. reader.index()
        refuses an index whose length is not images x views."""
        v = self.views_per_image
        held = [heldout_image_indices(self.manifest.datasets[p.name].num_images, heldout_images,
                                      split_seed, p.name) for p in self._parts]
        statuses = [self.reader.index(p.name).status for p in self._parts]

        def rows(d: int, lo: int, hi: int) -> np.ndarray:
            ok = statuses[d][lo * v : hi * v].reshape(hi - lo, v) == STATUS_OK
            in_held = np.zeros(hi - lo, dtype=bool)
            chunk = held[d][np.searchsorted(held[d], lo) : np.searchsorted(held[d], hi)]
            in_held[chunk - lo] = True
            in_split = in_held if self.split == "heldout" else ~in_held
            return ok & in_split[:, None]

        return rows

    def _build_item_tables(self, heldout_images: int, split_seed: int) -> None:
        """The item table (`train.item_table`) and the per-dataset facts of items."""
        self.items = ItemTable.from_rows(
            [self.manifest.datasets[p.name].num_images for p in self._parts],
            self._usable_rows(heldout_images, split_seed),
            [self.domain_names.index(p.domain) for p in self._parts],
            self.views_per_image, len(self.domain_names),
        )
        self._dataset_domain = np.array(
            [self.domain_names.index(p.domain) for p in self._parts], dtype=np.int64
        )
        self._presence = np.array(
            [[t in p.teachers for t in self.teacher_names] for p in self._parts], dtype=bool
        ).reshape(len(self._parts), len(self.teacher_names))

    # -- facts ------------------------------------------------------------------------------
    @property
    def image_first(self) -> np.ndarray:
        """Each image's first item (materialized on each call: `ItemTable.image_first`)."""
        return self.items.image_first

    @property
    def image_count(self) -> np.ndarray:
        """Each image's number of usable views (materialized on each call)."""
        return self.items.image_count

    @property
    def image_domain(self) -> np.ndarray:
        """Each image's domain id, an index into `domain_names` (materialized on each call)."""
        return self.items.image_domain

    # The samplers' view of the table (`train.image_order.ViewGroups`), a chunk of images at a time.
    def first_of(self, images: np.ndarray) -> np.ndarray:
        """The first item of each image (see `ItemTable.first_of`)."""
        return self.items.first_of(images)

    def count_of(self, images: np.ndarray) -> np.ndarray:
        """The number of usable views of each image."""
        return self.items.count_of(images)

    def domain_of(self, images: np.ndarray) -> np.ndarray:
        """The domain id of each image."""
        return self.items.domain_of(images)

    def domain_spans(self) -> np.ndarray:
        """The runs of images of one domain (see `ItemTable.domain_spans`)."""
        return self.items.domain_spans()

    @property
    def num_images(self) -> int:
        """Images with at least one usable view in this split."""
        return self.items.num_images

    def locate(self, item: int) -> tuple[int, int]:
        """(dataset id, sample index within the dataset) of item `item`."""
        return self.items.locate(item)

    def __len__(self) -> int:
        return len(self.items)

    def shard_of(self, item: int) -> tuple[int, int]:
        """(dataset id, token shard) that item `item` is read from."""
        d, sample = self.locate(int(item))
        return d, sample // self.manifest.samples_per_shard

    def fill_shard_cache(self, dataset: int, shard: int) -> None:
        """Fetch a token shard of dataset id `dataset` into the reader's local shard cache
        (`train.shard_prefetch`), for this run's teachers of that dataset, and the chunk of
        view rows its samples replay, so that a worker reads both locally."""
        part, reader = self._parts[dataset], self._reader()
        sps = self.manifest.samples_per_shard
        reader.index(part.name).fill_shard_cache(shard * sps, (shard + 1) * sps)
        if self.read_tokens and part.teachers:
            reader.fill_shard_cache(part.name, shard, part.teachers)

    # -- items ------------------------------------------------------------------------------
    def _reader(self) -> CacheReader:
        # A forked worker goes on with the parent's reader: what the parent read (statuses,
        # layouts, read plans, calibration, done marks) is not read again, which from an
        # object store is hundreds of requests per worker; thread pools, locks and store
        # clients, which do not survive a fork, are made anew (MetadataReader.after_fork and
        # the fork hooks of the index and token readers). Inherited fds stay valid for
        # positional reads.
        if self._reader_pid != os.getpid():
            self.reader.after_fork()
            self._reader_pid = os.getpid()
        return self.reader

    def _read_metadata(self) -> None:
        """Read now, in the process that makes the DataLoader, what every worker's token reads
        need (layouts, read plans, calibration, done marks: a read of no sample), so that a
        forked worker inherits it instead of asking the store again."""
        if not self.read_tokens:
            return
        for part in self._parts:
            if part.teachers:
                self.reader.read_encoded(part.name, [], list(part.teachers))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A spawned worker: the reader pickles as a reopen, so it was just opened here.
        self.__dict__.update(state)
        self._reader_pid = os.getpid()

    def render(self, item: int) -> Tensor:
        """The student's view of item `item`, replayed and checked against the stored row."""
        d, sample = self.locate(item)
        return self._render(d, sample, self._view_rows(d, [sample])[0])

    def _view_rows(self, d: int, samples: Sequence[int]) -> list[_StoredView]:
        """The stored view row float32 [P] and, when checked, the image's source fingerprint,
        of each of `samples` of dataset `d` (read on demand, both from the same index rows)."""
        index = self._reader().index(self._parts[d].name)
        if not self._checked[d]:
            return [(row, None) for row in index.view_params_of(samples)]
        params, prints = index.view_rows_of(samples)
        assert prints is not None  # _checked only for datasets that record fingerprints
        return list(zip(params, prints.tolist(), strict=True))

    def _render(self, d: int, sample: int, stored: _StoredView) -> Tensor:
        return replay_view(self._sources[d], self.replay, self.view_config, sample, stored[0],
                           self.img_size, self.location, fingerprint=stored[1])

    def _read(self, d: int, samples: Sequence[int]) -> list[EncodedItem]:
        """Encoded tokens of `samples` of dataset `d`, one batched fast-path read per dataset."""
        part = self._parts[d]
        if not self.read_tokens or not part.teachers:
            return [{} for _ in samples]
        encoded = self._reader().read_encoded(part.name, list(samples), list(part.teachers))
        return split_encoded(encoded, len(samples))

    def _item(self, d: int, sample: int, stored: _StoredView, tokens: EncodedItem
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
        datasets, samples = self.items.locate_many(np.asarray(items, dtype=np.int64))
        located = list(zip(datasets.tolist(), samples.tolist(), strict=True))
        tokens: list[EncodedItem | None] = [None] * len(located)
        rows: list[_StoredView | None] = [None] * len(located)
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

