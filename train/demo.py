"""`make demo`: both stages end to end on a small generated data mix, no GPU, no weights.

    python -m train.demo [--root demo-run] [--steps N]

1. generates three small image datasets (three domains, ~350 images: an image folder of "2d"
   images, a list file of "3d" images, an HDF5 file of "human" images);
2. writes `demo-run/cache.toml` with three small random-init teachers standing in for DINOv2
   (patch 14, cls + patch), MASt3R (patch 16, patch tokens only) and Multi-HMR (patch 14, patch
   only), each a different width, and `demo-run/train.toml` for a small ViT-S/14-style student;
3. runs `dune-cache build demo-run/cache.toml` (in-process dask cluster) and `dune-train fit
   demo-run/train.toml` as the user would, in subprocesses;
4. prints a summary: cache size and encoding, images/s, each teacher's loss at the start and the
   end, the held-out cosine, where every output is, and the commands to rerun each stage.

The same two configs train with the real teachers: set each teacher's `checkpoint` to the
official file, drop the `embed_dim` / `depth` / `num_heads` overrides, and use real data (see
docs/training.md). `write_demo_configs` is also what the tests use, with tinier sizes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import typer
from rich.console import Console
from rich.table import Table

from precompute.synthetic import make_hdf5_dataset, make_image_folder, make_list_dataset


@dataclass(frozen=True)
class DemoSizes:
    """Everything that sets the demo's cost (the defaults fit 10 minutes on 2 CPU cores)."""

    images: tuple[int, int, int] = (160, 96, 96)  # 2d, 3d, human
    image_size_range: tuple[int, int] = (48, 128)
    grid: int = 8
    views_per_image: int = 2
    encoding: str = "int8"
    samples_per_shard: int = 32
    teacher_dims: tuple[int, int, int] = (64, 48, 32)  # dinov2, mast3r, multihmr stand-ins
    teacher_depth: int = 2
    student_dim: int = 96
    student_depth: int = 4
    student_heads: int = 3
    batch_size: int = 16
    steps_per_epoch: int = 100
    epochs: int = 3
    heldout_images: int = 8
    num_workers: int = 1
    log_every: int = 5
    eval_every: int = 50
    checkpoint_every: int = 100
    lr: float = 2e-3
    dropping: str = "lowest_loss"
    sharing: str = "all"
    seed: int = 0


TEACHERS = (
    # name, kind (the real architecture it stands in for), domain, label
    ("dinov2", "dino2reg_vitlarge_14", "2d", "DINOv2 /14"),
    ("mast3r", "mast3r_vitlarge_16", "3d", "MASt3R /16"),
    ("multihmr", "multihmr_vitlarge_14_672", "human", "Multi-HMR /14"),
)


def make_demo_data(root: Path, sizes: DemoSizes) -> list[dict[str, Any]]:
    """Write the three datasets under root/data (once) and return their [[datasets]] tables."""
    data = root / "data"
    n2d, n3d, nhuman = sizes.images
    if not (data / "2d").is_dir():
        make_image_folder(data / "2d", n2d, sizes.image_size_range, seed=sizes.seed + 1)
    if not (data / "3d" / "list.txt").is_file():
        make_list_dataset(data / "3d", n3d, sizes.image_size_range, seed=sizes.seed + 2)
    if not (data / "human.h5").is_file():
        make_hdf5_dataset(data / "human.h5", nhuman, sizes.image_size_range, seed=sizes.seed + 3)
    return [
        {"name": "web2d", "kind": "folder", "root": "data/2d", "domain": "2d"},
        {"name": "scenes3d", "kind": "list", "root": "data/3d",
         "list_file": "data/3d/list.txt", "domain": "3d"},
        {"name": "humans", "kind": "hdf5", "root": "data/human.h5", "hdf5_key": "images",
         "domain": "human"},
    ]


