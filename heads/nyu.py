"""The NYU Depth v2 labelled set: one MATLAB v7.3 file (HDF5) read with h5py.

`nyu_depth_v2_labeled.mat` holds, among others, `images` (MATLAB 480x640x3xN uint8), `depths`
(480x640xN float, metres) and `labels` (480x640xN uint16, 0 = unlabelled, 1..894 the raw
classes). HDF5 stores MATLAB arrays with their axes reversed, so h5py sees `images` as
[N, 3, W, H], `depths` and `labels` as [N, W, H]: each sample is transposed back to [H, W].
Labels map to classes as `label - 1`, with 0 ignored; class names come from the file's `names`
cell array when it holds one string per class, else "class_<n>". The file has no split: give
`val_list` (1-based image indices, one per line, e.g. the official test indices) or a
`val_fraction`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from cache_format.errors import ConfigError
from heads.datasets import PairReport, Task, read_list_file, split_keys
from heads.metrics import IGNORE


class NyuMat:
    """Segmentation or depth pairs from the labelled NYU `.mat` file."""

    kind = "nyu-mat"

    def __init__(self, root: str, *, name: str, task: Task, report: PairReport,
                 val_fraction: float = 0.2, seed: int = 0, val_list: str | None = None) -> None:
        if task == Task.classification:
            raise ConfigError("nyu-mat: the NYU file has segmentation and depth labels, "
                              "not image classes; use --task segmentation or depth")
        self.name, self.root, self.task, self.report = name, root, task, report
        path = Path(root)
        if not path.is_file():
            raise ConfigError(f"nyu-mat: no file at {root!r} (nyu_depth_v2_labeled.mat)")
        try:
            with h5py.File(path, "r") as f:
                shapes = {k: f[k].shape for k in ("images", "labels", "depths") if k in f}
                names = _names(f)
        except OSError as exc:
            raise ConfigError(f"nyu-mat: {root!r} is not an HDF5 (MATLAB v7.3) file ({exc})",
                              hint="the labelled NYU v2 file is MATLAB v7.3; re-save others "
                                   "with save(..., '-v7.3')") from None
        label_key = "labels" if task == Task.segmentation else "depths"
        for key in ("images", label_key):
            if key not in shapes:
                raise ConfigError(f"nyu-mat: {root!r} has no {key!r} dataset "
                                  f"(found {sorted(shapes)})")
        count = shapes["images"][0]
        if len(shapes["images"]) != 4 or shapes["images"][1] != 3:
            raise ConfigError(f"nyu-mat: images have shape {shapes['images']}, expected "
                              "[N, 3, W, H] (MATLAB H x W x 3 x N)")
        self._label_key = label_key
        ids = [str(i + 1) for i in range(count)]
        good = []
        label_shape = shapes[label_key]
        for i in range(count):
            if i >= label_shape[0] or tuple(label_shape[1:]) != tuple(shapes["images"][2:]):
                report.bad("train", f"{root}:images[{i + 1}]", f"{root}:{label_key}[{i + 1}]",
                           f"{label_key} has shape {label_shape}, images {shapes['images']}")
            else:
                good.append(i)
        split = split_keys([ids[i] for i in good], val_fraction, seed, read_list_file(val_list))
        self._rows = {s: [good[j] for j in rows] for s, rows in split.items()}
        if names is None and task == Task.segmentation:
            names = tuple(f"class_{i + 1}" for i in range(_max_label(path)))
        self.classes = names or ()
        self._file: h5py.File | None = None

    def _h5(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.root, "r")
        return self._file

    def keys(self, split: str) -> list[str]:
        return [str(i + 1) for i in self._rows[split]]

    def describe(self, split: str, i: int) -> tuple[str, str]:
        row = self._rows[split][i] + 1
        return f"{self.root}:images[{row}]", f"{self.root}:{self._label_key}[{row}]"

    def load(self, split: str, i: int) -> tuple[torch.Tensor, Any]:
        row = self._rows[split][i]
        f = self._h5()
        image = np.ascontiguousarray(np.asarray(f["images"][row]).transpose(0, 2, 1))
        label = np.asarray(f[self._label_key][row]).T
        if self.task == Task.depth:
            depth = label.astype(np.float32)
            depth[~np.isfinite(depth) | (depth < 0)] = 0.0
            return torch.from_numpy(image), depth
        mask = label.astype(np.int64) - 1
        mask[(mask < 0) | (mask >= len(self.classes))] = IGNORE
        return torch.from_numpy(image), mask

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _max_label(path: Path, block: int = 64) -> int:
    """The largest raw label, read a block of images at a time (the full array is ~1 GB)."""
    with h5py.File(path, "r") as f:
        labels = f["labels"]
        return max(int(np.max(labels[i:i + block])) for i in range(0, labels.shape[0], block))


def _names(f: h5py.File) -> tuple[str, ...] | None:
    """Class names from the `names` cell array (object references to uint16 strings)."""
    if "names" not in f:
        return None
    try:
        refs = np.asarray(f["names"]).reshape(-1)
        names = []
        for ref in refs:
            chars = np.asarray(f[ref]).reshape(-1)
            names.append("".join(chr(int(c)) for c in chars))
        return tuple(names)
    except Exception:  # an unexpected names layout only costs the class names
        return None
