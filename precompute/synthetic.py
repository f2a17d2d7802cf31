"""Small synthetic image datasets for tests and the demo, deterministic from a seed.

Images have gradients, stripes and filled shapes with noise, so that teachers see varied content,
and varied sizes and aspect ratios (height and width drawn independently). The same seed gives
byte-identical files. `make_bad_images` writes one file per kind of bad image (`BAD_KINDS` maps
each kind to the skip reason a source reports for it).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

# kind -> the BadImageError reason a source gives it with unusual_modes="skip"
BAD_KINDS: dict[str, str] = {
    "zero_bytes": "zero_bytes",
    "truncated": "truncated",
    "not_an_image": "not_an_image",
    "cmyk": "unsupported_mode",
    "sixteen_bit": "unsupported_mode",
    "sixteen_bit_rgb": "unsupported_mode",
    "palette": "unsupported_mode",
    "too_large": "too_large",
    "unreadable": "unreadable",
}
BAD_FILE_NAMES: dict[str, str] = {
    "zero_bytes": "zero_bytes.jpg",
    "truncated": "truncated.jpg",
    "not_an_image": "not_an_image.jpg",
    "cmyk": "cmyk.jpg",
    "sixteen_bit": "sixteen_bit.png",
    "sixteen_bit_rgb": "sixteen_bit_rgb.png",
    "palette": "palette.png",
    "too_large": "too_large.png",
    "unreadable": "unreadable.jpg",  # a symlink to a file that does not exist
}
TOO_LARGE_SIDE = 10_000  # 1e8 pixels: above the default limit, below Pillow's hard refusal


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One RGB uint8 image [height, width, 3]: gradient + stripes + shapes + noise."""
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    mix = rng.uniform()
    img = c0 + (c1 - c0) * (mix * x + (1 - mix) * y)[..., None]
    fy, fx = rng.uniform(0.5, 10.0, size=2)
    stripes = np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    img = img + rng.uniform(10, 60) * stripes[..., None] * rng.uniform(-1, 1, size=3)
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0, 1, size=2)
        ry, rx = rng.uniform(0.05, 0.4, size=2)
        if rng.uniform() < 0.5:
            mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        else:
            mask = (np.abs(y - cy) <= ry) & (np.abs(x - cx) <= rx)
        img = np.where(mask[..., None], rng.uniform(0, 255, size=3), img)
    img = img + rng.normal(0.0, 4.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _encoded_image(
    seed: int, index: int, size_range: tuple[int, int], grayscale_fraction: float
) -> tuple[bytes, str]:
    """Image `index` of a dataset as encoded bytes and its extension ("jpg" or "png")."""
    rng = _image_rng(seed, index)
    lo, hi = size_range
    height, width = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    pixels = synthetic_image(rng, height, width)
    img = Image.fromarray(pixels)
    if rng.uniform() < grayscale_fraction:
        img = img.convert("L")
    ext = "jpg" if rng.uniform() < 0.5 else "png"
    buffer = io.BytesIO()
    if ext == "jpg":
        img.save(buffer, format="JPEG", quality=90)
    else:
        img.save(buffer, format="PNG")
    return buffer.getvalue(), ext


def _check_args(n: int, size_range: tuple[int, int]) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, found {n}")
    if not 1 <= size_range[0] <= size_range[1]:
        raise ValueError(f"size_range must be (min, max) with 1 <= min <= max, found {size_range}")


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_images(
    root: str,
    n: int,
    size_range: tuple[int, int],
    seed: int,
    grayscale_fraction: float,
    folder: Callable[[int], str],
) -> list[str]:
    """Write images 0..n-1 of a dataset, image i as `folder(i)/img_{i:05d}.<ext>` under root;
    their keys in that order (what the folder and list datasets share)."""
    _check_args(n, size_range)
    keys = []
    for i in range(n):
        data, ext = _encoded_image(seed, i, size_range, grayscale_fraction)
        key = f"{folder(i)}/img_{i:05d}.{ext}"
        _write(os.path.join(root, key), data)
        keys.append(key)
    return keys


def _write_bad_images(root: str) -> list[str]:
    """One bad image per kind under root/bad; their keys relative to root."""
    return [f"bad/{name}" for name in make_bad_images(os.path.join(root, "bad")).values()]


def make_image_folder(
    root: str | os.PathLike[str],
    n: int,
    size_range: tuple[int, int] = (24, 96),
    seed: int = 0,
    *,
    subfolders: int = 3,
    grayscale_fraction: float = 0.1,
    bad: bool = False,
) -> list[str]:
    """Write n images under root in `subfolders` class folders (plus `bad/` with one file per bad
    kind when `bad`); return the keys a folder source lists (sorted relative paths)."""
    root = os.fspath(root)
    keys = _write_images(root, n, size_range, seed, grayscale_fraction,
                         lambda i: f"class_{i % max(1, subfolders):02d}")
    return sorted(keys + (_write_bad_images(root) if bad else []))


def make_list_dataset(
    root: str | os.PathLike[str],
    n: int,
    size_range: tuple[int, int] = (24, 96),
    seed: int = 0,
    *,
    list_name: str = "list.txt",
    grayscale_fraction: float = 0.1,
    bad: bool = False,
) -> tuple[str, list[str]]:
    """Write n images under root/images and a list file of them in a shuffled (seeded) order,
    with the bad images appended when `bad`; return (list file path, keys in list order)."""
    root = os.fspath(root)
    keys = _write_images(root, n, size_range, seed, grayscale_fraction, lambda i: "images")
    order = np.random.default_rng(np.random.SeedSequence([seed, n, 7])).permutation(n)
    keys = [keys[i] for i in order] + (_write_bad_images(root) if bad else [])
    list_file = os.path.join(root, list_name)
    with open(list_file, "w", encoding="utf-8") as f:
        f.write("".join(f"{key}\n" for key in keys))
    return list_file, keys


def make_hdf5_dataset(
    path: str | os.PathLike[str],
    n: int,
    size_range: tuple[int, int] = (24, 96),
    seed: int = 0,
    *,
    key: str = "images",
    with_keys: bool = True,
    grayscale_fraction: float = 0.1,
    bad: bool = False,
) -> list[str]:
    """Write an HDF5 file whose dataset `key` holds n encoded images (variable-length uint8) and,
    when `with_keys`, `<key>_keys` their names; the bad images (all but `unreadable`) are
    appended when `bad`. Return the keys a source lists."""
    import h5py

    _check_args(n, size_range)
    rows, names = [], []
    for i in range(n):
        data, ext = _encoded_image(seed, i, size_range, grayscale_fraction)
        rows.append(data)
        names.append(f"img_{i:05d}.{ext}")
    if bad:
        for kind, data in bad_image_bytes().items():
            rows.append(data)
            names.append(BAD_FILE_NAMES[kind])
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(path, "w") as f:
        images = f.create_dataset(key, shape=(len(rows),), dtype=h5py.vlen_dtype(np.uint8))
        for i, data in enumerate(rows):
            images[i] = np.frombuffer(data, dtype=np.uint8)
        if with_keys:
            f.create_dataset(f"{key}_keys", data=names, dtype=h5py.string_dtype("utf-8"))
    width = max(9, len(str(len(rows) - 1)))
    return names if with_keys else [f"{i:0{width}d}" for i in range(len(rows))]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG built by hand (Pillow cannot write 48-bit RGB, or a header with too little data).

    `raw` is the unfiltered scanline data; each row gets filter byte 0 prepended here when its
    length is a whole number of rows, otherwise `raw` is compressed as given (a damaged image).
    """
    channels = {0: 1, 2: 3}[color_type]
    row_bytes = width * channels * bit_depth // 8
    if len(raw) == row_bytes * height:
        raw = b"".join(b"\0" + raw[r * row_bytes : (r + 1) * row_bytes] for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def bad_image_bytes() -> dict[str, bytes]:
    """The encoded bytes of each bad kind that lives in a file's content (all but unreadable)."""
    rng = np.random.default_rng(12345)
    pixels = synthetic_image(rng, 64, 80)

    def encode(img: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, format=fmt)
        return buffer.getvalue()

    jpeg = encode(Image.fromarray(pixels), "JPEG")
    gray16 = (np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) * 34).astype(np.uint16)
    rgb16 = (pixels[:16, :20].astype(np.uint16) * 257).astype(">u2")
    return {
        "zero_bytes": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "not_an_image": b"this is a text file with an image extension\n" * 4,
        "cmyk": encode(Image.fromarray(pixels).convert("CMYK"), "JPEG"),
        "sixteen_bit": encode(Image.fromarray(gray16), "PNG"),
        "sixteen_bit_rgb": png_bytes(20, 16, 16, 2, rgb16.tobytes()),
        "palette": encode(
            Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"
        ),
        # The header declares 10000 x 10000 pixels; the data is a few bytes (never decoded).
        "too_large": png_bytes(TOO_LARGE_SIDE, TOO_LARGE_SIDE, 8, 0, b"\0" * 64),
    }


def make_bad_images(root: str | os.PathLike[str]) -> dict[str, str]:
    """Write one file per bad kind under root; return kind -> file name (relative to root)."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    for kind, data in bad_image_bytes().items():
        _write(os.path.join(root, BAD_FILE_NAMES[kind]), data)
    link = os.path.join(root, BAD_FILE_NAMES["unreadable"])
    if os.path.lexists(link):
        os.remove(link)
    os.symlink("does_not_exist.jpg", link)
    return dict(BAD_FILE_NAMES)
