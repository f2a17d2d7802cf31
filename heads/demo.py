"""The heads part of `make demo`: what the trained student is worth next to its teachers.

`run(root, console)` takes the demo folder (root/cache.toml, root/cache, root/train) after
training and, under root/heads/:
1. generates two small labelled datasets (coloured shapes with masks; one shape per image,
   class = shape) at the demo's image size;
2. for the student's own tokens, the student through its DINOv2 projector (the paper's
   segmentation protocol) and each stand-in teacher (`teacher:*@cache.toml`, loaded as the
   build loaded them): extracts features once, fits a small lr grid of linear segmentation and
   classification heads, and keeps the best on val;
3. writes the comparison (`compare.json`, `compare.md`) and PCA pictures of a few val images
   (`pca/*.png`), prints the table and where the pictures are.
Each step is the library call behind a `dune-heads` command; the summary prints the commands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from cache_format.reader import open_cache
from heads.compare import compare_runs, to_rich, write_comparison
from heads.encoders import FrozenEncoder, load_encoders
from heads.features import FeaturesConfig, extract_features
from heads.fit import HeadConfig, fit_heads
from heads.pca import PcaConfig, pca_pictures
from heads.synthetic import make_shapes_classification, make_shapes_segmentation


@dataclass(frozen=True)
class HeadsDemoSizes:
    """What sets the heads step's cost (about a minute on 2 CPU cores with the demo's models)."""

    seg_images: int = 64
    cls_train: int = 48
    cls_val: int = 24
    label_size: int = 56
    epochs: int = 10
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    pca_images: int = 3
    panel: int = 128


def demo_encoders(root: Path) -> list[FrozenEncoder]:
    """Student (own tokens, and through the dinov2 projector when there is one) + teachers."""
    run = root / "train"
    specs = [f"student:{run}"]
    heads = (run / "teachers.json").read_text() if (run / "teachers.json").is_file() else ""
    if '"dinov2"' in heads:
        specs.append(f"student:{run}@dinov2")
    specs.append(f"teacher:*@{root / 'cache.toml'}")
    return [e for spec in specs for e in load_encoders(spec)]


def run(root: str | Path, console: Console, sizes: HeadsDemoSizes = HeadsDemoSizes()) -> dict:
    """Evaluate the demo's student and stand-in teachers with linear heads (see module doc)."""
    root = Path(root)
    out = root / "heads"
    started = time.perf_counter()
    console.rule("[bold]heads: frozen encoders, linear heads on generated data")
    grid = open_cache(root / "cache").manifest.grid[0]
    side = grid * 14  # the student's image size: the data needs no resize for /14 encoders
    seg_data, cls_data = out / "data" / "shapes-seg", out / "data" / "shapes-cls"
    if not (seg_data / "classes.txt").is_file():
        make_shapes_segmentation(seg_data, sizes.seg_images, side=side, seed=1)
    if not (cls_data / "val").is_dir():
        make_shapes_classification(cls_data, sizes.cls_train, sizes.cls_val, side=side, seed=2)
    encoders = demo_encoders(root)
    for enc in encoders:
        for task, data in (("segmentation", seg_data), ("classification", cls_data)):
            feats = out / "features" / f"{enc.name}-{task}"
            extract_features(enc, FeaturesConfig(task=task, data=str(data), grid=grid,
                                                 label_size=sizes.label_size, batch_size=64),
                             feats,
                             overwrite=True)
            fit_heads(HeadConfig(task=task, features=str(feats), epochs=sizes.epochs,
                                 lrs=sizes.lrs), out / "runs" / f"{enc.name}-{task}")
        console.print(f"  {enc.name}: segmentation and classification heads fitted "
                      f"({time.perf_counter() - started:.0f} s)")
    table = compare_runs([str(out / "runs" / f"{enc.name}-{task}") for enc in encoders
                          for task in ("classification", "segmentation")])
    json_path, md_path = write_comparison(table, out)
    val_images = sorted((seg_data / "images").glob("*.png"))[-sizes.pca_images:]
    pictures = pca_pictures([str(p) for p in val_images], encoders, out / "pca",
                            PcaConfig(grid=grid, panel=sizes.panel))
    console.print(to_rich(table, title="linear heads on frozen encoders (val; generated data)"))
    console.print(f"heads      {out}  ({time.perf_counter() - started:.0f} s): {md_path.name}, "
                  f"{json_path.name}, runs/, features/")
    console.print(f"PCA        {pictures[0]}  (and {len(pictures) - 1} more beside it)")
    console.print(f"  by hand: dune-heads features student:{root / 'train'} {seg_data} "
                  f"--task segmentation --grid {grid} --out FEATS; dune-heads fit segmentation "
                  "--features FEATS --out RUN; dune-heads compare " + str(out / "runs"))
    return {"table": table, "pictures": pictures, "seconds": time.perf_counter() - started}
