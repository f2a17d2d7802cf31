"""Small generated labelled datasets that a frozen random-init encoder can still solve.

Used by the tests, the benchmark and `make demo`, deterministic from a seed:
- `make_shapes_segmentation`: coloured shapes (a red-ish disk, a green-ish square, a blue-ish
  triangle) on textured grey backgrounds, with their exact masks (seg-folder layout);
- `make_shapes_classification`: one large shape per image, the class is the shape (ImageNet
  folder layout: `train/<class>/`, `val/<class>/`);
- `make_planes_depth`: a tilted textured plane seen through fog (farther = paler), with its
  exact depth in millimetres as a 16-bit PNG (depth-folder layout).
Colour and fog are cues that survive a random patch embedding, so a linear head on a random
encoder's tokens does far better than chance: the tests' quality bars are then not vacuous.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

SHAPE_CLASSES = ("background", "disk", "square", "triangle")
_HUES = {1: (200, 40, 40), 2: (40, 180, 40), 3: (40, 60, 210)}


def _texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """A grey background with stripes and noise, [side, side, 3] float."""
    y, x = np.mgrid[0:side, 0:side] / side
    f = rng.uniform(2, 8, size=2)
    base = rng.uniform(90, 160) + 25 * np.sin(2 * np.pi * (f[0] * x + f[1] * y))
    return np.repeat(base[..., None], 3, axis=2) + rng.normal(0, 8, (side, side, 3))


def _shape_mask(kind: int, side: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side] / side
    if kind == 1:
        return (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    if kind == 2:
        return (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    # triangle pointing up: inside when below the apex lines and above the base
    return (y <= cy + r) & (y >= cy - r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)


def _paint(img: np.ndarray, mask: np.ndarray, kind: int, rng: np.random.Generator) -> None:
    colour = np.asarray(_HUES[kind], dtype=float) + rng.normal(0, 15, 3)
    img[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(path)


def make_shapes_segmentation(root: str | os.PathLike[str], n: int, side: int = 112,
                             seed: int = 0) -> Path:
    """`n` images with 1-3 shapes each, masks and classes.txt under `root` (seg-folder)."""
    root = Path(root)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img, mask = _texture(rng, side), np.zeros((side, side), np.uint8)
        for kind in rng.choice([1, 2, 3], size=int(rng.integers(1, 4)), replace=False):
            shape = _shape_mask(int(kind), side, *rng.uniform(0.25, 0.75, 2),
                                rng.uniform(0.12, 0.25))
            _paint(img, shape, int(kind), rng)
            mask[shape] = kind
        _save(root / "images" / f"img_{i:04d}.png", img)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"img_{i:04d}.png")
    (root / "classes.txt").write_text("\n".join(SHAPE_CLASSES) + "\n")
    return root


def make_shapes_classification(root: str | os.PathLike[str], n_train: int, n_val: int,
                               side: int = 112, seed: int = 0) -> Path:
    """One large shape per image; `train/<shape>/` and `val/<shape>/` (ImageNet layout)."""
    root = Path(root)
    for split, count, offset in (("train", n_train, 0), ("val", n_val, 10**6)):
        for i in range(count):
            rng = np.random.default_rng([seed, offset + i])
            kind = 1 + i % 3
            img = _texture(rng, side)
            shape = _shape_mask(kind, side, *rng.uniform(0.4, 0.6, 2), rng.uniform(0.25, 0.35))
            _paint(img, shape, kind, rng)
            _save(root / split / SHAPE_CLASSES[kind] / f"img_{i:04d}.png", img)
    return root


def make_planes_depth(root: str | os.PathLike[str], n: int, side: int = 112,
                      seed: int = 0) -> Path:
    """Tilted foggy planes with exact depth (16-bit PNG, millimetres) under `root`."""
    root = Path(root)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        near, far = rng.uniform(1.0, 3.0), rng.uniform(4.0, 9.0)
        rows = np.linspace(0, 1, side)[:, None] * np.ones((1, side))
        depth = far + (near - far) * rows if rng.uniform() < 0.5 else near + (far - near) * rows
        fog = np.exp(-depth / 4.0)[..., None]
        img = _texture(rng, side) * fog + 230 * (1 - fog)
        _save(root / "images" / f"img_{i:04d}.png", img)
        (root / "depth").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(depth * 1000).astype(np.uint16)).save(
            root / "depth" / f"img_{i:04d}.png")
    return root
