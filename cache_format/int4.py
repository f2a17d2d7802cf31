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

    One implementation, `hadamard_`, serves numpy callers too, so that encoding, numpy
    decoding and device decoding run the same butterflies in the same order."""
    out = np.array(y, dtype=np.float32, order="C")
    if out.size:
        hadamard_(torch.from_numpy(out))
    return out


def hadamard_torch(y: torch.Tensor) -> torch.Tensor:
    """`hadamard` on a float32 tensor (a new tensor; same butterflies, same order, same float32
    factor)."""
    if hadamard_block(y.shape[-1]) == 1:
        return y
    return hadamard_(y.to(torch.float32, copy=True).contiguous())


def hadamard_(y: torch.Tensor) -> torch.Tensor:
    """`hadamard` in place on a contiguous float32 tensor (returned), a row chunk at a time on
    the CPU (`_hadamard_rows_`)."""
    dim = y.shape[-1]
    if hadamard_block(dim) == 1 or y.numel() == 0:
        return y
    rows = y.view(-1, dim)
    chunk = _chunk_rows(dim, y.device)
    spare = torch.empty((min(chunk, rows.shape[0]), dim), dtype=torch.float32, device=y.device)
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk]
        _hadamard_rows_(part, spare[: part.shape[0]])
    return y


#: Floats of one row chunk of a CPU decode (1 MB, the L2 cache of a core): every step of a
#: chunk (unpack, scale, the log2(b) butterfly passes, gain and mean) runs while it is cached,
#: instead of streaming the whole batch through memory once per step.
CHUNK_FLOATS = 1 << 18


def _chunk_rows(dim: int, device: torch.device) -> int:
    """Rows of width `dim` per decode chunk on `device`: CHUNK_FLOATS worth on the CPU (at
    least one row), every row at once elsewhere (a GPU wants few large kernels)."""
    if device.type != "cpu":
        return 1 << 62
    return max(1, CHUNK_FLOATS // max(dim, 1))


def _hadamard_rows_(rows: torch.Tensor, spare: torch.Tensor, first: int = 1) -> None:
    """The block Walsh-Hadamard transform of contiguous float32 `rows` [n, D], in place;
    `spare` [n, D] is scratch. Butterflies (a + c, a - c) at pair distance h = 1, 2, 4, ..., b/2
    in that order (the order sets the float32 rounding), each written by `out=` into the other
    buffer, then the factor float32(1 / sqrt(b)). `first` > 1: the passes below it were done
    already (`decode_torch`)."""
    n, dim = rows.shape
    b = hadamard_block(dim)
    src, dst = rows, spare
    h = first
    while h < b:
        pairs = src.view(n, dim // (2 * h), 2, h)
        into = dst.view(n, dim // (2 * h), 2, h)
        torch.add(pairs[:, :, 0], pairs[:, :, 1], out=into[:, :, 0])
        torch.sub(pairs[:, :, 0], pairs[:, :, 1], out=into[:, :, 1])
        src, dst = dst, src
        h *= 2
    if src is not rows:
        rows.copy_(src)
    rows.mul_(_hadamard_factor(b, rows.device))


#: Width of the Hadamard passes that `decode_torch` runs on the integers q - 8 as one matrix
#: product, before the group scales. Exact, hence the same bits as butterflies on q * |s|: with
#: |q - 8| <= 8, four passes make an integer of at most 128 (any summation order), and 128 times
#: a float16 significand (11 bits) fits float32's 24; pairs closer than 16 channels share a
#: group (INT4_GROUP = 128), hence a scale. 16 measured fastest: a [*, 16] x [16, 16] product
#: takes about 0.4 ms per MB on one core, the four strided butterfly passes it replaces 4-5 ms.
EXACT_WIDTH = 16
_SYLVESTER: dict[tuple[int, torch.device], torch.Tensor] = {}


def _sylvester(m: int, device: torch.device) -> torch.Tensor:
    """The unnormalized m x m Walsh-Hadamard matrix, H[i, j] = (-1)^popcount(i & j), float32:
    x @ H is the butterflies of pair distances 1 .. m/2 in exact arithmetic."""
    key = (m, device)
    if key not in _SYLVESTER:
        i = torch.arange(m)
        bits = i[:, None] & i[None, :]
        parity = torch.zeros_like(bits)
        while bool(bits.any()):
            parity ^= bits & 1
            bits = bits >> 1
        _SYLVESTER[key] = (1 - 2 * parity).to(device=device, dtype=torch.float32)
    return _SYLVESTER[key]


def _hadamard_factor(b: int, device: torch.device) -> torch.Tensor:
    """float32(1 / sqrt(b)) as a 0-d tensor (a Python float would be applied in float64)."""
    return torch.tensor(np.float32(1.0 / math.sqrt(b)), dtype=torch.float32, device=device)


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
    return decode_torch(packed, scale, dim, rotate=False)


def decode_torch(packed: torch.Tensor, scale: torch.Tensor, dim: int, rotate: bool,
                 gain: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                 fallback_gain: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [..., D] = rotate?(q * |s|) * g + mean, one row chunk at a time (CHUNK_FLOATS).

    q * |s| is `dequantize`; `rotate` applies `hadamard` (int4h); g is `gain` [D], or
    `fallback_gain` [D] for tokens whose first scale is negative (when given). `gain` and `mean`
    None skip those steps. The result is that of `dequantize`, `hadamard` and
    encodings.decode_tokens to the bit: the same operations in the same order, except the first
    rotation passes, which are exact (EXACT_WIDTH) and run as a small matrix product. It is
    faster because each chunk stays in the CPU's cache through every step and no step allocates
    a batch-sized tensor. (A 256-entry table of nibble pairs, `index_select`, measured 3-5x
    slower than the two masked copies here.)
    """
    lead, width = packed.shape[:-1], 2 * packed.shape[-1]
    device = packed.device
    flat = packed.reshape(-1, packed.shape[-1])
    scales = scale.reshape(-1, scale.shape[-1])
    n_rows = flat.shape[0]
    out = torch.empty((n_rows, width), dtype=torch.float32, device=device)
    marked = None
    if fallback_gain is not None and gain is not None:
        marked = torch.signbit(scales[:, 0])
        if not bool(marked.any()):
            marked = None
    block = hadamard_block(dim) if rotate else 1
    # Scales are float16 values (stored so; a batch may carry them as float32): EXACT_WIDTH's
    # exactness needs their 11-bit significands.
    exact = min(block, EXACT_WIDTH) if block > 1 and _float16_valued(scales) else 1
    chunk = _chunk_rows(width, device)
    spare = (torch.empty((min(chunk, n_rows), dim), dtype=torch.float32, device=device)
             if block > 1 else None)
    full = dim // INT4_GROUP  # groups of INT4_GROUP channels; a shorter last one when D % G
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        rows = out[start:stop]
        scratch = None if spare is None else spare[: stop - start]
        q = scratch if exact > 1 else rows  # a rotated D is even: width == dim
        pairs, stored = q.view(stop - start, -1, 2), flat[start:stop]
        pairs[:, :, 0].copy_(stored & 15)
        pairs[:, :, 1].copy_(stored >> 4)
        q.sub_(INT4_OFFSET)
        if exact > 1:
            torch.matmul(q.view(-1, exact), _sylvester(exact, device), out=rows.view(-1, exact))
        part = scales[start:stop].abs().to(torch.float32)
        if full:
            rows[:, : full * INT4_GROUP].view(-1, full, INT4_GROUP).mul_(part[:, :full, None])
        if dim > full * INT4_GROUP:
            rows[:, full * INT4_GROUP: dim].mul_(part[:, full:full + 1])
        values = rows[:, :dim]
        if scratch is not None:
            _hadamard_rows_(values, scratch, first=exact)
        if gain is not None:
            if marked is None:
                values.mul_(gain)
            else:
                values.mul_(torch.where(marked[start:stop, None], fallback_gain, gain))
        if mean is not None:
            values.add_(mean)
    return out.view(*lead, width)[..., :dim]


def _float16_valued(scales: torch.Tensor) -> bool:
    """Whether every scale is a float16 value (always, for float16 tensors)."""
    if scales.dtype == torch.float16:
        return True
    return bool((scales.to(torch.float16).to(scales.dtype) == scales).all())