def cache_config(sizes: DemoSizes, datasets: list[dict[str, Any]]) -> dict[str, Any]:
    """The `dune-cache build` config of the demo (paths relative to the config file)."""
    heads = {64: 4, 48: 3, 32: 2}
    return {
        "cache": "cache",
        "grid": [sizes.grid, sizes.grid],
        "student_patch": 14,
        "views_per_image": sizes.views_per_image,
        "seed": sizes.seed,
        "samples_per_shard": sizes.samples_per_shard,
        "encoding": {"name": sizes.encoding, "codec": "none"},
        "sharing": {"strategy": sizes.sharing},
        "build": {"batch_size": 32, "calibration_samples": 64},
        # In-process dask workers (threads); one loader process decodes images beside one
        # torch thread, so that 2 cores are not oversubscribed.
        "runtime": {"loader_workers": 1, "torch_threads": 1, "processes": False},
        "teachers": [
            {"name": name, "kind": kind, "domain": domain, "init": "random", "init_seed": 100 + i,
             "embed_dim": dim, "depth": sizes.teacher_depth, "num_heads": heads.get(dim, 1)}
            for i, ((name, kind, domain, _), dim) in enumerate(
                zip(TEACHERS, sizes.teacher_dims, strict=True)
            )
        ],
        "datasets": datasets,
    }


def train_config(sizes: DemoSizes) -> dict[str, Any]:
    """The `dune-train fit` config of the demo (paths relative to the config file)."""
    return {
        "batch_size_global": sizes.batch_size,
        "epochs": sizes.epochs,
        "epoch_size": sizes.steps_per_epoch * sizes.batch_size,
        "log_every": sizes.log_every,
        "eval_every": sizes.eval_every,
        "checkpoint_every": sizes.checkpoint_every,
        "seed": sizes.seed,
        "out_dir": "train",
        "student": {
            "arch": "vit_small_patch14_reg4_dinov2",
            "img_size": sizes.grid * 14,
            "embed_dim": sizes.student_dim,
            "depth": sizes.student_depth,
            "num_heads": sizes.student_heads,
        },
        "projector": {"kind": "tp", "n_blocks": 1},
        "norm": {"mode": "exact"},
        "dropping": {"strategy": sizes.dropping, "p": 0.5},
        "data": {
            "cache": "cache",
            "sampling": "teacher_balanced",
            "heldout_images": sizes.heldout_images,
            "num_workers": sizes.num_workers,
        },
        "optim": {"lr": sizes.lr, "scale_lr_with_batch": False, "warmup_fraction": 0.1},
    }


def write_demo_configs(root: Path, sizes: DemoSizes = DemoSizes()) -> tuple[Path, Path]:
    """Generate the data and write root/cache.toml and root/train.toml; returns both paths."""
    root.mkdir(parents=True, exist_ok=True)
    datasets = make_demo_data(root, sizes)
    cache_toml, train_toml = root / "cache.toml", root / "train.toml"
    cache_toml.write_text(to_toml(cache_config(sizes, datasets)))
    train_toml.write_text(to_toml(train_config(sizes)))
    return cache_toml, train_toml


def to_toml(data: dict[str, Any]) -> str:
    """TOML text of a config dict (None values are left out: TOML has no null).

    tomli-w quotes every key that is not a bare key, so a dataset named `a.b` stays one key
    instead of becoming a nested table.
    """
    return tomli_w.dumps(_drop_none(data))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


# -- the demo itself ---------------------------------------------------------------------------
def _run(argv: list[str], console: Console) -> float:
    """Run one stage as the user would; returns its wall time. Stops the demo if it fails."""
    console.rule(f"[bold]$ {shlex.join(argv)}")
    started = time.perf_counter()
    done = subprocess.run(argv, check=False)
    if done.returncode != 0:
        console.print(f"[red]stage failed with exit code {done.returncode}: {shlex.join(argv)}")
        raise typer.Exit(done.returncode)
    return time.perf_counter() - started


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _command(script: str, module: str) -> str:
    """How to run a console script so that the line works as printed: the venv's own script
    (relative to here when inside it), else `python -m module` with this interpreter."""
    path = Path(sys.executable).parent / script
    if not path.is_file():
        return f"{shlex.quote(sys.executable)} -m {module}"
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def _cache_state(cache: Path) -> str:
    """"none", "partial" or "complete": what a build would find (so its rate can be honest)."""
    if not (cache / "zarr.json").exists():
        return "none"
    from precompute.cache_tools import cache_info

    return "complete" if cache_info(str(cache))["complete"] else "partial"


def _trained_steps(run: Path) -> int:
    """The last logged training step of a run folder (0 when it has none)."""
    from train.metrics import read_metrics

    if not (run / "metrics.jsonl").exists():
        return 0
    return max((r["step"] for r in read_metrics(run) if r.get("kind") == "train"), default=0)


