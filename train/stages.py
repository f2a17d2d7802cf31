"""Resolution stages: `dune-train fit` runs a config's `[[stages]]` in order, in one run folder.

A config without stages is one run, exactly as before (its files at the run folder's top).
With stages, stage k trains in `out_dir/stages/NN-<name>/` (its own config.json, sizes.json,
metrics.jsonl, checkpoints/ and curves/, all written by `Trainer`), starting from the previous
stage's `checkpoints/last.pt` through `init_from`: the student (position embeddings
interpolated to the new grid) and the projectors carry over, the optimizer and the lr schedule
start afresh, as in the reference's second stage (`--pretrained`). The TeacherNorm statistics
follow the norm mode: `exact` installs the new stage's cache statistics (its grid's own);
`batch` carries the running statistics over and restarts the momentum schedule, as the reference
loads its whole model state, `teacher_norms` included.

A stage is finished when its folder holds `stage_done.json` (written after its last step).
Rerunning the same command skips finished stages and resumes the current one from its
`last.pt`, so a kill in any stage resumes exactly where it stopped. The run folder's
`stages.json` keeps the whole config (a rerun with another one is refused, naming the field),
and its `metrics.jsonl` and `curves/` merge every stage on one step axis (rewritten at the end
of each `fit`; each row also names its `stage` and `stage_step`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from train.checkpoint import LAST, STAGES_FILE, checkpoint_dir
from train.config import TrainConfig
from train.curves import draw_loss_curves
from train.metrics import METRICS_FILE, read_metrics
from train.run_folder import check_same_config
from train.trainer import Trainer

#: The run's whole config and its stages' folders (the run folder of a staged run).
#: Written into a stage's folder once its last step is done.
STAGE_DONE_FILE = "stage_done.json"


def fit_run(cfg: TrainConfig, *, progress: str = "bar") -> dict[str, Any]:
    """Train every stage of `cfg` in order (resuming a stopped run) and return the summary of
    the last stage that ran, its `rows` replaced by the merged metrics of all stages."""
    if not cfg.stages:
        trainer = Trainer(cfg, progress=progress)
        return dict(trainer.fit(), rank=trainer.dist.rank)
    run_dir = Path(cfg.out_dir)
    configs = cfg.stage_configs()
    summary: dict[str, Any] = {}
    steps_before, unfinished = 0, 0
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the Trainer joins the group later
    if rank == 0:
        _check_or_write_stages(run_dir, cfg, configs)
    for k, stage_cfg in enumerate(configs):
        stage_dir = Path(stage_cfg.out_dir)
        done = _read_done(stage_dir)
        if done is not None:
            steps_before += done
            continue
        remaining = None if cfg.max_steps is None else cfg.max_steps - steps_before
        if remaining is not None and remaining <= 0:
            break
        if k > 0:
            previous = Path(configs[k - 1].out_dir)
            stage_cfg = dataclasses.replace(
                stage_cfg, init_from=str(checkpoint_dir(previous) / LAST)
            )
        stage_cfg = dataclasses.replace(stage_cfg, max_steps=remaining)
        trainer = Trainer(stage_cfg, progress=progress)
        if rank == 0 and progress != "off":
            print(f"stage {k + 1}/{len(configs)}: {cfg.stages[k].name} -> {stage_dir}",
                  flush=True)
        summary = trainer.fit()
        if trainer.step < trainer.total_steps:
            unfinished = trainer.step
            break  # stopped by max_steps: the next command continues this stage
        if rank == 0:
            (stage_dir / STAGE_DONE_FILE).write_text(
                json.dumps({"steps": trainer.step}) + "\n"
            )
        steps_before += trainer.step
    if not summary:  # every stage was done already, or max_steps stopped before this one
        summary = {"run_dir": str(run_dir), "step": 0, "resumed_from": None,
                   "images_per_s": 0.0, "teachers": [], "rows": []}
    if rank == 0:
        rows = merge_stage_metrics(run_dir, [Path(c.out_dir) for c in configs],
                                   [s.name for s in cfg.stages])
        teachers = sorted({k.removeprefix("loss/") for r in rows for k in r
                           if k.startswith("loss/")})
        draw_loss_curves(rows, teachers, run_dir / "curves")
        summary = dict(summary, rows=rows, teachers=teachers or summary["teachers"],
                       run_dir=str(run_dir), step=steps_before + unfinished)
    return dict(summary, rank=rank)


def merge_stage_metrics(run_dir: Path, stage_dirs: list[Path], names: list[str]
                        ) -> list[dict[str, Any]]:
    """Every stage's metrics rows on one step axis (`step` counts from the run's start;
    `stage` and `stage_step` say where a row came from); written to `run_dir/metrics.jsonl`."""
    merged: list[dict[str, Any]] = []
    offset = 0
    for stage_dir, name in zip(stage_dirs, names, strict=True):
        if not (stage_dir / METRICS_FILE).is_file():
            break
        rows = read_metrics(stage_dir)
        for row in rows:
            merged.append({**row, "step": offset + row["step"], "stage": name,
                           "stage_step": row["step"]})
        done = _read_done(stage_dir)
        if done is None:
            break
        offset += done
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (METRICS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
    tmp.replace(run_dir / METRICS_FILE)
    return merged


def _read_done(stage_dir: Path) -> int | None:
    """The steps of a finished stage, None while it is not finished."""
    path = stage_dir / STAGE_DONE_FILE
    return int(json.loads(path.read_text())["steps"]) if path.is_file() else None


def _check_or_write_stages(run_dir: Path, cfg: TrainConfig, configs: list[TrainConfig]) -> None:
    """Refuse a rerun with another staged config; else record it (with each stage's folder)."""
    path = run_dir / STAGES_FILE
    if path.is_file():
        check_same_config(run_dir, json.loads(path.read_text()).get("config", {}), cfg,
                          what="staged run")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": cfg.to_dict(),
              "stages": [{"name": s.name, "dir": c.out_dir}
                         for s, c in zip(cfg.stages, configs, strict=True)]}
    path.write_text(json.dumps(record, indent=2) + "\n")
