"""Shard-aware sampling benchmark: how far are its batches from image order, window by window?

    .venv/bin/python tests/benchmarks/bench_shard_sampling.py [--quick]

No cache is read: the item tables are made from the mixes' sizes (every view usable, the
held-out images taken out exactly as `train.data` does), and the real `ViewEpochSampler` draws
the epochs, in image order (`data.shard_window = 0`) and with `ShardWindowOrder` for each window
W. Two mixes:

- demo: `make demo` (train/demo.py `DemoSizes`): three datasets of one domain each, 2 views per
  image, 32 samples per shard, 8 held-out images each, batch 16, epoch 1,600 samples;
- dune/K (K = 250; 4000 with --quick): DUNE's mix (precompute/presets/dune_vitb14_336.toml:
  its datasets in 3 domains, each dataset's `max_images` divided by K), 4 views, 64 samples per
  shard (the builder's default), 64 held-out images each, a per-device batch of 128
  (train/presets/dune_vitb14.toml), one pass (uniform) or domains x largest domain
  (teacher_balanced) per epoch.

Per batch (a block of `batch` consecutive positions: what one process trains on in a step),
over 3 epochs and several seeds:

- shards/batch: distinct (dataset, shard) pairs read by a batch (image order: about the batch);
- same-shard pairs: the share of a batch's sample pairs that come from one shard (shard
  neighbours are source neighbours: an ImageNet class folder, a scene's frames);
- dataset / domain spread: the batch's chi-square against the epoch's shares, divided by image
  order's (1.00 = the same spread; above = batches less mixed). Domains are exact by
  construction with teacher_balanced;
- repeat distance: batches between two readings of the same image, mean and 1st percentile.

A window is "indistinguishable" from image order when its same-shard pairs, dataset spread,
domain spread and both repeat distances each lie within 2 standard errors (over the seeds) of
image order's. The
table goes to the `bench_shard_sampling` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from _report import machine_description, markdown_table, write_section  # noqa: E402

from train.data import heldout_image_indices  # noqa: E402
from train.demo import DemoSizes  # noqa: E402
from train.item_table import ItemTable  # noqa: E402
from train.sampling import ViewEpochSampler  # noqa: E402
from train.shard_sampling import ShardWindowOrder  # noqa: E402

PRESET = REPO / "precompute" / "presets" / "dune_vitb14_336.toml"
EPOCHS = 3
METRICS = ("pairs", "dataset", "domain", "repeat_mean", "repeat_p1")


class Mix:
    """A data mix as the sampler sees it: the item table and the run's batch and epoch."""

    def __init__(self, name: str, sizes: list[int], domains: list[int], views: int,
                 samples_per_shard: int, heldout: int, batch: int, epoch_size: int | None,
                 seed: int = 0) -> None:
        self.name, self.views, self.batch, self.epoch_size = name, views, batch, epoch_size
        self.images_per_shard = samples_per_shard // views
        usable = []
        for d, n in enumerate(sizes):
            views_ok = np.ones((n, views), dtype=bool)
            views_ok[heldout_image_indices(n, heldout, seed, f"dataset{d}")] = False
            usable.append(views_ok)
        self.table = ItemTable.build(usable, domains, views, max(domains) + 1)
        self.dataset_domain = np.asarray(domains)


def demo_mix() -> Mix:
    s = DemoSizes()
    return Mix("demo", list(s.images), [0, 1, 2], s.views_per_image, s.samples_per_shard,
               s.heldout_images, s.batch_size, s.steps_per_epoch * s.batch_size, s.seed)


