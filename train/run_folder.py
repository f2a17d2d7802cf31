"""The run folder's own files, and the check that a rerun continues the same run.

`write_run_files` records the resolved config (`config.json`) and the heads, domains, the
cache's fingerprint and what fixes the held-out views (`teachers.json`; `dune-train eval` checks
another cache against it, `heldout_record`). `check_resume` compares a rerun with both before
it resumes from `checkpoints/last.pt`: a different run never silently continues another one's
checkpoint; `resume_differences` names the config fields that differ, leaving out the ones a
rerun may change (`RESUME_FREE_FIELDS`). The cache side of that comparison is the manifest's
own (`Manifest.differences`), so the error names every field in which the cache differs from
the one the run started on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cache_format.errors import CacheMismatchError, CheckpointError, ConfigError
from cache_format.manifest import Manifest
from cache_format.serde import to_dict
from train.config import TrainConfig
from train.export import CONFIG_FILE, RUN_FOLDER_HINT, TEACHERS_FILE
from train.run_data import RunContext

# Fields a rerun may change without breaking exact resume: where to stop, how often to log, and
# where things live (moved runs and caches still resume; the cache's fingerprint is checked).
RESUME_FREE_FIELDS = (
    "max_steps",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "out_dir",
    "data.cache",
    "data.num_workers",
    "data.roots",
    "data.shard_cache_dir",
    "data.shard_cache_bytes",
    "data.prefetch_shards",
    # A check, not a setting of the run: turning it off is the documented way on after a
    # refusal, and run folders from before the field have no value for it.
    "data.check_source_fingerprints",
    "stages[].cache",
    "logging",
)

#: The manifest fields a run depends on beside its teachers' and datasets' fingerprints.
_FINGERPRINT_FIELDS = ("grid", "student_patch", "views_per_image", "encoding")


def cache_fingerprint(manifest: Manifest, teachers: list[str], datasets: list[str]
                      ) -> dict[str, Any]:
    """The part of a cache's manifest a run depends on (recorded in the run folder)."""
    return {
        **{name: to_dict(getattr(manifest, name)) for name in _FINGERPRINT_FIELDS},
        "teachers": {t: to_dict(manifest.teachers[t]) for t in teachers},
        "datasets": {d: to_dict(manifest.datasets[d]) for d in datasets},
    }


#: The batch and epoch sizes the run resolved at start (world size, both batches, images).
SIZES_FILE = "sizes.json"
#: teachers.json's key for `heldout_record`.
HELDOUT_VIEWS = "heldout_views"


def write_run_files(
    run_dir: Path, cfg: TrainConfig, ctx: RunContext, sizes: dict[str, int] | None = None
) -> None:
    """config.json (the resolved config), teachers.json (heads + cache fingerprint) and
    sizes.json (`sizes`: both batch values, images per epoch and per run, as resolved now)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if sizes is not None:
        (run_dir / SIZES_FILE).write_text(json.dumps(sizes, indent=2) + "\n")
    teachers = {
        "heads": {n: {"dim": h.dim, "has_cls": h.has_cls} for n, h in ctx.heads.items()},
        "domains": ctx.domains,
        "cache": cfg.data.cache,
        "cache_fingerprint": cache_fingerprint(ctx.manifest, list(ctx.heads),
                                               list(ctx.datasets)),
        HELDOUT_VIEWS: heldout_record(ctx.manifest, list(ctx.heads), list(ctx.datasets)),
    }
    (run_dir / TEACHERS_FILE).write_text(json.dumps(teachers, indent=2) + "\n")


def heldout_record(manifest: Manifest, teachers: list[str], datasets: list[str]
                   ) -> dict[str, Any]:
    """What fixes a run's held-out views beside `cache_fingerprint`: the split and view seed,
    the view settings and which selected datasets each teacher has features for. With the
    fingerprint's grid, views per image and dataset keys, equal records mean the same held-out
    images, the same views of them and the same teacher rows (`train.run_eval`)."""
    views = manifest.replay.views if manifest.replay is not None else None
    return {
        "seed": manifest.seed,
        "view_mode": manifest.view_mode,
        "views": to_dict(views) if views is not None else None,
        "assignment": {t: sorted(set(manifest.assignment.get(t, ())) & set(datasets))
                       for t in teachers},
    }


def read_teachers_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's teachers.json, its `cache_fingerprint` checked to hold the fields this
    version writes (the resume check and `dune-train eval` read it through here)."""
    teachers_file = run_dir / TEACHERS_FILE
    if not teachers_file.is_file():
        raise CheckpointError(f"{run_dir}: no {TEACHERS_FILE}; this is not a dune-train run folder",
                              hint=RUN_FOLDER_HINT)
    record = json.loads(teachers_file.read_text())
    stored = record.get("cache_fingerprint") if isinstance(record, dict) else None
    fields = (*_FINGERPRINT_FIELDS, "teachers", "datasets")
    if not isinstance(stored, dict) or set(stored) != set(fields):
        raise CheckpointError(
            f"{teachers_file}: cache_fingerprint: expected the fields {list(fields)}, "
            f"found {sorted(stored) if isinstance(stored, dict) else stored!r}",
            hint="this folder was written by another dune-train version; pass a new --out",
        )
    return record


def check_resume(run_dir: Path, cfg: TrainConfig, ctx: RunContext) -> None:
    """Refuse to resume a run folder written by a different config or cache."""
    config_file, teachers_file = run_dir / CONFIG_FILE, run_dir / TEACHERS_FILE
    if not config_file.is_file() or not teachers_file.is_file():
        raise CheckpointError(
            f"{run_dir}: has a checkpoint but no {CONFIG_FILE} / {TEACHERS_FILE}",
            hint="this folder was not written by dune-train fit; pick another --out",
        )
    check_same_config(run_dir, json.loads(config_file.read_text()), cfg, what="run")
    stored = read_teachers_record(run_dir)["cache_fingerprint"]
    differ = ctx.manifest.differences(**stored)
    if differ:
        raise CacheMismatchError(
            f"{run_dir}: the run there trained on a cache with other contents than "
            f"{cfg.data.cache}: " + "; ".join(str(d) for d in differ),
            hint="resume with the cache the run started with, or pass a new --out",
        )


def check_same_config(run_dir: Path, stored: dict[str, Any], cfg: TrainConfig, *,
                      what: str) -> None:
    """Refuse to continue a run folder whose recorded config differs from `cfg` in a field
    that changes the trajectory (the one rule for runs and staged runs)."""
    diffs = resume_differences(stored, cfg.to_dict())
    if diffs:
        raise ConfigError(
            f"{run_dir}: the {what} there used another config; differing fields: "
            + "; ".join(diffs[:8]),
            hint="rerun with the same config (only max_steps, intervals, paths may change), "
            "or pass a new --out to start a new run",
        )


def resume_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of the fields that differ between a stored and a current config dict,
    leaving out `RESUME_FREE_FIELDS` (which a rerun may change)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if re.sub(r"\[\d+\]", "[]", prefix) in RESUME_FREE_FIELDS:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{prefix}[{i}]")
        elif a != b:
            diffs.append(f"{prefix} (stored {a!r}, now {b!r})")

    walk(stored, current, "")
    return diffs
