"""Heads many times: train a grid of linear heads from a features folder, keep the best on val.

One pass over the features per epoch trains every head of the grid (one per learning rate x
weight decay, as DINOv2's linear evaluation does): each batch is read from the cache once and
fed to all heads. After the last epoch every head is evaluated on the val split, the best by
the task's selection metric (top-1, mIoU, RMSE) is kept, and the run folder gets:
- `head_config.json`: the `HeadConfig`;
- `results.json`: encoder, data, every grid member's lr / weight decay / final loss / val
  metrics, the index of the best, its metrics, and the time spent;
- `head.safetensors`: the best head (its linear layer and the standardization buffers).

Training follows the linear protocols: no augmentation (features are fixed), AdamW, cosine
decay of each head's lr to 0 over all steps. Batches come from memory when the split's
features fit in `preload_gb`, else straight from the cache (`read_encoded`, decoded on the
device) batch by batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cache_format.errors import ConfigError
from cache_format.serde import check_choice, from_dict, to_dict
from heads.datasets import Task
from heads.features import Features, open_features
from heads.metrics import IGNORE, DepthScore, SegmentationScore, TopK, better
from heads.models import HeadGrid, task_loss

SELECTION = {Task.classification: "top1", Task.segmentation: "miou", Task.depth: "rmse"}
DEFAULT_BATCH = {Task.classification: 256, Task.segmentation: 16, Task.depth: 16}


@dataclass(frozen=True)
class HeadConfig:
    """One `dune-heads fit`: which features, which grid, how long."""

    task: str
    features: str
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    weight_decays: tuple[float, ...] = (1e-4,)
    epochs: int = 10
    batch_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    depth_bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0
    preload_gb: float = 4.0

    def __post_init__(self) -> None:
        check_choice(self.task, tuple(Task), "task")
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"lrs: expected positive learning rates, found {self.lrs}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ConfigError(f"weight_decays: expected values >= 0, found {self.weight_decays}")
        if self.epochs <= 0 or (self.batch_size is not None and self.batch_size <= 0):
            raise ConfigError(f"epochs and batch_size must be positive, found {self.epochs} "
                              f"and {self.batch_size}")
        if not 0 < self.min_depth < self.max_depth:
            raise ConfigError(f"min_depth / max_depth: expected 0 < min < max, found "
                              f"{self.min_depth} / {self.max_depth}")

    @property
    def settings(self) -> list[tuple[float, float]]:
        """The grid: every (lr, weight decay) pair."""
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]


class FeatureBatches:
    """Batches {tok: float32 [B, ...]} of a split on `device`: from memory or from the cache."""

    def __init__(self, features: Features, split: str, device: torch.device,
                 preload_gb: float) -> None:
        self.features, self.split, self.device = features, split, device
        self.rows = features.ok(split)
        self.labels = features.labels(split)
        reader, name = features.reader, features.encoder
        fp = reader.manifest.teachers[name]
        per_row = (reader.manifest.num_tokens + 1) * fp.dim * 2  # bytes as float16
        self.memory: dict[str, torch.Tensor] | None = None
        if per_row * len(self.rows) <= preload_gb * 2**30:
            parts: dict[str, list[torch.Tensor]] = {}
            for first in range(0, len(self.rows), 256):
                got = reader.read_encoded(split, self.rows[first:first + 256], [name])[name]
                for tok, enc in got.items():
                    parts.setdefault(tok, []).append(enc.decode().half())
            self.memory = {tok: torch.cat(v).to(device) for tok, v in parts.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features and labels of rows `positions` (indices into the split's ok samples)."""
        rows = self.rows[positions]
        if self.memory is not None:
            pos = torch.as_tensor(positions, device=self.device)
            tokens = {tok: v[pos].float() for tok, v in self.memory.items()}
        else:
            order = np.argsort(rows)  # sorted reads are sequential within a shard
            got = self.features.reader.read_encoded(self.split, rows[order],
                                                    [self.features.encoder])
            inverse = torch.as_tensor(np.argsort(order))
            tokens = {tok: enc.to(self.device).decode()[inverse.to(self.device)]
                      for tok, enc in got[self.features.encoder].items()}
        labels = torch.as_tensor(np.asarray(self.labels[rows]))
        if labels.dtype != torch.float32:  # class indices: int64 once, not once per head
            labels = labels.long()
        return tokens, labels.to(self.device)


def build_grid(cfg: HeadConfig, features: Features, count: int) -> HeadGrid:
    """The grid for `features` with the train split's standardization set."""
    task = Task(cfg.task)
    fp = features.reader.manifest.teachers[features.encoder]
    out = (len(features.classes) if task != Task.depth else cfg.depth_bins)
    grid = HeadGrid(task, count, fp.dim, fp.has_cls, out, tuple(features.info["grid"]),
                    int(features.info["label_size"]), min_depth=cfg.min_depth,
                    max_depth=cfg.max_depth)
    for tok in fp.token_types:
        grid.set_standardization(tok, *features.standardization(tok))
    return grid


def _score(task: Task, cfg: HeadConfig, classes: int) -> Any:
    if task == Task.classification:
        return TopK()
    if task == Task.segmentation:
        return SegmentationScore(classes)
    return DepthScore(cfg.min_depth, cfg.max_depth)


@torch.no_grad()
def evaluate(grid: HeadGrid, data: FeatureBatches, cfg: HeadConfig, classes: int,
             heads: list[int] | None = None) -> list[dict[str, float]]:
    """Metrics of each head (all by default) on every ok sample of `data`'s split."""
    grid.eval()
    heads = list(range(len(grid.heads))) if heads is None else heads
    scores = [_score(grid.task, cfg, classes) for _ in heads]
    size = cfg.batch_size or DEFAULT_BATCH[grid.task]
    for first in range(0, len(data), size):
        tokens, labels = data.batch(np.arange(first, min(first + size, len(data))))
        predictions = grid.predictions(grid.inputs(tokens))
        for score, h in zip(scores, heads, strict=True):
            score.update(predictions[h], labels)
    return [score.compute() for score in scores]


