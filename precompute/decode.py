"""Image decoding for the cache builder and the trainer: encoded bytes to a uint8 RGB tensor.

Decoding follows the reference loader (`Image.open(path).convert("RGB")`, no EXIF rotation) but
refuses what it would silently mangle: bad images raise `BadImageError` whose `reason` is one of
`SKIP_REASONS`. Images that are neither 8-bit RGB nor 8-bit L (CMYK, 16-bit, palette, alpha, ...)
are `unsupported_mode` by default; with `unusual_modes="convert"` they are converted to RGB
(16-bit values divided by 257, alpha dropped, CMYK by Pillow's conversion as in the reference,
float images still refused: they have no defined range). The pixel limit is read from the header
before any decoding, and Pillow's decompression-bomb warnings are kept from leaking.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cache_format.errors import BadImageError

SKIP_REASONS: tuple[str, ...] = (
    "zero_bytes",
    "truncated",
    "not_an_image",
    "unsupported_mode",
    "too_large",
    "unreadable",
)
UNUSUAL_MODES: tuple[str, ...] = ("skip", "convert")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold


def bad_image(path: str, reason: str, what: str) -> BadImageError:
    """The BadImageError of image `path`: `reason` (one of SKIP_REASONS) and what is wrong."""
    return BadImageError(f"{path}: {what}", reason=reason, path=path)


def _is_16bit(img: Image.Image) -> bool:
    """Whether the file stores 16-bit samples (Pillow decodes 48-bit PNGs to 8-bit RGB silently)."""
    if img.mode.startswith("I;16"):
        return True
    for tile in img.tile:
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) else ""
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _convert_unusual(img: Image.Image, path: str) -> np.ndarray:
    """An unusual mode converted to an RGB [H, W, 3] or gray [H, W] uint8 array."""
    mode = img.mode
    if mode == "F":
        raise bad_image(path, "unsupported_mode", "mode F (float samples) has no defined range")
    if mode.startswith("I"):  # 16-bit (or 32-bit int) gray, taken as 16-bit
        values = np.asarray(img).astype(np.float64)
        return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # avoids Pillow's warning on transparent palettes
    try:
        return np.array(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        what = f"mode {mode} cannot be converted to RGB ({exc})"
        raise bad_image(path, "unsupported_mode", what) from None


def decode_image(
    data: bytes,
    path: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    unusual_modes: str = "skip",
) -> torch.Tensor:
    """Decode an encoded image file to uint8 RGB [3, H, W]; `path` names it in errors."""
    if len(data) == 0:
        raise bad_image(path, "zero_bytes", "the file is empty (0 bytes); re-download or remove it")
    # Pillow warns (and above twice its limit refuses) on huge headers; we apply our own limit
    # from the header, so its warning is noise here. (catch_warnings is process-wide state:
    # decode in worker processes, not in many threads of one process.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise bad_image(path, "too_large", f"more pixels than Pillow allows ({exc})") from None
        except Exception as exc:  # Pillow's plugins raise many types on foreign data
            what = "no image format recognised" if isinstance(exc, UnidentifiedImageError) else exc
            raise bad_image(
                path, "not_an_image", f"not a readable image ({what}; starts with {data[:12]!r})"
            ) from None
        width, height = img.size
        if width * height > max_pixels:
            raise bad_image(
                path,
                "too_large",
                f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                "(raise max_pixels to accept it)",
            )
        sixteen = _is_16bit(img)
        usual = img.mode in ("RGB", "L") and not sixteen
        if not usual and unusual_modes != "convert":
            what = f"16-bit {img.mode}" if sixteen else f"mode {img.mode}"
            raise bad_image(
                path,
                "unsupported_mode",
                f"{what} is not 8-bit RGB or gray (set unusual_modes='convert' to convert it)",
            )
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise bad_image(path, "too_large", f"more pixels than Pillow allows ({exc})") from None
        except Exception as exc:  # truncated data: OSError, SyntaxError, zlib.error, ...
            raise bad_image(
                path,
                "truncated",
                f"truncated or corrupt image data ({type(exc).__name__}: {exc})",
            ) from None
        array = np.array(img) if usual else _convert_unusual(img, path)
    if array.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0).repeat(3, 1, 1)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
