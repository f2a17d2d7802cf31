"""Token encodings of a cache: fp16, bf16 (stored as uint16 bit patterns), int8, int4, int4h.

`int8` first standardizes each channel with calibration statistics (mean/std per channel from a
calibration sample, stored in the cache), then scales each token by its absolute maximum to
[-127, 127] and keeps that scale (float32) beside the token. Standardizing first matters:
pretrained transformers carry a few channels 50-200x larger than the median, and a plain
per-token absmax would spend the whole int8 range on them.

The calibration cannot break it: a token with a standardized value past FALLBACK_Z_BOUND (e.g. a
channel that was nearly constant in the calibration sample and varies later) falls back to a gain
floored at the median calibration std (`fallback_gain`) and is marked by a negative scale. Its error
per channel is then at most (gain_c / median std) x max_j |x_j - mean_j| / 254 whatever the
calibration saw; the writer counts the values outside the calibrated range (|z| > INT8_Z_BOUND) per
pair (`count_out_of_range`) so `info` and `verify` show them.

`int4` and `int4h` standardize exactly as int8 does (same calibration, same bound, same fallback
gain), then store 4-bit values with a float16 scale per group of 128 channels; `int4h` first
rotates the standardized channels with a fixed block-Hadamard transform. The arithmetic is in
int4.py; a fallback token has its group scales negated. docs/encodings.md says why these two
and not PCA-k or PHI-S.

Decoding exists twice with the same formula: `decode_tokens` (numpy, CPU) and
`decode_tokens_torch` (runs on the tensors' device, so a trainer can ship int8 to the GPU).
Decoding by hand with plain numpy is documented in docs/cache-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache_format import int4
from cache_format.errors import ConfigError, InvalidTokensError
from cache_format.serde import check_choice

ENCODING_NAMES = ("fp16", "bf16", "int8", "int4", "int4h")
#: Encodings that standardize with a per-pair calibration and store per-token scales.
CALIBRATED = ("int8", "int4", "int4h")
CODEC_NAMES = ("none", "zstd", "blosc")
#: numpy dtype each encoding stores its token values in.
STORED_DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "int8": np.dtype("i1"),
                 "int4": np.dtype("u1"), "int4h": np.dtype("u1")}
INT8_MAX = 127
#: Floor of a stored calibration std, as a fraction of the median channel std: a channel that is
#: (nearly) constant on the calibration sample must not blow up every later token's absmax.
CALIB_STD_FLOOR_FRACTION = 1e-3
#: Standardized magnitude above which a value is "outside the calibrated range": counted per
#: pair (`count_out_of_range`), shown by `info`, checked by `verify`.
INT8_Z_BOUND = 32.0
#: A token whose standardized absmax exceeds this is encoded with `fallback_gain` instead of the
#: calibration std (and marked by negative scales), in every calibrated encoding. 8 rather than
#: the calibrated range's 32: a token whose one blown-up channel sits between 8 and 32 sigma
#: otherwise keeps the plain std and that channel takes the token's scale (int8: 1st-percentile
#: cosine 0.9985 instead of 0.9997 with a channel constant in the calibration, docs/encodings.md;
#: int4: 7 levels round the rest of the group to zero, 0.71). Honest calibrations of the
#: measured activations put no token past it.
FALLBACK_Z_BOUND = 8.0
#: Out-of-range fraction above which `verify` reports a pair (its calibration did not fit).
OUT_OF_RANGE_LIMIT = 1e-3
FP16_MAX = float(np.finfo(np.float16).max)
#: What to do about an encoding name this version does not know (a newer one wrote it?).
UNKNOWN_ENCODING_HINT = ("a cache written by a newer dune-distill may use an encoding this "
                         "version does not know: upgrade dune-distill to read it")


@dataclass(frozen=True)
class EncodingSpec:
    """How a cache stores tokens: value encoding `name` plus a lossless byte `codec`.

    `level` is the zstd level (1-22) or the blosc clevel (0-9); it is ignored for codec "none".
    """

    name: str = "int8"
    codec: str = "none"
    level: int = 3

    def __post_init__(self) -> None:
        check_choice(self.name, ENCODING_NAMES, "encoding.name", hint=UNKNOWN_ENCODING_HINT)
        check_choice(self.codec, CODEC_NAMES, "encoding.codec")
        if self.codec == "zstd" and not 1 <= self.level <= 22:
            raise ConfigError(f"encoding.level: zstd levels are 1..22, found {self.level}")
        if self.codec == "blosc" and not 0 <= self.level <= 9:
            raise ConfigError(f"encoding.level: blosc levels are 0..9, found {self.level}")

    @property
    def stored_dtype(self) -> np.dtype:
        """The numpy dtype of the stored token values (uint16 bit patterns for bf16)."""
        return STORED_DTYPES[self.name]

    @property
    def has_scale(self) -> bool:
        """Whether tokens carry scales and each pair stores a calibration (int8, int4, int4h)."""
        return self.name in CALIBRATED

    @property
    def is_int4(self) -> bool:
        """int4 or int4h: two values per byte, a float16 scale per group of channels."""
        return self.name in ("int4", "int4h")

    def stored_dim(self, dim: int) -> int:
        """Stored items per token of D channels (D, or ceil(D / 2) bytes for int4)."""
        return int4.packed_dim(dim) if self.is_int4 else dim

    def scale_shape(self, dim: int) -> tuple[int, ...]:
        """Shape of one token's scale: () for int8, (groups,) for int4 (none otherwise)."""
        return (int4.num_groups(dim),) if self.is_int4 else ()

    @property
    def scale_dtype(self) -> np.dtype:
        """dtype of the stored scales: float32 (int8) or float16 (int4, int4h)."""
        return np.dtype("<f2") if self.is_int4 else np.dtype("<f4")


