"""PCA pictures of patch features: what users look at first (the paper's Figure 2).

For each encoder, the patch tokens of all given images are projected onto 3 principal
components fitted jointly over those images (so colours mean the same thing across images),
each component scaled to [0, 1] with its 1st / 99th percentiles over all images, and shown as
RGB. With a foreground threshold, a first PCA's leading component (scaled to [0, 1]) splits
patches into foreground (> threshold) and background; the 3-component PCA is then fitted on
foreground patches only and background patches are black. The sign of the leading component
is arbitrary; `invert_foreground` flips which side counts as foreground.

One PNG per image: the image, then one panel per encoder, side by side, each `panel` pixels
square (patches drawn as blocks, nearest-neighbour), with the encoder's name in a caption strip
`CAPTION` pixels high below. Width = panel x (1 + encoders), height = panel + CAPTION.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from heads.encoders import FrozenEncoder
from heads.features import preprocess_batch
from heads.readers import read_image

CAPTION = 16


@dataclass(frozen=True)
class PcaConfig:
    """How the pictures are made."""

    grid: int = 32
    panel: int = 224
    threshold: float | None = None
    invert_foreground: bool = False


def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of x [N, D] projected on their top-k principal components, [N, k]."""
    centred = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    out = centred @ v[:k].T
    if out.shape[1] < k:  # fewer channels than components: pad with zeros
        out = torch.cat([out, out.new_zeros(out.shape[0], k - out.shape[1])], 1)
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Each column scaled to [0, 1] by its 1st and 99th percentiles."""
    lo = torch.quantile(x, 0.01, dim=0, keepdim=True)
    hi = torch.quantile(x, 0.99, dim=0, keepdim=True)
    return ((x - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1)


def pca_colours(patches: torch.Tensor, cfg: PcaConfig) -> torch.Tensor:
    """Patch tokens of all images [M, T, D] -> RGB in [0, 1] [M, T, 3], fitted jointly."""
    m, t, d = patches.shape
    flat = patches.reshape(m * t, d).double()
    rgb = torch.zeros(m * t, 3, dtype=torch.float64)
    keep = torch.ones(m * t, dtype=torch.bool)
    if cfg.threshold is not None:
        first = _unit(_pca(flat, 1))[:, 0]
        keep = first > cfg.threshold if not cfg.invert_foreground else first < 1 - cfg.threshold
        if int(keep.sum()) < 4:  # nothing in front: show every patch rather than a black image
            keep = torch.ones_like(keep)
    rgb[keep] = _unit(_pca(flat[keep], 3))
    return rgb.reshape(m, t, 3).float()


def pca_pictures(images: list[str], encoders: list[FrozenEncoder], out: str | Path,
                 cfg: PcaConfig = PcaConfig()) -> list[Path]:
    """Write one PNG per image under `out` (named after the image); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = (cfg.grid, cfg.grid)
    pixels = [read_image(Path(p)) for p in images]
    colours = []
    for enc in encoders:
        batch = preprocess_batch(pixels, enc.input_size(grid), enc.mean, enc.std).to(enc.device)
        patches = torch.cat([enc.forward_tokens(batch[i:i + 8])["patch"].cpu()
                             for i in range(0, len(pixels), 8)])
        colours.append(pca_colours(patches, cfg).reshape(len(pixels), *grid, 3))
    written: list[Path] = []
    for i, path in enumerate(images):
        canvas = Image.new("RGB", (cfg.panel * (1 + len(encoders)), cfg.panel + CAPTION),
                           "white")
        shown = torch.nn.functional.interpolate(pixels[i][None].float(), size=(cfg.panel,) * 2,
                                                mode="bilinear", antialias=True)[0]
        canvas.paste(_to_image(shown.permute(1, 2, 0) / 255.0), (0, 0))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, cfg.panel + 2), "image", fill="black")
        for j, enc in enumerate(encoders):
            block = colours[j][i].permute(2, 0, 1)[None]
            big = torch.nn.functional.interpolate(block, size=(cfg.panel,) * 2, mode="nearest")
            canvas.paste(_to_image(big[0].permute(1, 2, 0)), (cfg.panel * (j + 1), 0))
            draw.text((cfg.panel * (j + 1) + 4, cfg.panel + 2), enc.name, fill="black")
        target = out / f"{Path(path).stem}_pca.png"
        if target in written:  # two images with the same name in different folders
            target = out / f"{Path(path).stem}_{i}_pca.png"
        canvas.save(target)
        written.append(target)
    return written


def _to_image(rgb: torch.Tensor) -> Image.Image:
    return Image.fromarray((rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
