"""Features once: a frozen encoder's tokens on a labelled dataset, written through cache_format.

A features folder (`dune-heads features ENCODER DATA --out CACHE`) holds:
- `cache/`: a dune-distill cache (cache_format's writer) with one "teacher", the encoder, and
  one dataset per split (`train`, `val`); one view per image (the whole image resized to
  grid x patch, no augmentation, as the linear protocols do), no view parameters. Its
  manifest's `build_config` records this folder's `FeaturesConfig` and the encoder's facts;
- `labels/train.npy`, `labels/val.npy`: labels in the cache's sample order: class indices
  int64 [N], masks int16 [N, S, S] (IGNORE = -1 unlabelled) or depths float32 [N, S, S]
  (metres, 0 = none), S = `label_size`, resized with nearest-neighbour;
- `features.json`: task, encoder, data, classes, sizes, and every left-out pair with why.

Heads then train from these files any number of times (heads/fit.py).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cache_format.encodings import EncodingSpec, fit_calibration
from cache_format.errors import BadImageError, ConfigError
from cache_format.manifest import (
    STATUS_OK,
    DatasetFingerprint,
    Manifest,
    TeacherFingerprint,
    keys_sha256,
    status_code,
)
from cache_format.reader import open_cache
from cache_format.serde import check_choice, to_dict
from cache_format.writer import CacheWriter
from heads.datasets import SPLITS, LabelledSource, OnBad, PairReport, Task
from heads.encoders import FrozenEncoder
from heads.metrics import IGNORE
from heads.readers import DATA_KINDS, open_labelled

FEATURES_FORMAT = "dune-heads-features/1"
INFO_FILE = "features.json"


@dataclass(frozen=True)
class FeaturesConfig:
    """How features are extracted (stored in features.json and the cache's build_config)."""

    task: str
    data: str
    data_kind: str = "auto"
    grid: int = 32
    label_size: int | None = None
    encoding: str = "fp16"
    batch_size: int = 32
    samples_per_shard: int = 256
    val_fraction: float = 0.2
    val_list: str | None = None
    seed: int = 0
    on_bad: str = "skip"
    ignore_index: int = 255
    depth_scale: float = 1000.0

    def __post_init__(self) -> None:
        check_choice(self.task, tuple(Task), "task")
        check_choice(self.on_bad, tuple(OnBad), "on_bad")
        check_choice(self.data_kind, DATA_KINDS, "data_kind")
        for name in ("grid", "batch_size", "samples_per_shard"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: expected a positive int, found {getattr(self, name)}")
        if self.label_size is not None and self.label_size <= 0:
            raise ConfigError(f"label_size: expected a positive int, found {self.label_size}")

    @property
    def labels_side(self) -> int:
        """Side of the stored label maps (default: the grid at patch 14, the student's size)."""
        return self.label_size or self.grid * 14


def preprocess(image: torch.Tensor, size: tuple[int, int], mean: tuple[float, ...],
               std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [3, H, W] -> normalized float32 [3, h, w] (bicubic, antialiased resize)."""
    return preprocess_batch([image], size, mean, std)[0]


def preprocess_batch(images: list[torch.Tensor], size: tuple[int, int],
                     mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images [3, H, W] -> normalized float32 [B, 3, h, w]; only resized ones are
    converted one by one, the rest in one batched conversion."""
    resized = []
    for image in images:
        if tuple(image.shape[-2:]) != tuple(size):
            x = F.interpolate(image.float()[None], size=size, mode="bicubic", antialias=True,
                              align_corners=False)[0]
            image = x.clamp(0.0, 255.0)
        resized.append(image)
    batch = torch.stack([x.float() for x in resized]) if resized else torch.zeros(0, 3, *size)
    m = torch.tensor(mean, dtype=torch.float32).mul(255.0)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32).mul(255.0)[:, None, None]
    return (batch - m) / s


def resize_label(label: np.ndarray, side: int) -> np.ndarray:
    """Nearest-neighbour resize of a mask or depth map to side x side (values never mixed)."""
    t = torch.from_numpy(np.ascontiguousarray(label)).double()[None, None]
    return F.interpolate(t, size=(side, side), mode="nearest")[0, 0].numpy()


def extract_features(encoder: FrozenEncoder, cfg: FeaturesConfig, out: str | Path, *,
                     overwrite: bool = False, log: Any = None) -> dict[str, Any]:
    """Compute `encoder`'s tokens on `cfg.data` and write the features folder `out`.

    Returns the features.json content. Bad pairs follow `cfg.on_bad` (skip and count, or raise
    BadPairError naming both files).
    """
    out = Path(out)
    if (out / INFO_FILE).exists() or (out / "cache").exists():
        if not overwrite:
            raise ConfigError(f"{out}: a features folder is already there",
                              hint="pass --overwrite to replace it, or another --out")
        shutil.rmtree(out)
    task = Task(cfg.task)
    report = PairReport(OnBad(cfg.on_bad))
    source = open_labelled(cfg.data_kind, cfg.data, task=task, report=report,
                           val_fraction=cfg.val_fraction, seed=cfg.seed, val_list=cfg.val_list,
                           ignore_index=cfg.ignore_index, depth_scale=cfg.depth_scale)
    grid = (cfg.grid, cfg.grid)
    manifest = Manifest(grid=grid, student_patch=encoder.patch_size, views_per_image=1,
                        view_mode="resize", seed=cfg.seed,
                        samples_per_shard=cfg.samples_per_shard,
                        encoding=EncodingSpec(cfg.encoding), view_param_names=(),
                        build_config={"heads_features": to_dict(cfg),
                                      "encoder": encoder_facts(encoder)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    writer = CacheWriter.create(out / "cache", manifest)
    fingerprint = TeacherFingerprint(
        name=encoder.name, arch=encoder.arch, checkpoint_sha256=encoder.weights,
        input_size=encoder.input_size(grid), patch_size=encoder.patch_size,
        mean=encoder.mean, std=encoder.std, token_types=encoder.token_types, dim=encoder.dim)
    started, counts = time.perf_counter(), {}
    for split in SPLITS:
        keys = source.keys(split)
        if not keys:
            raise ConfigError(f"{cfg.data}: split {split!r} has no usable pair "
                              f"({len(report.skipped)} left out)")
        writer.add_dataset(DatasetFingerprint(
            name=split, source_kind=source.kind, root=str(Path(cfg.data).resolve()),
            num_images=len(keys), keys_sha256=keys_sha256(keys), domain=task.value), keys)
        counts[split] = _write_split(writer, source, split, encoder, fingerprint, cfg, task,
                                     report, out / "labels" / f"{split}.npy", log)
    info = {
        "format": FEATURES_FORMAT, "task": task.value, "encoder": encoder_facts(encoder),
        "data": {"kind": source.kind, "root": str(Path(cfg.data).resolve()),
                 "name": source.name},
        "classes": list(source.classes), "grid": list(grid), "label_size": cfg.labels_side,
        "splits": counts, "skipped": [s.to_dict() for s in report.skipped],
        "config": to_dict(cfg), "seconds": round(time.perf_counter() - started, 2),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def encoder_facts(encoder: FrozenEncoder) -> dict[str, Any]:
    """What a features folder and a head run record about the encoder."""
    return {"name": encoder.name, "spec": encoder.spec, "arch": encoder.arch,
            "weights": encoder.weights, "patch_size": encoder.patch_size, "dim": encoder.dim,
            "token_types": list(encoder.token_types)}


def _label_array(path: Path, task: Task, n: int, side: int) -> np.ndarray:
    if task == Task.classification:
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(n,))
    dtype = np.int16 if task == Task.segmentation else np.float32
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, side, side))
    arr[:] = IGNORE if task == Task.segmentation else 0
    return arr


def _write_split(writer: CacheWriter, source: LabelledSource, split: str, encoder: FrozenEncoder,
                 fingerprint: TeacherFingerprint, cfg: FeaturesConfig, task: Task,
                 report: PairReport, labels_path: Path, log: Any) -> dict[str, int]:
    """Encode one split shard by shard; returns {"ok": n, "failed": n}."""
    n, side = len(source.keys(split)), cfg.labels_side  # one view per image
    labels = _label_array(labels_path, task, n, side)
    size = encoder.input_size((cfg.grid, cfg.grid))
    added, failed = False, 0
    for shard in range(writer.num_shards(split)):
        start, stop = writer.shard_bounds(split, shard)
        images, status = [], np.full(stop - start, STATUS_OK, np.uint8)
        for i in range(start, stop):
            try:
                image, label = source.load(split, i)
                if task != Task.classification and tuple(label.shape) != tuple(image.shape[1:]):
                    raise ValueError(f"label {tuple(label.shape)} and image "
                                     f"{tuple(image.shape[1:])} sizes differ")
            except (BadImageError, OSError, ValueError) as exc:
                image_name, label_name = source.describe(split, i)
                report.bad(split, image_name, label_name, f"{type(exc).__name__}: {exc}")
                reason = exc.reason if isinstance(exc, BadImageError) else "unreadable"
                status[i - start] = status_code(reason)
                images.append(torch.zeros(3, *size, dtype=torch.uint8))
                failed += 1
                continue
            images.append(image)
            labels[i] = label if task == Task.classification else resize_label(label, side)
        valid = status == STATUS_OK
        pixels = preprocess_batch(images, size, encoder.mean, encoder.std)
        tokens = _encode(encoder, pixels, cfg.batch_size)
        if not added:
            calibration = ({tok: fit_calibration(x[valid] if valid.any() else x)
                            for tok, x in tokens.items()}
                           if EncodingSpec(cfg.encoding).has_scale else None)
            writer.add_teacher(split, fingerprint, calibration)
            added = True
        writer.write_index_shard(split, shard, np.zeros((stop - start, 0), np.float32), status)
        writer.index_shard_done(split, shard)
        writer.write_shard(split, encoder.name, shard, tokens, valid)
        writer.shard_done(split, encoder.name, shard)
        if log is not None:
            log(f"{encoder.name} {split}: {stop}/{n} images")
    writer.finalize_stats(split, encoder.name)
    labels.flush()
    return {"ok": n - failed, "failed": failed}


def _encode(encoder: FrozenEncoder, pixels: torch.Tensor, batch: int) -> dict[str, np.ndarray]:
    """Tokens of a stack of normalized images, batch by batch, as float32 numpy arrays."""
    device = encoder.device
    parts: dict[str, list[np.ndarray]] = {}
    for first in range(0, pixels.shape[0], batch):
        x = pixels[first:first + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = encoder.forward_tokens(x)
        for tok, value in out.items():
            parts.setdefault(tok, []).append(value.float().cpu().numpy())
    return {tok: np.concatenate(v) for tok, v in parts.items()}


@dataclass(frozen=True, eq=False)
class Features:
    """An opened features folder: the cache reader, its facts and its labels."""

    path: Path
    info: dict[str, Any]
    reader: Any

    @property
    def task(self) -> Task:
        return Task(self.info["task"])

    @property
    def encoder(self) -> str:
        return self.info["encoder"]["name"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.info["classes"])

    def ok(self, split: str) -> np.ndarray:
        """Indices of the split's samples whose features exist."""
        return np.flatnonzero(self.reader.index(split).ok)

    def labels(self, split: str) -> np.ndarray:
        """The split's labels (memory-mapped), in sample order."""
        return np.load(self.path / "labels" / f"{split}.npy", mmap_mode="r")

    def standardization(self, tok: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact per-channel mean and std of `tok` over the train split (the cache's stats)."""
        stats = self.reader.stats(self.encoder, tok, datasets=["train"])
        return (torch.as_tensor(stats.mean, dtype=torch.float32),
                torch.as_tensor(np.maximum(stats.std, 1e-6), dtype=torch.float32))


def open_features(path: str | Path) -> Features:
    """Open a folder written by `extract_features` (read-only)."""
    path = Path(path)
    if not (path / INFO_FILE).is_file():
        raise ConfigError(f"{path}: no {INFO_FILE}; not a features folder",
                          hint="create one with `dune-heads features ENCODER DATA --out PATH`")
    info = json.loads((path / INFO_FILE).read_text())
    if info.get("format") != FEATURES_FORMAT:
        raise ConfigError(f"{path}/{INFO_FILE}: format {info.get('format')!r}, expected "
                          f"{FEATURES_FORMAT!r}")
    return Features(path, info, open_cache(path / "cache"))