def fit_calibration(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of `x[..., D]` for int8 standardization, as float32 [D].

    The std is floored at CALIB_STD_FLOOR_FRACTION x the median std (and a tiny absolute value)
    so that nearly constant channels do not turn into huge standardized values later.
    """
    flat = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        raise InvalidTokensError("fit_calibration: the calibration sample is empty")
    if not np.isfinite(flat).all():
        raise InvalidTokensError("fit_calibration: the calibration sample holds NaN or Inf")
    mean = flat.mean(axis=0, dtype=np.float64)
    std = flat.std(axis=0, dtype=np.float64)
    floor = max(float(np.median(std)) * CALIB_STD_FLOOR_FRACTION, 1e-12)
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


def fallback_gain(calib_std: np.ndarray) -> np.ndarray:
    """Per-channel gain of int8 fallback tokens: max(std_c, upper median of std), float32 [D].

    The upper median is the sorted std at index D // 2 (a sort is exact, so numpy and torch agree
    bit for bit). Flooring at it bounds what any channel's standardization can blow up.
    """
    std = np.asarray(calib_std, dtype=np.float32)
    return np.maximum(std, np.sort(std)[std.shape[0] // 2])


def _fallback_gain_torch(calib_std: torch.Tensor) -> torch.Tensor:
    """`fallback_gain` on a tensor (same sort, same index, same maximum)."""
    return torch.maximum(calib_std, torch.sort(calib_std).values[calib_std.shape[0] // 2])


def count_out_of_range(x: np.ndarray, calib_mean: np.ndarray, calib_std: np.ndarray) -> int:
    """How many values of `x[..., D]` lie outside the calibrated range (|z| > INT8_Z_BOUND)."""
    z = (np.asarray(x, dtype=np.float32) - calib_mean) / calib_std
    return int(np.count_nonzero(np.abs(z) > INT8_Z_BOUND))


def _check_calibration(calib_mean: object, calib_std: object, spec: EncodingSpec,
                       stored: int) -> int:
    """The width D of a calibration (mean, std) [D] that fits `stored` items per token."""
    if calib_mean is None or calib_std is None:
        raise ConfigError(f"{spec.name} encoding needs calib_mean and calib_std (per-channel, "
                          "shape [D])")
    shapes = (tuple(calib_mean.shape), tuple(calib_std.shape))  # type: ignore[attr-defined]
    dim = shapes[0][0] if len(shapes[0]) == 1 else -1
    if shapes != ((dim,), (dim,)) or spec.stored_dim(dim) != stored:
        wanted = f"({2 * stored - 1},) or ({2 * stored},)" if spec.is_int4 else f"({stored},)"
        raise ConfigError(f"{spec.name} calibration: expected mean/std of shape {wanted} for "
                          f"{stored} stored items per token, found {shapes}")
    return dim


def _standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, absmax of z per token, fallback) of float32 x [..., D]: z = (x - mean) / std, and for
    tokens with a |z| above FALLBACK_Z_BOUND z = (x - mean) / fallback_gain."""
    z = (x - mean) / std
    absmax = np.abs(z).max(axis=-1) if z.shape[-1] else np.zeros(z.shape[:-1], np.float32)
    outside = absmax > FALLBACK_Z_BOUND
    if outside.any():
        # Tokens outside the calibrated range: re-standardize with the floored gain.
        z[outside] = (x[outside] - mean) / fallback_gain(std)
        absmax[outside] = np.abs(z[outside]).max(axis=-1)
    return z, absmax, outside


