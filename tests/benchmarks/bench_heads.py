"""Head training from cached features vs re-running the frozen encoder every epoch.

    .venv/bin/python tests/benchmarks/bench_heads.py [--rounds N] [--images N]

Same encoder, data, grid of linear segmentation heads (3 learning rates) and head code in both
modes. "cached": the encoder runs once (`extract_features`, timed separately) and every epoch
reads the features from the cache (`FeatureBatches`, streaming, not preloaded). "online": every
epoch decodes the images and runs the encoder on each batch before the same head step. Epochs
of the two modes alternate (round-robin) so that other load on the machine slows both alike.
The encoder is a random-init DINOv2-style ViT (width 192, 6 blocks, patch 14) at grid 8x8
(112 px); the data are the generated shapes (heads/synthetic.py).
Writes the section `bench_heads` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from _report import machine_description, markdown_table, write_section  # noqa: E402

from heads.datasets import PairReport, Task  # noqa: E402
from heads.encoders import FrozenEncoder, from_teacher_config  # noqa: E402
from heads.features import (  # noqa: E402
    FeaturesConfig,
    extract_features,
    open_features,
    preprocess,
    resize_label,
)
from heads.fit import FeatureBatches, HeadConfig, build_grid  # noqa: E402
from heads.metrics import IGNORE  # noqa: E402
from heads.models import HeadGrid, task_loss  # noqa: E402
from heads.readers import PairedFolder, open_labelled  # noqa: E402
from heads.synthetic import make_shapes_segmentation  # noqa: E402
from precompute.teachers.config import TeacherConfig  # noqa: E402

GRID, LABEL, BATCH = 8, 56, 16


def bench_encoder() -> FrozenEncoder:
    """A random-init DINOv2-style ViT, width 192, 6 blocks (a registered kind with overrides)."""
    cfg = TeacherConfig(name="vit192", kind="dino2reg_vitlarge_14", embed_dim=192, depth=6,
                        num_heads=3)
    return from_teacher_config(cfg, "teacher:dino2reg_vitlarge_14 (192 wide, 6 blocks)")


def head_step(grid: HeadGrid, optimizer: torch.optim.Optimizer,
              tokens: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    x = grid.inputs(tokens)
    optimizer.zero_grad(set_to_none=True)
    for chunk in grid.chunks(len(labels)):
        out = grid.forward_heads(chunk, x)
        torch.stack([task_loss(grid.task, out[j], labels, IGNORE)
                     for j in range(len(chunk))]).sum().backward()
    optimizer.step()


def cached_epoch(grid: HeadGrid, optimizer: torch.optim.Optimizer, data: FeatureBatches,
                 rng: np.random.Generator) -> int:
    order = rng.permutation(len(data))
    for first in range(0, len(order), BATCH):
        head_step(grid, optimizer, *data.batch(np.sort(order[first:first + BATCH])))
    return len(order)


def online_epoch(grid: HeadGrid, optimizer: torch.optim.Optimizer, encoder: FrozenEncoder,
                 source: PairedFolder, rng: np.random.Generator) -> int:
    keys = source.keys("train")
    order = rng.permutation(len(keys))
    size = encoder.input_size((GRID, GRID))
    for first in range(0, len(order), BATCH):
        images, labels = [], []
        for i in order[first:first + BATCH]:
            image, mask = source.load("train", int(i))
            images.append(preprocess(image, size, encoder.mean, encoder.std))
            labels.append(torch.from_numpy(resize_label(mask, LABEL)).long())
        tokens = encoder.forward_tokens(torch.stack(images))
        head_step(grid, optimizer, tokens, torch.stack(labels))
    return len(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_shapes_segmentation(root / "seg", args.images, side=GRID * 14, seed=0)
        encoder = bench_encoder()
        started = time.perf_counter()
        extract_features(encoder, FeaturesConfig(task="segmentation", data=str(data), grid=GRID,
                                                 label_size=LABEL), root / "feats")
        extract_s = time.perf_counter() - started
        features = open_features(root / "feats")
        cfg = HeadConfig(task="segmentation", features=str(root / "feats"), lrs=(1e-3, 1e-2, 1e-1))
        rates: dict[str, list[float]] = {"cached": [], "online": []}
        grids = {}
        for mode in rates:
            grid = build_grid(cfg, features, len(cfg.settings))
            grids[mode] = (grid, torch.optim.AdamW(grid.parameters(), lr=1e-2))
        cached = FeatureBatches(features, "train", torch.device("cpu"), preload_gb=0.0)
        source = open_labelled("seg-folder", str(data), task=Task.segmentation,
                               report=PairReport())
        rng = np.random.default_rng(0)
        for _ in range(args.rounds):
            for mode in rates:
                t = time.perf_counter()
                n = (cached_epoch(*grids[mode], cached, rng) if mode == "cached"
                     else online_epoch(*grids[mode], encoder, source, rng))
                rates[mode].append(n / (time.perf_counter() - t))
    med = {m: statistics.median(v) for m, v in rates.items()}
    ratio = med["cached"] / med["online"]
    n_train = len(cached)
    epochs_even = extract_s / (1 / med["online"] - 1 / med["cached"]) / n_train
    load = os.getloadavg()[0]
    body = (
        f"`bench_heads.py`: {args.rounds} rounds, one epoch of each mode per round (round-robin)."
        f" Machine: {machine_description()}; load average at the end {load:.1f}.\n\n"
        f"Setup: random-init DINOv2-style ViT (width 192, 6 blocks, /14) as the frozen encoder, "
        f"grid {GRID}x{GRID} (112 px), {n_train} train images of generated shapes, a grid of 3 "
        f"linear segmentation heads (labels {LABEL}x{LABEL}), batch {BATCH}, fp16 features, "
        f"{args.threads} torch thread(s).\n\n"
        + markdown_table(
            ["measurement", "images/s (median of rounds)", "min - max"],
            [["head epoch from cached features", f"{med['cached']:.1f}",
              f"{min(rates['cached']):.1f} - {max(rates['cached']):.1f}"],
             ["head epoch re-running the encoder", f"{med['online']:.1f}",
              f"{min(rates['online']):.1f} - {max(rates['online']):.1f}"],
             ["**ratio cached / online**", f"**{ratio:.2f}x**", ""],
             ["feature extraction, once (train + val)", f"{args.images / extract_s:.1f}",
              f"{extract_s:.1f} s"]])
        + f"\n\nThe one-time extraction is paid back after {epochs_even:.1f} epoch(s); the linear"
        " protocols train for many (DINOv2: 40k iterations), and every further head, lr grid or"
        " task on the same features costs only head epochs.\n")
    print(body)
    if not args.no_write:
        write_section("bench_heads", body)


if __name__ == "__main__":
    main()
