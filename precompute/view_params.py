"""One view as the cache stores it: `ViewParams`, its float32 row, and the replay check.

Stage one stores each view's parameters beside its tokens (a row of `VIEW_PARAM_NAMES`); stage
two samples the view again (`precompute.views.sample_view`), checks it against the stored row
(`check_replay`) and renders it (`precompute.render.render_view`). This module is the leaf both
of those import, so that sampling and rendering do not import each other.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass

import numpy as np

from cache_format.errors import CacheCorruptionError, CacheMismatchError, ConfigError

VIEW_PARAM_NAMES: tuple[str, ...] = (
    "src_h", "src_w", "crop_top", "crop_left", "crop_h", "crop_w",
    "flip", "jitter", "brightness", "contrast", "saturation", "hue",
    "jitter_order_0", "jitter_order_1", "jitter_order_2", "jitter_order_3",
    "grayscale", "blur_sigma", "blur_kernel", "solarize_threshold",
)  # fmt: skip
NUM_VIEW_PARAMS = len(VIEW_PARAM_NAMES)

# Jitter operation ids as stored in the jitter_order columns (torchvision's ColorJitter ids).
JITTER_OPS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class ViewParams:
    """One view, as stored in a cache row (`to_array`, columns `VIEW_PARAM_NAMES`).

    The crop box is in source pixels. Identity values mean "not applied": jitter False with
    factors (1, 1, 1, 0) and order (0, 1, 2, 3), blur_sigma 0 with blur_kernel 0,
    solarize_threshold 0. Float fields hold float32-representable values.
    """

    src_h: int
    src_w: int
    crop_top: int
    crop_left: int
    crop_h: int
    crop_w: int
    flip: bool = False
    jitter: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    jitter_order: tuple[int, int, int, int] = (0, 1, 2, 3)
    grayscale: bool = False
    blur_sigma: float = 0.0
    blur_kernel: int = 0
    solarize_threshold: float = 0.0

    def __post_init__(self) -> None:
        if min(self.src_h, self.src_w, self.crop_h, self.crop_w) < 1:
            raise ConfigError(f"ViewParams: image and crop sizes must be >= 1, found {self}")
        if (
            self.crop_top < 0
            or self.crop_left < 0
            or self.crop_top + self.crop_h > self.src_h
            or self.crop_left + self.crop_w > self.src_w
        ):
            raise ConfigError(
                f"ViewParams.crop_*: the box top={self.crop_top} left={self.crop_left} "
                f"h={self.crop_h} w={self.crop_w} leaves the {self.src_h}x{self.src_w} image"
            )
        if sorted(self.jitter_order) != [0, 1, 2, 3]:
            raise ConfigError(
                f"ViewParams.jitter_order: expected a permutation of 0..3, "
                f"found {self.jitter_order!r}"
            )
        if min(self.brightness, self.contrast, self.saturation) < 0 or abs(self.hue) > 0.5:
            raise ConfigError(f"ViewParams: jitter factors out of range in {self}")
        blur_off = self.blur_sigma == 0 and self.blur_kernel == 0
        blur_on = self.blur_sigma > 0 and self.blur_kernel >= 1 and self.blur_kernel % 2 == 1
        if not (blur_off or blur_on):
            raise ConfigError(
                f"ViewParams.blur_*: expected sigma > 0 with an odd kernel, or both 0, found "
                f"sigma={self.blur_sigma} kernel={self.blur_kernel}"
            )
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise ConfigError(
                f"ViewParams.solarize_threshold: expected a value in [0, 1], "
                f"found {self.solarize_threshold}"
            )

    def to_array(self) -> np.ndarray:
        """The float32 row stored in the cache, in `VIEW_PARAM_NAMES` order."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        flat: list[float] = []
        for value in values:
            flat.extend(value if isinstance(value, tuple) else [value])
        return np.asarray(flat, dtype=np.float32)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> ViewParams:
        """Rebuild from a stored row; a row that is not a valid view is a CacheCorruptionError."""
        row = np.asarray(arr, dtype=np.float32)
        problem = ""
        if row.shape != (NUM_VIEW_PARAMS,):
            problem = f"expected {NUM_VIEW_PARAMS} values, found shape {row.shape}"
        elif not np.all(np.isfinite(row)):
            problem = "non-finite values"
        values: dict[str, object] = {}
        column = 0
        for field in dataclasses.fields(cls) if not problem else ():
            # Real types (never the annotation strings): (int,) * 4 for jitter_order, else (T,).
            kinds = _column_types(field.name)
            kind, width = kinds[0], len(kinds)
            cells = [float(v) for v in row[column : column + width]]
            column += width
            if kind is not float and not all(v.is_integer() for v in cells):
                problem = f"non-integral {field.name} {cells}"
            elif kind is bool and cells[0] not in (0.0, 1.0):
                problem = f"flag {field.name} is {cells[0]}, not 0 or 1"
            elif kind is bool:
                values[field.name] = bool(cells[0])
            elif kind is float:
                values[field.name] = cells[0]
            else:
                ints = tuple(int(v) for v in cells)
                values[field.name] = ints if width > 1 else ints[0]
        try:
            if not problem:
                return cls(**values)  # type: ignore[arg-type]
        except ConfigError as exc:
            problem = str(exc)
        raise CacheCorruptionError(
            f"view parameters: the stored row {row.tolist()} is not a valid view ({problem}); "
            "the cache's index is damaged (run `dune-cache verify`)"
        )


@functools.cache
def _column_types(name: str) -> tuple[type, ...]:
    """The column types of field `name`: `(T,)` for a scalar, `(int,) * 4` for jitter_order."""
    hint = typing.get_type_hints(ViewParams)[name]
    return typing.get_args(hint) or (hint,)


def check_replay(stored: np.ndarray, replayed: ViewParams, *, where: str = "") -> None:
    """Raise CacheMismatchError naming every column where a replayed view differs from its row."""
    prefix = f"{where}: " if where else ""
    row = np.asarray(stored)
    if row.shape != (NUM_VIEW_PARAMS,):
        raise CacheMismatchError(
            f"{prefix}stored view row has shape {row.shape}, expected ({NUM_VIEW_PARAMS},) "
            "(the cache was written with other view columns; rebuild it)"
        )
    fresh = replayed.to_array()
    row = row.astype(np.float32)
    differ = [i for i in range(NUM_VIEW_PARAMS) if not row[i] == fresh[i]]
    if differ:
        detail = ", ".join(
            f"{VIEW_PARAM_NAMES[i]} (stored {row[i]:g}, replayed {fresh[i]:g})" for i in differ
        )
        raise CacheMismatchError(
            f"{prefix}the replayed view differs from the cached one in {detail}; the images, "
            "the seed or the view config changed since the cache was built (train with the "
            "build's settings, or rebuild the cache)"
        )