def bf16_bits_from_float32(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def float32_from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: the bits become the high half of a float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_tokens(
    x: np.ndarray,
    spec: EncodingSpec,
    calib_mean: np.ndarray | None = None,
    calib_std: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode finite float tokens `x[..., D]`; returns (values, scale[...] or None).

    Raises InvalidTokensError when a value does not fit the encoding (fp16 overflow above 65504,
    bf16 overflow). Callers reject NaN/Inf before (the writer does, naming the sample).
    """
    x = np.asarray(x, dtype=np.float32)
    if spec.name == "fp16":
        if x.size and float(np.abs(x).max()) > FP16_MAX:
            raise InvalidTokensError(
                f"fp16 encoding: a value of magnitude {float(np.abs(x).max()):.4g} exceeds the "
                f"float16 range ({FP16_MAX:g})",
                hint="use the bf16 or int8 encoding for this teacher",
            )
        return x.astype(np.float16), None
    if spec.name == "bf16":
        bits = bf16_bits_from_float32(x)
        if x.size and bool(((bits & 0x7F80) == 0x7F80).any()):
            raise InvalidTokensError("bf16 encoding: a value overflows bfloat16 (or is NaN/Inf)")
        return bits, None
    _check_calibration(calib_mean, calib_std, spec, spec.stored_dim(x.shape[-1]))
    mean = np.asarray(calib_mean, dtype=np.float32)
    std = np.asarray(calib_std, dtype=np.float32)
    z, absmax, outside = _standardize(x, mean, std)
    if spec.is_int4:
        return int4.quantize(int4.hadamard(z) if spec.name == "int4h" else z, outside)
    scale = (absmax / np.float32(INT8_MAX)).astype(np.float32)
    # A token equal to the mean everywhere has scale 0; divide by 1 instead (its values are 0).
    safe = np.where(scale > 0, scale, np.float32(1.0))
    z /= safe[..., None]
    np.rint(z, out=z)
    np.clip(z, -INT8_MAX, INT8_MAX, out=z)
    return z.astype(np.int8), np.where(outside, -scale, scale).astype(np.float32)


def decode_tokens(
    values: np.ndarray,
    scale: np.ndarray | None,
    spec: EncodingSpec,
    calib_mean: np.ndarray | None = None,
    calib_std: np.ndarray | None = None,
) -> np.ndarray:
    """Decode stored values back to float32 (numpy, CPU).

    int8: q * scale * std + mean; a token with a negative scale (outside the calibrated range)
    decodes as q * |scale| * fallback_gain(std) + mean. int4: q * |group scale|, then (int4h)
    the block-Hadamard transform, then * std (or fallback_gain(std) when the token's first
    scale is negative) + mean.
    """
    if spec.name == "fp16":
        return np.asarray(values).astype(np.float32)
    if spec.name == "bf16":
        return float32_from_bf16_bits(values)
    values = np.asarray(values)
    dim = _check_calibration(calib_mean, calib_std, spec, values.shape[-1])
    if scale is None:
        raise ConfigError(f"{spec.name} decoding needs the per-token scale")
    std = np.asarray(calib_std, dtype=np.float32)
    if spec.is_int4:
        scale = np.asarray(scale)
        out = int4.dequantize(values, scale, dim)
        if spec.name == "int4h":
            out = int4.hadamard(out)
        fallback = int4.negative_first_scale(scale)
        out *= np.where(fallback[..., None], fallback_gain(std), std) if fallback.any() else std
        out += np.asarray(calib_mean, dtype=np.float32)
        return out
    scale = np.asarray(scale, dtype=np.float32)
    out = np.empty(values.shape, dtype=np.float32)
    fallback = scale < 0
    if not fallback.any():
        # One pass casts and scales per token, then per-channel std and mean, all in place.
        np.multiply(values, scale[..., None], out=out)
        out *= std
    else:
        np.multiply(values, np.abs(scale)[..., None], out=out)
        out *= np.where(fallback[..., None], fallback_gain(std), std)
    out += np.asarray(calib_mean, dtype=np.float32)
    return out


def decode_tokens_torch(
    values: torch.Tensor,
    scale: torch.Tensor | None,
    spec: EncodingSpec,
    calib_mean: torch.Tensor | None = None,
    calib_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode stored values to float32 on the tensors' device (same formula as decode_tokens).

    bf16 values may come as uint16 / int16 bit patterns or already as torch.bfloat16.
    """
    if spec.name == "fp16":
        return values.float()
    if spec.name == "bf16":
        if values.dtype in (torch.uint16, torch.int16):
            values = values.view(torch.bfloat16)
        return values.float()
    dim = _check_calibration(calib_mean, calib_std, spec, values.shape[-1])
    if scale is None:
        raise ConfigError(f"{spec.name} decoding needs the per-token scale")
    device = values.device
    std = calib_std.to(device=device, dtype=torch.float32)  # type: ignore[union-attr]
    mean = calib_mean.to(device=device, dtype=torch.float32)  # type: ignore[union-attr]
    # Same operations in the same order as decode_tokens (no fused multiply-add), so CPU, GPU
    # and numpy decoding agree bit for bit and the stored statistics describe exactly this.
    if spec.is_int4:
        # Fused and chunked (int4.decode_torch), the same operations as the numpy path.
        scale = scale.to(device=device)
        gain = (_fallback_gain_torch(std)
                if bool(int4.negative_first_scale_torch(scale).any()) else None)
        return int4.decode_torch(values, scale, dim, rotate=spec.name == "int4h", gain=std,
                                 mean=mean, fallback_gain=gain)
    scale = scale.to(device=device, dtype=torch.float32)
    fallback = scale < 0
    if not bool(fallback.any()):
        out = values.float() * scale.unsqueeze(-1)
        out *= std
    else:
        out = values.float() * scale.abs().unsqueeze(-1)
        out *= torch.where(fallback.unsqueeze(-1), _fallback_gain_torch(std), std)
    out += mean
    return out
