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
them per image and epoch. `collate_cached` stacks items into a `Batch`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cache_format.errors import BadImageError, CacheMismatchError, ConfigError
from cache_format.manifest import STATUS_OK, keys_sha256
from cache_format.reader import CacheReader, open_cache
from precompute.config import CacheBuildConfig
from precompute.sources import ImageSource, open_source
from precompute.views import check_replay, render_view, sample_view

SPLITS: tuple[str, ...] = ("train", "heldout")

# One item's tokens: {teacher: {token type: (values, scale or None)}}, as stored.
EncodedItem = dict[str, dict[str, tuple[np.ndarray, np.ndarray | None]]]


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
    """One selected dataset: its cached index rows kept for this split, and its teachers."""

    name: str
    domain: str
    teachers: tuple[str, ...]  # selected teachers with features for this dataset, run order
    samples: np.ndarray  # int64 [n], sample indices (status ok, image in the split), sorted
    view_params: np.ndarray  # float32 [N, P], every stored row (the reader's array, not a copy)


class CacheTrainData(Dataset):
    """Cached samples of the selected datasets and teachers, one item per (image, view).

    `cache`: a path / URL or an open `CacheReader`. `teachers` / `datasets`: subsets of the
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
        self.reader: CacheReader | None = (
            cache if isinstance(cache, CacheReader) else open_cache(cache)
        )
        self._reader_pid: int | None = os.getpid()
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
        status = np.asarray(index.status)
        view_params = np.asarray(index.view_params, dtype=np.float32)
        v = self.views_per_image
        expected = fp.num_images * v
        if status.shape != (expected,) or view_params.shape[0] != expected:
            raise CacheMismatchError(
                f"{self.location}: dataset {name} holds {status.shape[0]} index rows, expected "
                f"{fp.num_images} images x {v} views = {expected}"
            )
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
            view_params=view_params,
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
        # File handles and thread pools do not survive a fork: each worker opens its own.
        if self.reader is None or self._reader_pid != os.getpid():
            self.reader = open_cache(self.location)
            self._reader_pid = os.getpid()
        return self.reader

    def __getstate__(self) -> dict[str, Any]:
        # A reader holds open files and threads: a spawned worker reopens the cache instead.
        state = self.__dict__.copy()
        state.update(reader=None, _reader_pid=None)
        return state

    def render(self, item: int) -> Tensor:
        """The student's view of item `item`, replayed and checked against the stored row."""
        return self._render(*self.locate(item))

    def _render(self, d: int, sample: int) -> Tensor:
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
            part.view_params[sample],
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
        out: list[EncodedItem] = [{} for _ in samples]
        for teacher, toks in encoded.items():
            for tok, enc in toks.items():
                values = enc.values.numpy()
                scale = None if enc.scale is None else enc.scale.numpy()
                for i in range(len(samples)):
                    out[i].setdefault(teacher, {})[tok] = (
                        values[i],
                        None if scale is None else scale[i],
                    )
        return out

    def _item(self, d: int, sample: int, tokens: EncodedItem) -> dict[str, Any]:
        return {
            "image": self._render(d, sample),
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
        return self._item(d, sample, self._read(d, [sample])[0])

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any]]:
        """A whole batch at once (DataLoader calls this): one token read per dataset."""
        located = [self.locate(int(i)) for i in items]
        tokens: list[EncodedItem | None] = [None] * len(located)
        for d in sorted({d for d, _ in located}):
            positions = [k for k, (dd, _) in enumerate(located) if dd == d]
            for k, enc in zip(
                positions, self._read(d, [located[k][1] for k in positions]), strict=True
            ):
                tokens[k] = enc
        return [
            self._item(d, s, tok)  # type: ignore[arg-type]
            for (d, s), tok in zip(located, tokens, strict=True)
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


# -- batches ----------------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    """One teacher's token type for the present rows of a batch, still encoded."""

    values: Tensor  # [n_present, ...] int8 / float16 / uint16 (bf16 bits)
    scale: Tensor | None  # [n_present, ...] float32 (int8 only)


@dataclass
class Batch:
    """A collated batch. Teacher tokens cover only the rows where the teacher is present.

    `presence[b, t]` says whether teacher `teacher_names[t]` has features for row b;
    `rows[teacher]` lists those rows (ascending) and `tokens[teacher][tok]` holds their encoded
    tokens in that order. Absent rows are never materialised, so nothing can feed placeholder
    zeros into a loss. `domains` gives each row's domain name (teacher dropping uses it).
    """

    images: Tensor  # float32 [B, 3, H, W] in [0, 1], unnormalized
    dataset: Tensor  # long [B]
    domain: Tensor  # long [B]
    sample: Tensor  # long [B]
    presence: Tensor  # bool [B, n_teachers]
    teacher_names: tuple[str, ...]
    dataset_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    rows: dict[str, Tensor] = field(default_factory=dict)  # long [n_present] per teacher
    tokens: dict[str, dict[str, EncodedBatch]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def domains(self) -> tuple[str, ...]:
        """The domain name of each row."""
        return tuple(self.domain_names[i] for i in self.domain.tolist())

    def _map(self, fn: Any) -> Batch:
        return Batch(
            images=fn(self.images),
            dataset=fn(self.dataset),
            domain=fn(self.domain),
            sample=fn(self.sample),
            presence=fn(self.presence),
            teacher_names=self.teacher_names,
            dataset_names=self.dataset_names,
            domain_names=self.domain_names,
            rows={t: fn(r) for t, r in self.rows.items()},
            tokens={
                t: {
                    tok: EncodedBatch(fn(e.values), None if e.scale is None else fn(e.scale))
                    for tok, e in toks.items()
                }
                for t, toks in self.tokens.items()
            },
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor moved to `device` (encoded tokens stay encoded)."""
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader's pin_memory calls this)."""
        return self._map(lambda x: x.pin_memory())


def collate_cached(items: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack dataset items into a `Batch` (numpy arrays become tensors here, in the worker)."""
    if not items:
        raise ValueError("collate_cached: no items")
    teacher_names = tuple(items[0]["teacher_names"])
    presence = np.stack([np.asarray(it["presence"], dtype=bool) for it in items])
    rows: dict[str, Tensor] = {}
    tokens: dict[str, dict[str, EncodedBatch]] = {}
    for t, teacher in enumerate(teacher_names):
        present = np.flatnonzero(presence[:, t])
        # Online runs carry no tokens: presence alone then says which rows a teacher serves.
        if present.size == 0 or teacher not in items[int(present[0])]["tokens"]:
            continue
        rows[teacher] = torch.from_numpy(present.astype(np.int64))
        tokens[teacher] = {}
        for tok in items[int(present[0])]["tokens"][teacher]:
            pairs = [items[int(i)]["tokens"][teacher][tok] for i in present]
            values = torch.from_numpy(np.stack([p[0] for p in pairs]))
            scale = None
            if pairs[0][1] is not None:
                scale = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))
            tokens[teacher][tok] = EncodedBatch(values, scale)
    return Batch(
        images=torch.stack([it["image"] for it in items]),
        dataset=torch.tensor([int(it["dataset"]) for it in items], dtype=torch.long),
        domain=torch.tensor([int(it["domain"]) for it in items], dtype=torch.long),
        sample=torch.tensor([int(it["sample"]) for it in items], dtype=torch.long),
        presence=torch.from_numpy(presence),
        teacher_names=teacher_names,
        dataset_names=tuple(items[0]["dataset_names"]),
        domain_names=tuple(items[0]["domain_names"]),
        rows=rows,
        tokens=tokens,
    )
