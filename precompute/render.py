"""Rendering of a stored view: the pixels that the teachers and the student both see.

`render_view` turns a source image and a `ViewParams` row into the augmented view at a given
resolution; it is deterministic and independent of the number of torch threads, so the cache's
bytes never depend on how many workers built it. A teacher whose patch differs from the
student's sees the student's augmented image resized by `resize_for_teacher` (the reference's
behaviour: the same augmented image, scaled by teacher_patch / student_patch).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torch import Tensor

from cache_format.errors import CacheMismatchError
from precompute.view_params import ViewParams


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
_scratch = threading.local()


def _scratch_planes(count: int, hw: tuple[int, int]) -> tuple[Tensor, ...]:
    """`count` float32 [h, w] planes owned by the calling thread and reused across calls.

    Fresh multi-MB temporaries are what made the hue rotation slow: glibc hands blocks that large
    back to the kernel when they are freed, so each call page-faulted them in again (3,000 to
    5,000 faults, most of its time, at 448 px). Per thread, so that units rendering in threads
    never share a plane; no result depends on what a plane held before.
    """
    planes = getattr(_scratch, "planes", None)
    if planes is None or tuple(planes.shape) != (count, *hw):
        planes = _scratch.planes = torch.empty((count, *hw), dtype=torch.float32)
    return tuple(planes.unbind(0))


def _adjust_hue_(x: Tensor, factor: float) -> Tensor:
    """Rotate the hue of float32 RGB `x` [3, H, W] by `factor` turns in HSV, in place.

    torchvision's adjust_hue (the reference's ColorJitter), computed without its HSV round trip:
    value (max) and chroma (max - min) are kept and each channel becomes
    max - chroma * ramp(k), k = (offset + 6 * hue) mod 6, ramp(k) = clamp(2 - |k - 2|, 0, 1).
    The hue comes from d[c] = (max - x[c]) / chroma, 0 on a channel holding the maximum (red's
    (g - b) / chroma is d[b] - d[g], and so on), and the sector is chosen by weights that are
    exactly 0 or 1 (ceil(d) is 1 where a channel is not the maximum; ties go to red, then green,
    as torchvision's), so there is no comparison, select or fmod: only element-wise arithmetic,
    whose bits do not depend on the thread count. Temporaries live in per-thread planes and the
    result overwrites `x`. At 448 px on one thread: about 1.5 ms, where the previous allocating
    version took 2.5 ms without page faults and about 10 ms inside render_view with them.
    """
    x = x.contiguous()
    maxc, chroma, scratch, hue6, w_r, w_g, w_b = _scratch_planes(7, (x.shape[1], x.shape[2]))
    torch.amax(x, 0, out=maxc)
    torch.amin(x, 0, out=chroma)
    chroma.neg_().add_(maxc)
    # A true division, not a product with 1 / chroma, so that d <= 1 and ceil(d) is 0 or 1.
    d_r, d_g, d_b = torch.sub(maxc, x, out=x).div_(torch.clamp(chroma, min=1e-12, out=scratch))
    torch.ceil(d_r, out=w_g)  # 1 where red is not a maximum
    torch.ceil(d_g, out=w_b)  # 1 where green is not a maximum
    w_b.mul_(w_g)  # neither red nor green holds it: blue does
    w_g.sub_(w_b)  # green holds it, red does not
    torch.add(w_g, w_b, out=w_r).neg_().add_(1.0)  # red holds it
    torch.sub(d_b, d_g, out=hue6).mul_(w_r)  # red: (g - b) / chroma
    hue6.add_(torch.sub(d_r, d_b, out=scratch).add_(2.0).mul_(w_g))  # green: 2 + (b - r) / c
    hue6.add_(torch.sub(d_g, d_r, out=scratch).add_(4.0).mul_(w_b))  # blue: 4 + (r - g) / c
    hue6.add_(6.0 * factor)
    k, sixths = w_r, w_g  # free again
    for channel, offset in enumerate(_HUE_OFFSETS):
        torch.add(hue6, offset, out=k)
        # k mod 6; ramp is 0 near both ends, so rounding at the wrap is harmless.
        k.sub_(torch.mul(k, 1.0 / 6.0, out=sixths).floor_().mul_(6.0))
        k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)  # ramp(k)
        torch.sub(maxc, k.mul_(chroma), out=x[channel])
    return x


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
                x = _adjust_hue_(x, params.hue)  # x is this function's own tensor
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