def dune_mix(divide: int) -> Mix:
    preset = tomllib.loads(PRESET.read_text())
    names = list(dict.fromkeys(d["domain"] for d in preset["datasets"]))
    sizes = [max(1, d["max_images"] // divide) for d in preset["datasets"]]
    domains = [names.index(d["domain"]) for d in preset["datasets"]]
    return Mix(f"dune/{divide}", sizes, domains, preset["views_per_image"], 64, 64, 128, None)


def _chi2(labels: np.ndarray, batch: int, classes: int) -> float:
    """Mean over batches of the chi-square of a batch's label counts against the shares of
    the whole sequence (labels with no share left out)."""
    n_batches = len(labels) // batch
    labels = labels[: n_batches * batch]
    counts = np.bincount(np.repeat(np.arange(n_batches), batch) * classes + labels,
                         minlength=n_batches * classes).reshape(n_batches, classes)
    share = counts.sum(axis=0) / counts.sum()
    keep = share > 0
    expected = batch * share[keep]
    return float(((counts[:, keep] - expected) ** 2 / expected).sum(axis=1).mean())


def measure(mix: Mix, mode: str, window: int, seed: int) -> dict[str, float]:
    """The metrics of 3 epochs of one sampler (window 0: image order)."""
    t = mix.table
    locator = ShardWindowOrder(t, mix.images_per_shard, max(window, 1))
    order = ShardWindowOrder(t, mix.images_per_shard, window) if window else None
    sampler = ViewEpochSampler(t, seed=seed, mode=mode, epoch_size=mix.epoch_size,  # type: ignore[arg-type]
                               batch_size=mix.batch, order=order)
    sequence = np.concatenate([sampler.global_sequence(e) for e in range(EPOCHS)])
    datasets, shards = locator.locate_shards(sequence)
    b = mix.batch
    n_batches = len(sequence) // b
    key = (datasets * (int(shards.max()) + 1) + shards)[: n_batches * b].reshape(n_batches, b)
    key = np.sort(key, axis=1)
    new = np.ones_like(key, dtype=bool)
    new[:, 1:] = key[:, 1:] != key[:, :-1]
    # Same-shard pairs: sum over a batch's shards of c (c - 1), over b (b - 1).
    run_id = np.cumsum(new.reshape(-1)) - 1
    runs = np.bincount(run_id)
    run_batch = np.repeat(np.arange(n_batches), new.sum(axis=1))
    pairs = np.bincount(run_batch, weights=runs * (runs - 1.0), minlength=n_batches)
    image = np.searchsorted(t.image_first, sequence.astype(t.image_first.dtype), side="right") - 1
    position = np.arange(len(sequence))
    by_image = np.lexsort((position, image))
    same = image[by_image][1:] == image[by_image][:-1]
    distance = np.diff(position[by_image])[same] / b
    return {
        "shards": float(new.sum(axis=1).mean()),
        "pairs": float((pairs / (b * (b - 1))).mean()),
        "dataset": _chi2(datasets, b, len(mix.dataset_domain)),
        "domain": _chi2(mix.dataset_domain[datasets], b, int(mix.dataset_domain.max()) + 1),
        "repeat_mean": float(distance.mean()),
        "repeat_p1": float(np.percentile(distance, 1)),
    }


def summarize(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard error over seeds of each metric."""
    out = {}
    for k in runs[0]:
        values = np.array([r[k] for r in runs])
        out[k] = (float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))))
    return out


def _close(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Within 2 combined standard errors (or equal, when neither varies)."""
    return abs(a[0] - b[0]) <= 2 * np.hypot(a[1], b[1]) + 1e-9 * max(abs(a[0]), abs(b[0]), 1)


def table_rows(mix: Mix, mode: str, windows: list[int], seeds: int
               ) -> tuple[list[list[object]], int | None]:
    """The rows of one mix and mode, and the smallest window indistinguishable from image
    order from which every larger window measured is too (None: none measured)."""
    base = summarize([measure(mix, mode, 0, s) for s in range(seeds)])
    rows, verdicts = [], []
    for window in [0, *windows]:
        m = base if window == 0 else summarize([measure(mix, mode, window, s)
                                                for s in range(seeds)])
        same = window == 0 or all(_close(m[k], base[k]) for k in METRICS)
        verdicts.append((window, same))

        def ratio(k: str, m: dict[str, tuple[float, float]] = m) -> str:
            if base[k][0] < 1e-9:
                return "exact" if m[k][0] < 1e-9 else f"{m[k][0]:.2f} (vs 0)"
            return f"{m[k][0] / base[k][0]:.2f}"

        rows.append([
            mix.name, mode, "image order" if window == 0 else window,
            f"{m['shards'][0]:.1f}", f"{100 * m['pairs'][0]:.2f}%", ratio("dataset"),
            ratio("domain"), f"{m['repeat_mean'][0]:.1f}", f"{m['repeat_p1'][0]:.1f}",
            "—" if window == 0 else ("yes" if same else "no"),
        ])
    smallest = None
    for window, same in reversed(verdicts[1:]):
        if not same:
            break
        smallest = window
    return rows, smallest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 seeds, DUNE's mix / 4000, windows up to 64 (under a minute)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    seeds = 3 if args.quick else 8
    windows = [1, 2, 4, 8, 16, 32, 64] + ([] if args.quick else [128, 256, 512, 1024])
    mixes = [demo_mix(), dune_mix(4000 if args.quick else 250)]
    began = time.perf_counter()
    rows, smallest = [], {}
    for mix in mixes:
        for mode in ("uniform", "teacher_balanced"):
            mine, smallest[(mix.name, mode)] = table_rows(mix, mode, windows, seeds)
            rows += mine
            print(f"{mix.name} {mode}: {time.perf_counter() - began:.0f} s", flush=True)
    header = ["mix", "sampling", "window W", "shards/batch", "same-shard pairs",
              "dataset spread", "domain spread", "repeat mean (batches)",
              "repeat p1 (batches)", "indistinguishable"]
    facts = "; ".join(
        f"{m.name}: {m.table.num_images:,} training images, "
        f"{ShardWindowOrder(m.table, m.images_per_shard, 1).num_shards:,} shards of "
        f"{m.images_per_shard} images, batch {m.batch}" for m in mixes)
    verdict = "; ".join(f"{name} {mode}: W >= {w}" if w else f"{name} {mode}: none measured"
                        for (name, mode), w in smallest.items())
    body = "\n".join([
        "## bench_shard_sampling: shard-aware batches against image order",
        "",
        f"Machine: {machine_description()}.",
        "",
        f"{facts}. {seeds} seeds x {EPOCHS} epochs per row; spreads are ratios to image order's "
        "chi-square per batch (1.00 = as mixed as image order), repeat distances in batches. "
        "\"Indistinguishable\": same-shard pairs, dataset spread, domain spread and both repeat "
        "distances within 2 standard errors of image order's "
        "(tests/benchmarks/bench_shard_sampling.py).",
        "",
        markdown_table(header, rows),
        "",
        f"Smallest window from which every larger one measured is indistinguishable: {verdict}.",
    ])
    print(body)
    if not args.no_write:
        write_section("bench_shard_sampling", body)


if __name__ == "__main__":
    main()
