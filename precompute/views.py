"""Augmented views: sampled once by a pure function, stored in the cache, replayed exactly.

Stage one renders each (image, view) for the teachers and stores the view's parameters beside
their tokens; stage two calls `sample_view` again for the student, checks the result against the
stored row (`check_replay`) and renders the very same pixels with `render_view`. Cached features
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

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torch import Tensor

from cache_format.errors import CacheCorruptionError, CacheMismatchError, ConfigError

VIEW_MODES: tuple[str, ...] = ("augment", "center")

VIEW_PARAM_NAMES: tuple[str, ...] = (
    "src_h", "src_w", "crop_top", "crop_left", "crop_h", "crop_w",
    "flip", "jitter", "brightness", "contrast", "saturation", "hue",
    "jitter_order_0", "jitter_order_1", "jitter_order_2", "jitter_order_3",
    "grayscale", "blur_sigma", "blur_kernel", "solarize_threshold",
)  # fmt: skip
NUM_VIEW_PARAMS = len(VIEW_PARAM_NAMES)

# Jitter operation ids as stored in the jitter_order columns (torchvision's ColorJitter ids).
JITTER_OPS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")

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


def _check_prob(value: float, field: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"ViewConfig.{field}: expected a probability in [0, 1], found {value!r}")


def _check_range(
    value: tuple[float, float], field: str, *, low: float, high: float = math.inf
) -> None:
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and low < value[0] <= value[1] <= high
    )
    if not ok:
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
        if self.mode not in VIEW_MODES:
            raise ConfigError(
                f"ViewConfig.mode: expected one of {', '.join(VIEW_MODES)}, found {self.mode!r}"
            )
        _check_range(self.scale, "scale", low=0.0, high=1.0)
        _check_range(self.ratio, "ratio", low=0.0)
        _check_range(self.blur_sigma, "blur_sigma", low=0.0)
        for field in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_prob(getattr(self, field), field)
        jitter = self.jitter
        if (
            not isinstance(jitter, tuple)
            or len(jitter) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in jitter)
            or min(jitter) < 0
            or jitter[3] > 0.5
        ):
            raise ConfigError(
                "ViewConfig.jitter: expected (brightness, contrast, saturation, hue) >= 0 with "
                f"hue <= 0.5, found {jitter!r}"
            )
        k = self.blur_kernel_size
        if not isinstance(k, int) or isinstance(k, bool) or not (k == 0 or (k >= 3 and k % 2)):
            raise ConfigError(
                "ViewConfig.blur_kernel_size: expected an odd size >= 3, or 0 to derive it from "
                f"sigma, found {k!r}"
            )
        t = self.solarize_threshold
        if not isinstance(t, int | float) or isinstance(t, bool) or not 0.0 < t <= 1.0:
            raise ConfigError(
                f"ViewConfig.solarize_threshold: expected a value in (0, 1], found {t!r}"
            )


def _f32(x: float) -> float:
    """Round to float32 so that a view survives the cache's float32 row bit for bit."""
    return float(np.float32(x))


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
            # Annotations are strings here (postponed evaluation).
            width = 4 if field.name == "jitter_order" else 1
            cells = [float(v) for v in row[column : column + width]]
            column += width
            if field.type != "float" and not all(v.is_integer() for v in cells):
                problem = f"non-integral {field.name} {cells}"
            elif field.type == "bool" and cells[0] not in (0.0, 1.0):
                problem = f"flag {field.name} is {cells[0]}, not 0 or 1"
            elif field.type == "bool":
                values[field.name] = bool(cells[0])
            elif field.type == "float":
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


def _to_hw(out_hw: Sequence[int], who: str) -> tuple[int, int]:
    if len(out_hw) != 2 or min(int(v) for v in out_hw) < 1:
        raise ValueError(f"{who}: out_hw must be two positive sizes, found {out_hw}")
    return int(out_hw[0]), int(out_hw[1])


def _adjust_contrast(x: Tensor, factor: float) -> Tensor:
    # torchvision's contrast, with the mean reduced in float64 so that it does not depend on
    # the number of threads splitting the sum.
    mean = tvf.rgb_to_grayscale(x).double().mean().float()
    return (factor * x + (1.0 - factor) * mean).clamp_(0.0, 1.0)


