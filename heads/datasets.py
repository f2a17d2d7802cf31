"""Labelled datasets for the heads: what a sample is, how pairs are checked, how splits form.

A `LabelledSource` lists (image, label) pairs per split and decodes one on demand:
`load(split, i) -> (uint8 image tensor [3, H, W], label)` where the label is a class index
(classification), an int64 mask [H, W] with `IGNORE` for unlabelled pixels (segmentation) or
float32 depths [H, W] in metres with 0 where there is none (depth).

Pairs are checked before any feature is computed, from file headers only: a missing partner, a
size mismatch or an unreadable label header is a bad pair. With `on_bad="skip"` (the default)
bad pairs are left out and counted in the report (`skipped`); with `on_bad="error"` the first one
raises `BadPairError` naming both files. A pair that passes the header check but fails to decode
later is handled by the same policy at extraction time.

The readers of each layout are in `heads/readers.py` (folders, ADE20K) and `heads/nyu.py`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cache_format.errors import ConfigError, DuneError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val")


class Task(enum.StrEnum):
    """What a head predicts."""

    classification = "classification"
    segmentation = "segmentation"
    depth = "depth"



class OnBad(enum.StrEnum):
    """What to do with a bad (image, label) pair."""

    skip = "skip"
    error = "error"


class BadPairError(DuneError, ValueError):
    """An (image, label) pair cannot be used; the message names both files and the reason."""

    def __init__(self, message: str, *, image: str = "", label: str = "", reason: str = "") -> None:
        super().__init__(message, hint="fix or remove the pair, or keep the default "
                                        "on_bad='skip' to leave it out and count it")
        self.image, self.label, self.reason = image, label, reason

    def __reduce__(self) -> tuple:
        # keyword-only fields: default exception pickling would lose them across processes
        return (_rebuild_bad_pair, (str(self), self.image, self.label, self.reason))


def _rebuild_bad_pair(message: str, image: str, label: str, reason: str) -> BadPairError:
    return BadPairError(message, image=image, label=label, reason=reason)


@dataclass(frozen=True)
class SkippedPair:
    """One left-out pair, as the report lists it."""

    split: str
    image: str
    label: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"split": self.split, "image": self.image, "label": self.label,
                "reason": self.reason}


@dataclass
class PairReport:
    """Bad pairs found so far, and the policy that decides what happens to the next one."""

    on_bad: OnBad = OnBad.skip
    skipped: list[SkippedPair] = field(default_factory=list)

    def bad(self, split: str, image: str, label: str, reason: str) -> None:
        """Record a bad pair, or raise under `on_bad="error"`."""
        if self.on_bad == OnBad.error:
            raise BadPairError(f"bad pair in split {split!r}: image {image!r} and label "
                               f"{label!r}: {reason}", image=image, label=label, reason=reason)
        self.skipped.append(SkippedPair(split, image, label, reason))


class LabelledSource(Protocol):
    """What every dataset reader provides."""

    name: str
    kind: str
    root: str
    task: Task
    classes: tuple[str, ...]
    report: PairReport

    def keys(self, split: str) -> list[str]:
        """Stable ids of the split's good pairs, in order (the cache's keys)."""
        ...

    def describe(self, split: str, i: int) -> tuple[str, str]:
        """The (image, label) file names of pair `i`, for messages."""
        ...

    def load(self, split: str, i: int) -> tuple[torch.Tensor, Any]:
        """Pair `i` of `split`: uint8 RGB [3, H, W] and its label."""
        ...


def split_keys(names: Sequence[str], val_fraction: float, seed: int,
               val_list: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Positions of `names` for train and val: `val_list` when given, else a seeded fraction.

    Deterministic: the same names, fraction and seed give the same split on every machine.
    """
    if val_list is not None:
        wanted = set(val_list)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise ConfigError(f"val_list: {len(unknown)} entries name no pair of the dataset "
                              f"(first: {unknown[:3]})", hint="list image keys as the "
                              "dataset names them (relative paths, or 1-based NYU indices)")
        val = [i for i, n in enumerate(names) if n in wanted]
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected a fraction in (0, 1), found {val_fraction}")
        order = np.random.default_rng(seed).permutation(len(names))
        count = max(1, round(len(names) * val_fraction))
        val = sorted(int(i) for i in order[:count])
    val_set = set(val)
    train = [i for i in range(len(names)) if i not in val_set]
    if not train or not val:
        raise ConfigError(f"the split leaves {len(train)} train and {len(val)} val pairs; "
                          "both need at least one", hint="add data or change val_fraction")
    return {"train": train, "val": val}


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted by relative path."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_list_file(path: str | None) -> list[str] | None:
    """Non-empty, non-comment lines of a text file (None when no file is given)."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"val_list: no file at {str(file)!r}")
    lines = [line.strip() for line in file.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]
