"""The arithmetic of the 4-bit encodings (`int4`, `int4h`): group scales, nibble packing and a
fixed block-Hadamard rotation, each in numpy (the writer, CPU readers) and in torch (decoding on
the training device), with the same operations in the same order so that both decode bit for
bit alike (tests/test_int4.py checks it).

encodings.py standardizes the tokens (the int8 calibration and fallback, one copy) and calls
these on the standardized values z [..., D]:

- groups: the channels are cut into groups of INT4_GROUP (the last one may be shorter); each
  group of each token gets the scale s = float16(absmax(group) / 7) and values
  q = clip(rint(z / s), -7, 7) (a scale of 0 divides by 1: its values are all 0).
- nibbles: q + 8 (1..15) is stored two values per byte, channel 2i in the low nibble and
  channel 2i + 1 in the high one; an odd D pads one q = 0.
- rotation (`int4h` only): blocks of b = D & -D channels (the largest power of two dividing D:
  1024 -> 1024, 768 -> 256, 120 -> 8, odd D -> 1, no rotation) each get the orthonormal
  Walsh-Hadamard transform, butterflies (a + b, a - b) then a factor float32(1 / sqrt(b)). It is
  its own inverse, so decoding applies the same function.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cache_format.errors import InvalidTokensError

#: Channels per int4 scale. 128 keeps a ViT-L/14 448 px sample at 0.54 MB (16 bytes of fp16
#: scales per 512 bytes of values); docs/encodings.md has the measurements behind it.
INT4_GROUP = 128
INT4_MAX = 7
#: Stored value of q is q + INT4_OFFSET (offset binary: 1..15 for -7..7).
INT4_OFFSET = 8
FP16_MAX = float(np.finfo(np.float16).max)


def packed_dim(dim: int) -> int:
    """Bytes per token of D int4 values (two per byte)."""
    return (dim + 1) // 2


def num_groups(dim: int) -> int:
    """Scales per token: ceil(D / INT4_GROUP)."""
    return -(-dim // INT4_GROUP)


def hadamard_block(dim: int) -> int:
    """The block-Hadamard block size of width D: the largest power of two dividing D."""
    return dim & -dim if dim else 1


def hadamard(y: np.ndarray) -> np.ndarray:
    """The orthonormal block Walsh-Hadamard transform of the last axis (a new float32 array).

    One implementation, `hadamard_torch`, serves numpy callers too, so that encoding, numpy
    decoding and device decoding run the same butterflies in the same order."""
    out = np.array(y, dtype=np.float32)
    return hadamard_torch(torch.from_numpy(out)).numpy()


def hadamard_torch(y: torch.Tensor) -> torch.Tensor:
    """`hadamard` on a float32 tensor (same butterflies, same order, same float32 factor)."""
    dim = y.shape[-1]
    b = hadamard_block(dim)
    if b == 1:
        return y
    lead = y.shape[:-1]
    h = 1
    while h < b:
        v = y.reshape(*lead, dim // (2 * h), 2, h)
        a, c = v[..., 0, :], v[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2).reshape(*lead, dim)
        h *= 2
    factor = torch.tensor(np.float32(1.0 / math.sqrt(b)), dtype=torch.float32, device=y.device)
    return y * factor


def _padded(z: np.ndarray, width: int) -> np.ndarray:
    """z [..., D] with zeros appended up to `width` channels (z itself when D == width)."""
    if z.shape[-1] == width:
        return z
    out = np.zeros((*z.shape[:-1], width), dtype=z.dtype)
    out[..., : z.shape[-1]] = z
    return out


def quantize(z: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed uint8 values [..., ceil(D/2)] and float16 group scales [..., G] of float32 z.

    Tokens where `negative` [...] holds get every scale negated (-0.0 included): the sign of a
    token's first scale is the encodings' fallback mark.
    """
    dim = z.shape[-1]
    groups = num_groups(dim)
    zp = _padded(z, groups * INT4_GROUP).reshape(*z.shape[:-1], groups, INT4_GROUP)
    absmax = np.abs(zp).max(axis=-1) if dim else np.zeros(zp.shape[:-1], np.float32)
    scale = (absmax / np.float32(INT4_MAX)).astype(np.float32)
    if scale.size and float(scale.max()) > FP16_MAX:
        raise InvalidTokensError(
            f"int4 encoding: a group's scale {float(scale.max()):.4g} (in calibration stds) "
            f"exceeds the float16 range ({FP16_MAX:g})",
            hint="this teacher's tokens are far outside its calibration: use the int8 encoding")
    scale16 = scale.astype(np.float16)
    safe = scale16.astype(np.float32)
    safe[safe == 0] = 1.0
    q = zp / safe[..., None]
    np.rint(q, out=q)
    np.clip(q, -INT4_MAX, INT4_MAX, out=q)
    q = q.reshape(*z.shape[:-1], groups * INT4_GROUP)[..., : 2 * packed_dim(dim)]
    u = (_padded(q, 2 * packed_dim(dim)) + INT4_OFFSET).astype(np.uint8)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    return packed, np.where(negative[..., None], np.copysign(scale16, np.float16(-1)), scale16)


def negative_first_scale(scale: np.ndarray) -> np.ndarray:
    """Tokens [...] whose first group scale has its sign bit set (float16 [..., G] scales)."""
    return np.ascontiguousarray(scale[..., 0], dtype="<f2").view(np.int16) < 0


def dequantize(packed: np.ndarray, scale: np.ndarray, dim: int) -> np.ndarray:
    """float32 [..., D] = q * |s| of packed uint8 values and float16 group scales."""
    lead = packed.shape[:-1]
    groups = num_groups(dim)
    q = np.empty((*lead, 2 * packed.shape[-1]), dtype=np.float32)
    q[..., 0::2] = packed & 15
    q[..., 1::2] = packed >> 4
    q -= np.float32(INT4_OFFSET)
    width = groups * INT4_GROUP
    if q.shape[-1] > width:
        q = q[..., :width]
    q = _padded(q, width).reshape(*lead, groups, INT4_GROUP)
    q *= np.abs(scale).astype(np.float32)[..., None]
    return q.reshape(*lead, width)[..., :dim]


def negative_first_scale_torch(scale: torch.Tensor) -> torch.Tensor:
    """`negative_first_scale` on a tensor of the scales, float16 as stored or float32 as the
    training batch collates them (the sign bit, so that -0.0 counts as marked in both)."""
    return torch.signbit(scale[..., 0])


def dequantize_torch(packed: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """`dequantize` on tensors (the result lives on `packed`'s device)."""
    lead = packed.shape[:-1]
    groups = num_groups(dim)
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*lead, 2 * packed.shape[-1])
    q = q.to(torch.float32) - INT4_OFFSET
    width = groups * INT4_GROUP
    if q.shape[-1] > width:
        q = q[..., :width]
    elif q.shape[-1] < width:
        q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    q = q.reshape(*lead, groups, INT4_GROUP) * scale.abs().to(torch.float32).unsqueeze(-1)
    return q.reshape(*lead, width)[..., :dim]
