"""Augmented views: sampled once by a pure function, stored in the cache, replayed exactly.

Stage one renders each (image, view) for the teachers and stores the view's parameters beside
their tokens; stage two calls `sample_view` again for the student, checks the result against the
stored row (`precompute.view_params.check_replay`) and renders the very same pixels with
`precompute.render.render_view`. Cached features
must never be flipped or cropped after the fact (that is far from equivalent), so every view is
its own sample.

The augmentation follows naver/dune `data/transform.py` (itself DINOv2's recipe):
RandomResizedCrop (bicubic, antialias), horizontal flip, colour jitter applied with p 0.8 in a
random order, grayscale p 0.2, Gaussian blur p 0.2 with a 9-tap kernel and sigma in (0.1, 5.0),
solarize p 0.2 at 0.5. Differences: the photometric steps run in float32 (the reference rounds
to uint8 after each of them), and `center` mode is the largest centred square crop, which is
what the reference's evaluation transform (resize the shorter side, centre crop the same size)
shows the model, up to resampling.

Randomness: one `numpy.random.SeedSequence` per (seed, dataset, image, view), its entropy being
fixed-width 32-bit words of a version tag, the seed, a blake2b digest of the dataset name (never
Python's salted `hash()`), the image index and the view index. It yields `_NUM_SLOTS` uniform
numbers; each decision reads its own fixed slot (see `_SLOT_*`), so changing one probability never
moves another decision, and the layout is part of the cache format: change it only together with
`_RNG_VERSION`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from cache_format.errors import ConfigError
from cache_format.serde import check_choice, check_types
from precompute.view_params import ViewParams

VIEW_MODES: tuple[str, ...] = ("augment", "center")

_RNG_VERSION = 1
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its fallback
_SLOT_CROP = 0  # 2 per attempt: scale, log-ratio
_SLOT_CROP_TOP = 2 * _CROP_ATTEMPTS
_SLOT_CROP_LEFT = _SLOT_CROP_TOP + 1
_SLOT_FLIP = _SLOT_CROP_LEFT + 1
_SLOT_JITTER = _SLOT_FLIP + 1
_SLOT_JITTER_FACTORS = _SLOT_JITTER + 1  # 4: brightness, contrast, saturation, hue
_SLOT_JITTER_ORDER = _SLOT_JITTER_FACTORS + 4  # 4 keys, argsorted into a permutation
_SLOT_GRAYSCALE = _SLOT_JITTER_ORDER + 4
_SLOT_BLUR = _SLOT_GRAYSCALE + 1
_SLOT_BLUR_SIGMA = _SLOT_BLUR + 1
_SLOT_SOLARIZE = _SLOT_BLUR_SIGMA + 1
_NUM_SLOTS = _SLOT_SOLARIZE + 1


# Range checks of ViewConfig fields; their types were checked by `check_types`.
def _check_prob(value: float, field: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"ViewConfig.{field}: expected a probability in [0, 1], found {value!r}")


def _check_range(
    value: tuple[float, float], field: str, *, low: float, high: float = math.inf
) -> None:
    if not low < value[0] <= value[1] <= high:
        bound = f" and <= {high}" if math.isfinite(high) else ""
        raise ConfigError(
            f"ViewConfig.{field}: expected a pair (min, max) with {low} < min <= max{bound}, "
            f"found {value!r}"
        )


@dataclass(frozen=True)
class ViewConfig:
    """How views are drawn: the reference DUNE augmentation by default, or a fixed centre crop.

    `jitter` = (brightness, contrast, saturation, hue) strengths as in torchvision's ColorJitter.
    `blur_sigma` is in output pixels (the blur runs after the resize, as in the reference);
    `blur_kernel_size` is the reference's fixed 9 taps, or 0 to derive it from each drawn sigma
    as 2 * ceil(3 * sigma) + 1 (a kernel covering +-3 sigma). `solarize_threshold` is in [0, 1]
    pixel units: values >= it are inverted (0 is refused: it would invert the whole image, and 0
    marks "no solarize" in the stored parameters).
    """

    mode: str = "augment"
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 5.0)
    blur_kernel_size: int = 9
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_types(self, "ViewConfig")
        check_choice(self.mode, VIEW_MODES, "ViewConfig.mode")
        _check_range(self.scale, "scale", low=0.0, high=1.0)
        _check_range(self.ratio, "ratio", low=0.0)
        _check_range(self.blur_sigma, "blur_sigma", low=0.0)
        for field in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_prob(getattr(self, field), field)
        jitter = self.jitter
        if min(jitter) < 0 or jitter[3] > 0.5:
            raise ConfigError(
                "ViewConfig.jitter: expected (brightness, contrast, saturation, hue) >= 0 with "
                f"hue <= 0.5, found {jitter!r}"
            )
        k = self.blur_kernel_size
        if not (k == 0 or (k >= 3 and k % 2)):
            raise ConfigError(
                "ViewConfig.blur_kernel_size: expected an odd size >= 3, or 0 to derive it from "
                f"sigma, found {k!r}"
            )
        t = self.solarize_threshold
        if not 0.0 < t <= 1.0:
            raise ConfigError(
                f"ViewConfig.solarize_threshold: expected a value in (0, 1], found {t!r}"
            )


def _f32(x: float) -> float:
    """Round to float32 so that a view survives the cache's float32 row bit for bit."""
    return float(np.float32(x))


