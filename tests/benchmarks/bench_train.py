"""Training throughput from the cache vs online (teachers in the loop), side by side in one run.

    .venv/bin/python tests/benchmarks/bench_train.py [--preset cpu|gpu] [--steps N]

Same student, teachers, batch and data in both modes. Also measured: the loader alone (image
decoding, view replay and encoded token reads, no model) against the student's step alone (the
batch already in memory), which says whether the loader is the bottleneck.

Presets: `gpu` = three random-init ViT-L teachers (DINOv2-reg /14, MASt3R /16, Multi-HMR /14)
and a ViT-B/14 student at 336 px (grid 24x24), batch 64: the issue's goal is cache / online >= 3.
`cpu` = the same structure scaled down (teachers width 192, 4 blocks, each about four times the
student's forward; student width 96, 4 blocks; grid 8x8, batch 32): measured and reported.
Writes the section `bench_train` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from _report import machine_description, markdown_table, write_section  # noqa: E402

from cache_format.configfile import with_overrides  # noqa: E402
from precompute.build import build_cache  # noqa: E402
from precompute.config import load_build_config  # noqa: E402
from train.config import load_train_config, resolve_paths  # noqa: E402
from train.demo import DemoSizes, to_toml, train_config, write_demo_configs  # noqa: E402
from train.trainer import Trainer  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "sizes": DemoSizes(images=(64, 48, 48), image_size_range=(96, 192), grid=8,
                           views_per_image=1, teacher_dims=(192, 192, 192), teacher_depth=4,
                           student_dim=96, student_depth=4, student_heads=3, batch_size=32,
                           heldout_images=0, num_workers=1, encoding="int8"),
        "full_size": False,
    },
    "gpu": {
        "sizes": DemoSizes(images=(256, 128, 128), image_size_range=(320, 640), grid=24,
                           views_per_image=1, batch_size=64, heldout_images=0, num_workers=8,
                           encoding="int8", samples_per_shard=64),
        "full_size": True,  # real ViT-L teachers and a real ViT-B/14 student (random init)
    },
}


def prepare(root: Path, preset: str) -> Path:
    """Write configs and build the benchmark cache under root (reused when already built)."""
    spec = PRESETS[preset]
    sizes: DemoSizes = spec["sizes"]
    cache_toml, train_toml = write_demo_configs(root, sizes)
    if spec["full_size"]:
        # Drop the stand-ins' overrides: the real architectures, random-init.
        text = cache_toml.read_text()
        for field in ("embed_dim", "depth", "num_heads"):
            text = "\n".join(line for line in text.splitlines()
                             if not line.startswith(f"{field} =")) + "\n"
        cache_toml.write_text(text)
        train = train_config(sizes)
        train["student"] = {"arch": "vit_base_patch14_reg4_dinov2", "img_size": sizes.grid * 14}
        train_toml.write_text(to_toml(train))
    build_cfg = load_build_config(cache_toml, {"runtime.processes": False})
    build_cache(build_cfg, console=Console(stderr=True))
    return train_toml


def trainer_for(train_toml: Path, out: Path, **overrides: Any) -> Trainer:
    cfg = with_overrides(load_train_config(train_toml),
                         {"out_dir": str(out), "eval_every": 10**6, "checkpoint_every": 10**6,
                          "log_every": 1, **overrides})
    return Trainer(resolve_paths(cfg, train_toml), progress="off")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_rates(
    measures: dict[str, Any], rounds: int, steps: int, batch: int
) -> dict[str, tuple[float, float, float]]:
    """Run the measures round-robin, `steps` each per round, so that a busy machine slows them
    alike; returns per measure (median images/s over rounds, slowest round, fastest round).
    The median, not the total, because bursts of other load hit single rounds."""
    per_round: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, one_step in measures.items():
            sync()
            began = time.perf_counter()
            for _ in range(steps):
                one_step()
            sync()
            per_round[name].append(steps * batch / (time.perf_counter() - began))
    return {
        name: (statistics.median(rates), min(rates), max(rates))
        for name, rates in per_round.items()
    }


def training_step(trainer: Trainer) -> Any:
    """One real training step: the next batch from the loader (waiting for it), then the step."""
    iterator = iter(trainer.make_loader())
    next(iterator)  # worker start-up is not throughput

    def run() -> None:
        trainer.train_step(next(iterator))

    return run


def loader_only(trainer: Trainer) -> Any:
    """The DataLoader alone: decode, replay views, read encoded tokens, collate."""
    iterator = iter(trainer.make_loader())
    next(iterator)

    def run() -> None:
        next(iterator)

    return run


def step_only(trainer: Trainer) -> Any:
    """The training step alone, on one batch already in memory (targets decoded or computed)."""
    batch = next(iter(trainer.make_loader())).to(trainer.device)

    def run() -> None:
        trainer.train_step(batch)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4, help="steps per measure per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is steadier on a shared box")
    parser.add_argument("--root", type=Path, default=None,
                        help="where the cache is built (default: a temp folder)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    train_toml = prepare(root, args.preset)
    sizes: DemoSizes = PRESETS[args.preset]["sizes"]
    cached = trainer_for(train_toml, root / "cached", epochs=10**4)
    online = trainer_for(train_toml, root / "online", epochs=10**4, online=True)
    measures = {
        "cached": training_step(cached),
        "online": training_step(online),
        "loader": loader_only(cached),
        "step": step_only(cached),
        "online_step": step_only(online),
    }
    for one_step in measures.values():  # warm-up: first-call allocations, autotuning
        for _ in range(2):
            one_step()
    rates = interleaved_rates(measures, args.rounds, args.steps, sizes.batch_size)
    results = {name: rate[0] for name, rate in rates.items()}
    ratio = results["cached"] / results["online"]
    best_ratio = rates["cached"][2] / rates["online"][2]
    load = os.getloadavg()[0]
    labels = {
        "cached": "training from the cache",
        "online": "online training (teachers in the loop)",
        "loader": f"loader alone ({sizes.num_workers} worker(s): decode, replay, read tokens)",
        "step": "cached training step alone (batch in memory)",
        "online_step": "online training step alone (batch in memory)",
    }
    rows = [
        [label, f"{rates[name][0]:.1f}", f"{rates[name][1]:.1f} - {rates[name][2]:.1f}"]
        for name, label in labels.items()
    ]
    rows.insert(2, ["**ratio cache / online**", f"**{ratio:.2f}x**",
                    f"{best_ratio:.2f}x between the fastest rounds"])
    teachers = ("3 random-init ViT-L teachers (DINOv2-reg /14, MASt3R /16, Multi-HMR /14), "
                "ViT-B/14 student" if PRESETS[args.preset]["full_size"] else
                f"3 stand-in teachers (width {sizes.teacher_dims[0]}, {sizes.teacher_depth} "
                f"blocks; patch 14/16/14), student width {sizes.student_dim}, "
                f"{sizes.student_depth} blocks")
    bottleneck = ("the loader is the bottleneck" if results["loader"] < results["step"]
                  else "the student step is the bottleneck")
    body = "\n".join([
        f"`bench_train.py --preset {args.preset}`: the measures run round-robin, {args.rounds} "
        f"rounds of {args.steps} steps each, so that other load slows them alike. Machine: "
        f"{machine_description()}; load average at the end {load:.1f}.",
        "",
        f"Setup: {teachers}; grid {sizes.grid}x{sizes.grid} ({sizes.grid * 14} px), global "
        f"batch {sizes.batch_size}, {sizes.encoding} cache, one process, "
        f"{torch.get_num_threads()} torch thread(s).",
        "",
        markdown_table(["measurement", "images/s (median of rounds)", "min - max"], rows),
        "",
        f"Loader alone vs the cached step alone: {bottleneck} "
        f"({results['loader']:.1f} vs {results['step']:.1f} images/s). Goal on a GPU "
        "(gpu preset): ratio >= 3.",
    ])
    write_section("bench_train", body)
    print(body)


if __name__ == "__main__":
    main()
