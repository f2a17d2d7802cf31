"""Readers of labelled folders: ImageNet-style classes, ADE20K, image + mask, image + depth.

Layouts (`root` is what the user passes):
- `imagefolder` (classification): `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`, or
  `root/<class>/*.jpg` split by `val_fraction`. Classes are the sorted folder names.
- `ade20k` (segmentation): `root/images/{training,validation}/*.jpg` and
  `root/annotations/{training,validation}/*.png` (same stem); label 0 is "other" (ignored),
  1..150 are the classes. Class names from `root/objectInfo150.txt` / `.csv` when present.
- `seg-folder` (segmentation): `root/images/...` and `root/masks/...` (same relative path, any
  image suffix) plus `root/classes.txt` (one name per line, line i = class i); mask value
  `ignore_index` (255 by default) is unlabelled. Or `root/{train,val}/{images,masks}`.
- `depth-folder` (depth): `root/images/...` and `root/depth/...` with a 16-bit PNG (value /
  `depth_scale` = metres; 1000 by default, i.e. millimetres) or a float `.npy` (metres) per image;
  0 is "no depth". Or `root/{train,val}/{images,depth}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cache_format.errors import BadImageError, ConfigError
from heads.datasets import (
    SPLITS,
    LabelledSource,
    PairReport,
    Task,
    list_images,
    read_list_file,
    split_keys,
)
from heads.metrics import IGNORE
from precompute.decode import decode_image


def read_image(path: Path) -> torch.Tensor:
    """uint8 RGB [3, H, W] of an image file (unusual modes converted); BadImageError if bad."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot be read ({exc})", reason="unreadable",
                            path=str(path)) from None
    return decode_image(data, str(path), unusual_modes="convert")


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from a file's header (no decoding); `.npy` from its array header."""
    if path.suffix.lower() == ".npy":
        shape = np.load(path, mmap_mode="r").shape
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D depth array, found shape {shape}")
        return int(shape[0]), int(shape[1])
    with Image.open(path) as img:
        return img.size[1], img.size[0]


class PairedFolder:
    """Images and label files matched by relative path (without suffix), per split."""

    def __init__(self, *, name: str, kind: str, root: str, task: Task,
                 classes: tuple[str, ...], pairs: dict[str, list[tuple[Path, Path]]],
                 report: PairReport, label_fn: Callable[[Path], np.ndarray]) -> None:
        self.name, self.kind, self.root, self.task = name, kind, root, task
        self.classes, self.report = classes, report
        self._label_fn = label_fn
        self._pairs: dict[str, list[tuple[Path, Path]]] = {}
        for split, items in pairs.items():
            good = []
            for image, label in items:
                problem = _pair_problem(image, label)
                if problem:
                    report.bad(split, str(image), str(label), problem)
                else:
                    good.append((image, label))
            self._pairs[split] = good

    def keys(self, split: str) -> list[str]:
        return [str(image.relative_to(self.root)) for image, _ in self._pairs[split]]

    def describe(self, split: str, i: int) -> tuple[str, str]:
        image, label = self._pairs[split][i]
        return str(image), str(label)

    def load(self, split: str, i: int) -> tuple[torch.Tensor, Any]:
        image, label = self._pairs[split][i]
        pixels = read_image(image)
        return pixels, self._label_fn(label)


def _pair_problem(image: Path, label: Path) -> str:
    """Why a pair is unusable from its headers, or "" when it looks fine."""
    if not label.exists():
        return "the label file is missing"
    if not image.exists():
        return "the image file is missing"
    try:
        image_hw = header_size(image)
    except Exception as exc:  # any decoder error means "not readable" here
        return f"the image header cannot be read ({type(exc).__name__}: {exc})"
    try:
        label_hw = header_size(label)
    except Exception as exc:
        return f"the label header cannot be read ({type(exc).__name__}: {exc})"
    if image_hw != label_hw:
        return f"sizes differ: image {image_hw[0]}x{image_hw[1]}, label {label_hw[0]}x{label_hw[1]}"
    return ""


def _match(images_dir: Path, labels_dir: Path, label_suffixes: tuple[str, ...],
           split: str, report: PairReport) -> list[tuple[Path, Path]]:
    """Pairs (image, label) by relative stem; a label without an image is a bad pair too."""
    labels = {p.relative_to(labels_dir).with_suffix(""): p for p in sorted(labels_dir.rglob("*"))
              if p.is_file() and p.suffix.lower() in label_suffixes}
    pairs, used = [], set()
    for image in list_images(images_dir):
        stem = image.relative_to(images_dir).with_suffix("")
        label = labels.get(stem, labels_dir / stem.with_suffix(label_suffixes[0]))
        used.add(stem)
        pairs.append((image, label))
    for stem, label in labels.items():
        if stem not in used:
            report.bad(split, str(images_dir / stem), str(label), "the image file is missing")
    return pairs