def _gaussian_blur(x: Tensor, sigma: float, kernel: int) -> Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's kernel), thread-independent.

    A kernel wider than the image allows (reflect padding needs pad < side) is narrowed to the
    widest odd size that fits; this only happens on tiny test images.
    """
    h, w = x.shape[-2:]
    kernel = min(kernel, 2 * min(h, w) - 1)
    if kernel < 3:
        return x
    half = kernel // 2
    taps = torch.arange(-half, half + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = (weights / weights.sum()).tolist()
    # Shifted weighted sums instead of conv2d, with separate multiply and add (no fused
    # multiply-add): element-wise IEEE arithmetic in a fixed order gives the same bits whatever
    # the thread count or vector width.
    padded = nnf.pad(x[None], (half, half, 0, 0), mode="reflect")[0]
    rows = padded[..., :, 0:w] * weights[0]
    tmp = torch.empty_like(rows)
    for k in range(1, kernel):
        rows.add_(torch.mul(padded[..., :, k : k + w], weights[k], out=tmp))
    padded = nnf.pad(rows[None], (0, 0, half, half), mode="reflect")[0]
    out = padded[..., 0:h, :] * weights[0]
    for k in range(1, kernel):
        out.add_(torch.mul(padded[..., k : k + h, :], weights[k], out=tmp))
    return out


_HUE_OFFSETS = (5.0, 3.0, 1.0)  # where each of R, G, B sits on the hue hexagon (in sixths)


def _adjust_hue(x: Tensor, factor: float) -> Tensor:
    """Rotate hue by `factor` turns in HSV, as torchvision's adjust_hue (within 2e-6), faster.

    Value (max) and chroma (max - min) are kept; each channel is max - chroma * ramp(k) with
    k = (offset + 6 * hue) mod 6 and ramp(k) = clamp(min(k, 4 - k), 0, 1) = clamp(2 - |k - 2|, 0, 1)
    on [0, 6).
    """
    maxc, minc = x.amax(0), x.amin(0)
    chroma = maxc - minc
    r, g, b = x.unbind(0)
    inv = 1.0 / chroma.clamp(min=1e-12)  # chroma 0: the hue is irrelevant (times chroma)
    # Sector masks with torchvision's tie order: red, then green, then blue.
    is_r = (r == maxc).to(x.dtype)
    is_g = (g == maxc).to(x.dtype) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    hue6 = is_r * ((g - b) * inv) + is_g * (2.0 + (b - r) * inv) + is_b * (4.0 + (r - g) * inv)
    offsets = torch.tensor(_HUE_OFFSETS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    k = offsets + (hue6 + 6.0 * factor)
    k = k - 6.0 * torch.floor(k * (1.0 / 6.0))  # mod 6; ramp is 0 near both ends, so
    ramp = (2.0 - (k - 2.0).abs_()).clamp_(0.0, 1.0)  # rounding at the wrap is harmless
    return maxc - chroma * ramp


def render_view(image: Tensor, params: ViewParams, out_hw: tuple[int, int]) -> Tensor:
    """Render a view: float32 RGB [3, h, w] in [0, 1], bit-identical on every call.

    Order as in the reference: crop, bicubic antialiased resize, flip, colour jitter in the
    recorded order, grayscale, Gaussian blur, solarize. CPU only (views are rendered in data
    workers): the resize runs in uint8 like the reference's, the rest in float32, and the bits
    are the same whatever the thread count.
    """
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(
            f"render_view: expected a uint8 tensor [3, H, W], found "
            f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}"
        )
    if image.device.type != "cpu":
        raise ValueError(
            f"render_view: expected a CPU image, found one on {image.device}; render views in "
            "the data workers and move the batch to the device afterwards"
        )
    if image.shape[0] != 3:
        raise ValueError(f"render_view: expected 3 channels, found {image.shape[0]}")
    if tuple(image.shape[1:]) != (params.src_h, params.src_w):
        raise CacheMismatchError(
            f"render_view: the image is {image.shape[1]}x{image.shape[2]} but the view was drawn "
            f"for a {params.src_h}x{params.src_w} source; the image changed since the view was "
            "sampled (rebuild the cache or restore the original image)"
        )
    out_h, out_w = _to_hw(out_hw, "render_view")
    crop = image[
        :,
        params.crop_top : params.crop_top + params.crop_h,
        params.crop_left : params.crop_left + params.crop_w,
    ]
    # Resize in uint8 as the reference does (it rounds to uint8 here too); Torch's uint8
    # antialiased path is also about twice as fast as float on CPU.
    x = nnf.interpolate(
        crop[None], size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False
    )
    x = x[0].to(torch.float32).div_(255.0)
    if params.flip:
        x = x.flip(-1)
    if params.jitter:
        for op in params.jitter_order:
            # An identity factor is skipped, as torchvision skips a disabled jitter component.
            if op == 0 and params.brightness != 1.0:
                x = tvf.adjust_brightness(x, params.brightness)
            elif op == 1 and params.contrast != 1.0:
                x = _adjust_contrast(x, params.contrast)
            elif op == 2 and params.saturation != 1.0:
                x = tvf.adjust_saturation(x, params.saturation)
            elif op == 3 and params.hue != 0.0:
                x = _adjust_hue(x, params.hue)
    if params.grayscale:
        x = tvf.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur_kernel:
        x = _gaussian_blur(x, params.blur_sigma, params.blur_kernel)
    if params.solarize_threshold > 0:
        x = torch.where(x >= params.solarize_threshold, 1.0 - x, x)
    return x.clamp(0.0, 1.0).contiguous()  # out of place: grayscale returns an expanded view


def resize_for_teacher(x: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Resize a batch of rendered views [B, 3, h, w] to a teacher's input size (bicubic,
    antialias, clamped to [0, 1]): a /16 teacher sees the /14 student's image scaled by 16/14 so
    that both token grids match. The same size is returned unchanged."""
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(
            f"resize_for_teacher: expected float [B, 3, h, w], found {x.dtype} {tuple(x.shape)}"
        )
    out_h, out_w = _to_hw(out_hw, "resize_for_teacher")
    if tuple(x.shape[-2:]) == (out_h, out_w):
        return x
    y = nnf.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)
    return y.clamp_(0.0, 1.0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel for [..., 3, H, W] images in [0, 1]."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalize: expected 3 means and 3 positive stds, found {mean}, {std}")
    shape = (3, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s