def fit_heads(cfg: HeadConfig, out: str | Path, log: Any = None) -> dict[str, Any]:
    """Train the grid on the train split, pick the best on val, write the run folder `out`."""
    started = time.perf_counter()
    features = open_features(cfg.features)
    task = Task(cfg.task)
    if features.task != task:
        raise ConfigError(f"{cfg.features}: these features carry {features.task.value} labels, "
                          f"not {task.value}", hint=f"run `dune-heads fit {features.task.value}`"
                          " or extract features for this task")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    settings = cfg.settings
    grid = build_grid(cfg, features, len(settings)).to(device)
    train = FeatureBatches(features, "train", device, cfg.preload_gb)
    val = FeatureBatches(features, "val", device, cfg.preload_gb)
    size = cfg.batch_size or DEFAULT_BATCH[task]
    steps_per_epoch = max(1, math.ceil(len(train) / size))
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(
        [{"params": head.parameters(), "lr": lr, "weight_decay": wd, "initial_lr": lr}
         for head, (lr, wd) in zip(grid.heads, settings, strict=True)])
    rng = np.random.default_rng(cfg.seed)
    losses = np.zeros(len(settings))
    step = 0
    for epoch in range(cfg.epochs):
        grid.train()
        order = rng.permutation(len(train))
        epoch_loss = np.zeros(len(settings))
        for first in range(0, len(order), size):
            # lr: cosine from each head's own lr down to 0 over every step of the run
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            tokens, labels = train.batch(np.sort(order[first:first + size]))
            x = grid.inputs(tokens)  # read and standardized once for the whole grid
            optimizer.zero_grad(set_to_none=True)
            for chunk in grid.chunks(len(labels)):  # heads batched within a memory budget
                outputs = grid.forward_heads(chunk, x)
                head_losses = [task_loss(task, outputs[j], labels, IGNORE)
                               for j in range(len(chunk))]
                torch.stack(head_losses).sum().backward()
                for h, loss in zip(chunk, head_losses, strict=True):
                    epoch_loss[h] += float(loss.detach())
            optimizer.step()
            step += 1
        losses = epoch_loss / steps_per_epoch
        if log is not None:
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {losses.min():.4f} (best head) "
                f"{losses.max():.4f} (worst)")
    results = evaluate(grid, val, cfg, len(features.classes))
    metric = SELECTION[task]
    best = 0
    for h, res in enumerate(results):
        if better(metric, res[metric], results[best][metric]):
            best = h
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    save_file(_head_state(grid, best), str(out / "head.safetensors"))
    summary = {
        "task": task.value, "encoder": features.info["encoder"], "data": features.info["data"],
        "features": str(Path(cfg.features).resolve()), "classes": list(features.classes),
        "train_samples": len(train), "val_samples": len(val), "selection": f"val {metric}",
        "grid": [{"lr": lr, "weight_decay": wd, "final_loss": float(loss), "val": res}
                 for (lr, wd), loss, res in zip(settings, losses, results, strict=True)],
        "best": best, "metrics": results[best], "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _head_state(grid: HeadGrid, h: int) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in grid.state_dict().items() if not k.startswith("heads.")}
    state.update({f"head.{k}": v for k, v in grid.heads[h].state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_run(run: str | Path, features: str | None = None,
             device: str = "cpu") -> tuple[HeadConfig, HeadGrid, Features]:
    """The best head of a run folder (as a one-head grid) and the features it evaluates on."""
    run = Path(run)
    if not (run / "head_config.json").is_file():
        raise ConfigError(f"{run}: no head_config.json; not a `dune-heads fit` run folder")
    cfg = from_dict(HeadConfig, json.loads((run / "head_config.json").read_text()))
    cfg = HeadConfig(**{**to_dict(cfg), "device": device,
                        "lrs": tuple(cfg.lrs), "weight_decays": tuple(cfg.weight_decays)})
    feats = open_features(features or cfg.features)
    trained_on = json.loads((run / "results.json").read_text())["encoder"]
    for field in ("arch", "weights", "dim"):
        if feats.info["encoder"][field] != trained_on[field]:
            raise ConfigError(
                f"{feats.path}: encoder {field} is {feats.info['encoder'][field]!r}, but the head "
                f"of {run} was trained on {trained_on[field]!r}",
                hint="evaluate on features of the same encoder (dune-heads features ...)")
    grid = build_grid(cfg, feats, 1)
    state = load_file(str(run / "head.safetensors"))
    grid.load_state_dict({(k.replace("head.", "heads.0.", 1) if k.startswith("head.") else k): v
                          for k, v in state.items()})
    return cfg, grid.to(device), feats


def evaluate_run(run: str | Path, features: str | None = None, split: str = "val",
                 device: str = "cpu") -> dict[str, Any]:
    """Metrics of a run's best head on `split` of its features (or of other `features`)."""
    cfg, grid, feats = load_run(run, features, device)
    if feats.task != grid.task:
        raise ConfigError(f"{feats.path}: {feats.task.value} features, but the head is "
                          f"{grid.task.value}")
    data = FeatureBatches(feats, split, torch.device(device), cfg.preload_gb)
    metrics = evaluate(grid, data, cfg, len(feats.classes))[0]
    result = {"run": str(Path(run).resolve()), "features": str(feats.path.resolve()),
              "split": split, "samples": len(data), "metrics": metrics}
    (Path(run) / f"eval_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