def _split_pairs(root: Path, images: str, labels: str, label_suffixes: tuple[str, ...],
                 report: PairReport, val_fraction: float, seed: int,
                 val_list: str | None) -> dict[str, list[tuple[Path, Path]]]:
    """Pairs of `root/{train,val}/{images,labels}`, or of `root/{images,labels}` split."""
    if all((root / s / images).is_dir() for s in SPLITS):
        return {s: _match(root / s / images, root / s / labels, label_suffixes, s, report)
                for s in SPLITS}
    for folder in (root / images, root / labels):
        if not folder.is_dir():
            raise ConfigError(f"{root}: no {folder.name}/ folder (expected {images}/ and {labels}/,"
                              f" or train/ and val/ each holding them)")
    pairs = _match(root / images, root / labels, label_suffixes, "train", report)
    names = [str(image.relative_to(root)) for image, _ in pairs]
    split = split_keys(names, val_fraction, seed, read_list_file(val_list))
    return {s: [pairs[i] for i in split[s]] for s in SPLITS}


def _mask(path: Path, ignore_index: int | None, offset: int, num_classes: int) -> np.ndarray:
    """A class-index mask as int64 [H, W] with IGNORE for unlabelled pixels."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"mask mode {img.mode}: expected one class index per pixel "
                             "(8- or 16-bit gray or palette)")
        raw = np.asarray(img).astype(np.int64)
    mask = raw - offset
    if ignore_index is not None:
        mask[raw == ignore_index] = IGNORE
    mask[(mask < 0) | (mask >= num_classes)] = IGNORE
    return mask


def _depth(path: Path, depth_scale: float) -> np.ndarray:
    """Depth in metres, float32 [H, W], 0 where unknown."""
    if path.suffix.lower() == ".npy":
        depth = np.load(path).astype(np.float32)
    else:
        with Image.open(path) as img:
            if img.mode not in ("I", "I;16", "I;16B"):
                raise ValueError(f"depth PNG mode {img.mode}: expected 16-bit gray")
            depth = np.asarray(img).astype(np.float32) / depth_scale
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth


def open_imagefolder(root: str, *, name: str, report: PairReport, val_fraction: float = 0.2,
                     seed: int = 0, val_list: str | None = None) -> ClassFolder:
    """ImageNet-style class folders (see the module docstring)."""
    return ClassFolder(root, name=name, report=report, val_fraction=val_fraction, seed=seed,
                       val_list=val_list)


class ClassFolder:
    """Classification data: one folder per class."""

    kind = "imagefolder"
    task = Task.classification

    def __init__(self, root: str, *, name: str, report: PairReport, val_fraction: float,
                 seed: int, val_list: str | None) -> None:
        self.name, self.root, self.report = name, root, report
        base = Path(root)
        if not base.is_dir():
            raise ConfigError(f"data: no folder at {root!r}")
        if all((base / s).is_dir() for s in SPLITS):
            per_split = {s: self._items(base / s) for s in SPLITS}
        else:
            items = self._items(base)
            names = [str(p.relative_to(base)) for p, _ in items]
            split = split_keys(names, val_fraction, seed, read_list_file(val_list))
            per_split = {s: [items[i] for i in split[s]] for s in SPLITS}
        self.classes = tuple(sorted({c for items in per_split.values() for _, c in items}))
        if len(self.classes) < 2:
            raise ConfigError(f"{root}: found {len(self.classes)} class folder(s); "
                              "classification needs at least 2 (root/<class>/<image>)")
        index = {c: i for i, c in enumerate(self.classes)}
        self._items = {s: [(p, index[c]) for p, c in items] for s, items in per_split.items()}

    @staticmethod
    def _items(folder: Path) -> list[tuple[Path, str]]:
        return [(p, p.relative_to(folder).parts[0]) for p in list_images(folder)
                if len(p.relative_to(folder).parts) >= 2]

    def keys(self, split: str) -> list[str]:
        return [str(p.relative_to(self.root)) for p, _ in self._items[split]]

    def describe(self, split: str, i: int) -> tuple[str, str]:
        path, label = self._items[split][i]
        return str(path), f"class {self.classes[label]!r}"

    def load(self, split: str, i: int) -> tuple[torch.Tensor, int]:
        path, label = self._items[split][i]
        return read_image(path), label


def open_ade20k(root: str, *, name: str, report: PairReport, **_: Any) -> PairedFolder:
    """The ADE20K SceneParsing layout (see the module docstring)."""
    base = Path(root)
    pairs = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        images, labels = base / "images" / folder, base / "annotations" / folder
        if not images.is_dir() or not labels.is_dir():
            raise ConfigError(f"{root}: not the ADE20K layout; expected images/{folder}/ and "
                              f"annotations/{folder}/")
        pairs[split] = _match(images, labels, (".png",), split, report)
    classes = _ade_names(base) or tuple(f"class_{i:03d}" for i in range(1, 151))
    return PairedFolder(name=name, kind="ade20k", root=root, task=Task.segmentation,
                        classes=classes, pairs=pairs, report=report,
                        label_fn=lambda p: _mask(p, None, 1, len(classes)))


def _ade_names(base: Path) -> tuple[str, ...] | None:
    """The 150 class names of objectInfo150.{txt,csv} (last column, first synonym)."""
    for candidate in (base / "objectInfo150.txt", base / "objectInfo150.csv"):
        if candidate.is_file():
            rows = [re.split(r"[\t,]", line) for line in candidate.read_text().splitlines()[1:]]
            names = tuple(r[-1].split(";")[0].strip().strip('"') for r in rows if len(r) > 1)
            if len(names) == 150:
                return names
    return None


def open_seg_folder(root: str, *, name: str, report: PairReport, val_fraction: float = 0.2,
                    seed: int = 0, val_list: str | None = None,
                    ignore_index: int = 255) -> PairedFolder:
    """Images + class-index masks + classes.txt (see the module docstring)."""
    base = Path(root)
    classes_file = base / "classes.txt"
    if not classes_file.is_file():
        raise ConfigError(f"{root}: no classes.txt (one class name per line, line i = class i)")
    classes = tuple(c.strip() for c in classes_file.read_text().splitlines() if c.strip())
    pairs = _split_pairs(base, "images", "masks", (".png", ".bmp", ".tif", ".tiff"), report,
                         val_fraction, seed, val_list)
    return PairedFolder(name=name, kind="seg-folder", root=root, task=Task.segmentation,
                        classes=classes, pairs=pairs, report=report,
                        label_fn=lambda p: _mask(p, ignore_index, 0, len(classes)))


def open_depth_folder(root: str, *, name: str, report: PairReport, val_fraction: float = 0.2,
                      seed: int = 0, val_list: str | None = None,
                      depth_scale: float = 1000.0) -> PairedFolder:
    """Images + 16-bit PNG or .npy depth maps (see the module docstring)."""
    pairs = _split_pairs(Path(root), "images", "depth", (".png", ".npy"), report,
                         val_fraction, seed, val_list)
    return PairedFolder(name=name, kind="depth-folder", root=root, task=Task.depth, classes=(),
                        pairs=pairs, report=report, label_fn=lambda p: _depth(p, depth_scale))






DATA_KINDS = ("auto", "imagefolder", "ade20k", "nyu-mat", "seg-folder", "depth-folder")


def guess_kind(root: str, task: Task) -> str:
    """The layout of `root` for `task` when the user did not say."""
    base = Path(root)
    if base.suffix.lower() == ".mat":
        return "nyu-mat"
    if (base / "images" / "training").is_dir() and (base / "annotations").is_dir():
        return "ade20k"
    return {Task.classification: "imagefolder", Task.segmentation: "seg-folder",
            Task.depth: "depth-folder"}[task]


def open_labelled(kind: str, root: str, *, task: Task, report: PairReport, name: str = "",
                  val_fraction: float = 0.2, seed: int = 0, val_list: str | None = None,
                  ignore_index: int = 255, depth_scale: float = 1000.0) -> LabelledSource:
    """Open `root` as a labelled dataset of layout `kind` ("auto": guessed) for `task`."""
    from heads.nyu import NyuMat

    kind = guess_kind(root, task) if kind == "auto" else kind
    name = name or Path(root).stem or "data"
    split_args = {"val_fraction": val_fraction, "seed": seed, "val_list": val_list}
    if kind == "imagefolder":
        source: Any = open_imagefolder(root, name=name, report=report, **split_args)
    elif kind == "ade20k":
        source = open_ade20k(root, name=name, report=report)
    elif kind == "nyu-mat":
        source = NyuMat(root, name=name, task=task, report=report, **split_args)
    elif kind == "seg-folder":
        source = open_seg_folder(root, name=name, report=report, ignore_index=ignore_index,
                                 **split_args)
    elif kind == "depth-folder":
        source = open_depth_folder(root, name=name, report=report, depth_scale=depth_scale,
                                   **split_args)
    else:
        raise ConfigError(f"data kind {kind!r}: expected one of {', '.join(DATA_KINDS)}")
    if source.task != task:
        raise ConfigError(f"data {root!r} ({kind}) holds {source.task.value} labels, but the "
                          f"task is {task.value}", hint="pick the matching --task or --kind")
    return source