def summarize(
    root: Path, build_s: float, train_s: float, console: Console, run: Path | None = None,
    *, build_state: str = "none", steps_before: int = 0,
) -> None:
    """The demo's closing summary (cache, throughput, losses, outputs, rerun commands).

    `root` holds cache.toml, train.toml and cache/; the run is root/train unless given.
    `build_state` is what the build found (`_cache_state`) and `steps_before` the run's last
    step before training: a rerun that computed nothing reports no rate.
    """
    from cache_format.reader import open_cache
    from train.metrics import first_last, read_metrics

    cache, run = root / "cache", run or root / "train"
    manifest = open_cache(cache).manifest
    rows = read_metrics(run)
    train_rows = [r for r in rows if r.get("kind") == "train"]
    images = sum(fp.num_images for fp in manifest.datasets.values())
    samples = images * manifest.views_per_image
    table = Table(title="teachers: loss at the first and last logged step, held-out cosine")
    for col in ("teacher", "stands in for", "width", "loss start", "loss end", "cos start",
                "cos end"):
        table.add_column(col)
    for name, _, _, label in TEACHERS:
        if name not in manifest.teachers:
            continue
        key, cos = f"loss/{name}", f"heldout/cos/{name}"
        first, last = first_last(rows, key)
        c0, c1 = first_last(rows, cos, kind="eval")
        table.add_row(name, label, str(manifest.teachers[name].dim), f"{first:.4f}",
                      f"{last:.4f}", f"{c0:.3f}", f"{c1:.3f}")
    console.rule("[bold]demo summary")
    enc = manifest.encoding
    built = {
        "none": f"built in {build_s:.0f} s "
                f"({samples * len(manifest.teachers) / build_s:.0f} teacher-images/s)",
        "partial": f"resumed in {build_s:.0f} s (no rate: part was built by an earlier run)",
        "complete": "already complete: this rerun computed nothing",
    }[build_state]
    console.print(
        f"cache      {cache}  {_folder_size(cache) / 1e6:.1f} MB, {samples} samples x "
        f"{len(manifest.teachers)} teachers, encoding {enc.name} (codec {enc.codec}), grid "
        f"{manifest.grid[0]}x{manifest.grid[1]}; {built}"
    )
    rate = train_rows[-1].get("images_per_s", float("nan")) if train_rows else float("nan")
    steps = train_rows[-1]["step"] if train_rows else 0
    if steps <= steps_before:
        console.print(f"training   already at step {steps}: this rerun trained nothing")
    else:
        console.print(f"training   {steps - steps_before} steps in {train_s:.0f} s, "
                      f"{rate:.1f} images/s")
    console.print(table)
    console.print(f"configs    {root / 'cache.toml'}  {root / 'train.toml'}")
    console.print(f"run        {run}  (config.json, metrics.jsonl, curves/losses.png, "
                  "tensorboard/, checkpoints/last.pt and best.pt)")
    cache_cli, train_cli = _command("dune-cache", "precompute.cli"), _command("dune-train",
                                                                              "train.cli")
    console.print("rerun by hand (these lines work as printed, from this folder):")
    console.print(f"  {cache_cli} build {root / 'cache.toml'}      # resumes; a no-op when "
                  "complete", soft_wrap=True)
    console.print(f"  {train_cli} fit {root / 'train.toml'}        # resumes from last.pt",
                  soft_wrap=True)
    console.print(f"  {train_cli} export {run} {root / 'export'}", soft_wrap=True)


def demo(
    root: Path = typer.Option(Path("demo-run"), help="Where everything goes."),
    steps: int | None = typer.Option(None, help="Stop training after N steps (default: all)."),
) -> None:
    """Generate data, build the cache, train, summarize."""
    console = Console()
    sizes = DemoSizes()
    started = time.perf_counter()
    cache_toml, train_toml = write_demo_configs(root, sizes)
    console.print(f"data and configs written under {root} ({time.perf_counter() - started:.0f} s)")
    build_state = _cache_state(root / "cache")
    build_s = _run([sys.executable, "-m", "precompute.cli", "build", str(cache_toml)], console)
    fit = [sys.executable, "-m", "train.cli", "fit", str(train_toml)]
    steps_before = _trained_steps(root / "train")
    train_s = _run(fit + (["--max-steps", str(steps)] if steps else []), console)
    summarize(root, build_s, train_s, console, build_state=build_state,
              steps_before=steps_before)
    from heads.demo import run as run_heads  # heads/: linear heads, comparison, PCA pictures

    run_heads(root, console)
    console.print(f"demo done in {time.perf_counter() - started:.0f} s")


def main() -> None:
    """Entry point of `python -m train.demo`."""
    typer.run(demo)


if __name__ == "__main__":
    main()
