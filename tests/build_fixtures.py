"""Shared by the cache-build tests: tiny images, a tiny build config, cache digests.

The mix, in this order: "rooms" (an HDF5 file of 4 generated images, domain 3d) and "web" (a
folder of 6 generated images plus one file of every bad kind, domain 2d). Two random-init
teachers with the real architectures shrunk to width 32 and one block: "dino" (DINOv2-reg,
patch 14, cls + patch) and "mast3r" (CroCo, patch 16, patch only). Grid 2x2, 2 views per image,
4 samples per shard, batches of 3 samples (so batches straddle images and shards end mid-batch).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from precompute.build import build_cache
from precompute.config import CacheBuildConfig, load_build_config
from precompute.results import BuildSummary
from precompute.synthetic import make_hdf5_dataset, make_image_folder
from train.demo import to_toml

REPO = Path(__file__).resolve().parents[1]
VIEWS = 2
WEB_GOOD, ROOMS = 6, 4

TEACHERS = {
    "dino": {"kind": "dino2reg_vitlarge_14", "domain": "2d", "init_seed": 1,
             "init": "random"},
    "mast3r": {"kind": "mast3r_vitlarge_16", "domain": "3d", "init_seed": 2,
               "init": "random"},
}


def make_images(root: Path) -> dict[str, dict[str, Any]]:
    """Write the two datasets under root; return their TOML tables by name."""
    make_image_folder(root / "web", WEB_GOOD, size_range=(24, 60), seed=1, subfolders=2,
                      bad=True)
    make_hdf5_dataset(root / "rooms.h5", ROOMS, size_range=(24, 60), seed=2)
    return {
        "web": {"kind": "folder", "root": str(root / "web"), "domain": "2d"},
        "rooms": {"kind": "hdf5", "root": str(root / "rooms.h5"), "hdf5_key": "images",
                  "domain": "3d"},
    }


def config_toml(cache: Path | str, datasets: dict[str, dict[str, Any]], *,
                teachers: tuple[str, ...] = ("dino", "mast3r"),
                dataset_names: tuple[str, ...] = ("rooms", "web"),
                encoding: str = "int8", seed: int = 3, sharing: str = "all",
                runtime: dict[str, Any] | None = None, grid: tuple[int, int] = (2, 2)) -> str:
    """The TOML text of a tiny build config."""
    run = {"loader_workers": 0, "torch_threads": 1, "processes": False, "device": "cpu",
           **(runtime or {})}
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    return to_toml({
        "cache": str(cache), "grid": list(grid), "views_per_image": VIEWS,
        "samples_per_shard": 4, "seed": seed,
        "encoding": {"name": encoding},
        "build": {"batch_size": 3, "calibration_samples": 6},
        "sharing": {"strategy": sharing},
        "runtime": run,
        "teachers": [{"name": name, **TEACHERS[name], **tiny} for name in teachers],
        "datasets": [{"name": name, **datasets[name]} for name in dataset_names],
    })


def write_config(path: Path, cache: Path | str, datasets: dict[str, dict[str, Any]],
                 **options: Any) -> Path:
    """Write a tiny build config to `path` and return it."""
    path.write_text(config_toml(cache, datasets, **options))
    return path


def build_quiet(config: CacheBuildConfig | Path, **kwargs: Any) -> BuildSummary:
    """Build without console output (a Path is loaded first)."""
    cfg = load_build_config(config) if isinstance(config, Path) else config
    return build_cache(cfg, console=Console(quiet=True), **kwargs)


def file_hashes(cache: Path | str) -> dict[str, str]:
    """sha256 of every file under the cache, by relative path."""
    out = {}
    for root, _, names in os.walk(cache):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, cache)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cache_digest(cache: Path | str) -> dict[str, str]:
    """File hashes of a cache, comparable across cache paths and runtime settings.

    The root zarr.json holds the manifest, whose build_config names the cache path and the
    runtime settings: it is replaced by the manifest without those two fields (and without the
    manifest's checksum, a function of it).
    """
    digest = file_hashes(cache)
    root = json.loads(Path(cache, "zarr.json").read_text())
    manifest = root["attributes"]["dune_cache"]
    for key in ("cache", "runtime"):
        manifest["build_config"].pop(key, None)
    root["attributes"].pop("dune_cache_sha256", None)  # the manifest's checksum: covered above
    digest["zarr.json"] = hashlib.sha256(
        json.dumps(root, sort_keys=True).encode()).hexdigest()
    return digest


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: the repository importable, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    """`dune-cache ARGS` run with this interpreter."""
    return [sys.executable, "-m", "precompute.cli", *args]