def _dataset_digest(dataset: str) -> bytes:
    """A stable 128-bit digest of the dataset name (Python's hash() is salted per process)."""
    return hashlib.blake2b(dataset.encode("utf-8"), digest_size=16).digest()


def _uniforms(seed: int, dataset: str, image_index: int, view_index: int) -> np.ndarray:
    """`_NUM_SLOTS` uniforms in [0, 1) that depend only on the four inputs."""
    words = b"".join(
        (
            _RNG_VERSION.to_bytes(4, "little"),
            seed.to_bytes(8, "little"),
            _dataset_digest(dataset),
            image_index.to_bytes(8, "little"),
            view_index.to_bytes(8, "little"),
        )
    )
    entropy = np.frombuffer(words, dtype="<u4").astype(np.uint32)
    state = np.random.SeedSequence(entropy).generate_state(_NUM_SLOTS, dtype=np.uint64)
    # The top 53 bits of each word give a double in [0, 1) with every value equally likely.
    return (state >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _pick(u: float, n: int) -> int:
    """A uniform integer in [0, n) from a uniform float in [0, 1)."""
    return min(int(u * n), n - 1)


def _sample_crop(
    u: np.ndarray, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width): 10 tries, then a centred fallback."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_CROP_ATTEMPTS):
        u_scale, u_ratio = u[_SLOT_CROP + 2 * attempt], u[_SLOT_CROP + 2 * attempt + 1]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        cw = round(math.sqrt(target_area * aspect))
        ch = round(math.sqrt(target_area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = _pick(u[_SLOT_CROP_TOP], h - ch + 1)
            left = _pick(u[_SLOT_CROP_LEFT], w - cw + 1)
            return top, left, ch, cw
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, min(h, max(1, round(w / ratio[0])))
    elif in_ratio > ratio[1]:
        ch, cw = h, min(w, max(1, round(h * ratio[1])))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def derived_blur_kernel(sigma: float) -> int:
    """The odd kernel covering +-3 sigma, used when `blur_kernel_size` is 0."""
    return 2 * math.ceil(3.0 * sigma) + 1


def _check_index(value: int, name: str, bits: int = 64) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise TypeError(f"sample_view: {name} must be an int, found {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"sample_view: {name} must be in [0, 2**{bits}), found {value}")


def sample_view(
    seed: int,
    dataset: str,
    image_index: int,
    view_index: int,
    src_hw: tuple[int, int],
    cfg: ViewConfig,
) -> ViewParams:
    """The view of (seed, dataset, image, view) for a source image of `src_hw`: a pure function.

    Identical inputs give identical parameters in any process on any machine. `center` mode
    ignores the seed and indices: the largest centred square, no flip, no photometric change.
    """
    for value, name in ((seed, "seed"), (image_index, "image_index"), (view_index, "view_index")):
        _check_index(value, name)
    src_h, src_w = (int(v) for v in src_hw)
    if src_h < 1 or src_w < 1:
        raise ValueError(f"sample_view: src_hw must be positive, found {src_hw}")
    if cfg.mode == "center":
        side = min(src_h, src_w)
        return ViewParams(src_h, src_w, (src_h - side) // 2, (src_w - side) // 2, side, side)

    u = _uniforms(int(seed), dataset, int(image_index), int(view_index))
    top, left, crop_h, crop_w = _sample_crop(u, src_h, src_w, cfg.scale, cfg.ratio)

    jitter = bool(u[_SLOT_JITTER] < cfg.jitter_p)
    factors: tuple[float, ...] = (1.0, 1.0, 1.0, 0.0)
    order: tuple[int, ...] = (0, 1, 2, 3)
    if jitter:
        fu = u[_SLOT_JITTER_FACTORS : _SLOT_JITTER_FACTORS + 4]
        b, c, s, h = cfg.jitter
        factors = (
            _f32(max(0.0, 1 - b) + (1 + b - max(0.0, 1 - b)) * fu[0]),
            _f32(max(0.0, 1 - c) + (1 + c - max(0.0, 1 - c)) * fu[1]),
            _f32(max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * fu[2]),
            _f32(-h + 2 * h * fu[3]),
        )
        keys = u[_SLOT_JITTER_ORDER : _SLOT_JITTER_ORDER + 4]
        order = tuple(int(i) for i in np.argsort(keys, kind="stable"))

    blur_sigma, blur_kernel = 0.0, 0
    if u[_SLOT_BLUR] < cfg.blur_p:
        lo, hi = cfg.blur_sigma
        blur_sigma = _f32(lo + (hi - lo) * u[_SLOT_BLUR_SIGMA])
        blur_kernel = cfg.blur_kernel_size or derived_blur_kernel(blur_sigma)

    solarize = _f32(cfg.solarize_threshold) if u[_SLOT_SOLARIZE] < cfg.solarize_p else 0.0
    return ViewParams(
        src_h=src_h,
        src_w=src_w,
        crop_top=top,
        crop_left=left,
        crop_h=crop_h,
        crop_w=crop_w,
        flip=bool(u[_SLOT_FLIP] < cfg.flip_p),
        jitter=jitter,
        brightness=factors[0],
        contrast=factors[1],
        saturation=factors[2],
        hue=factors[3],
        jitter_order=order,  # type: ignore[arg-type]
        grayscale=bool(u[_SLOT_GRAYSCALE] < cfg.grayscale_p),
        blur_sigma=blur_sigma,
        blur_kernel=blur_kernel,
        solarize_threshold=solarize,
    )
