"""`dune-train eval RUN`: score a run's student on its held-out views against any targets.

Training scores a run only against its own cache's targets, so two runs trained from caches in
different encodings are measured with different rulers. `eval_run` puts every student on one
ruler: the run's checkpoint (last, or best) on the run's held-out views, against

- the targets of any cache that holds those views (`cache`): the same images, the same views of
  them and the same teachers, in whatever encoding (fp16, int8, a compact one);
- the teachers run online (`online`): the teachers the run's cache manifest describes, rebuilt
  and checked as `train.targets.OnlineTargets` does;
- the run's own cache (neither).

Nothing is re-implemented: the data, the held-out split, the targets and the pre-flight are
`train.run_data.open_run_data` with the run's own config pointed at the target cache; the
numbers are `train.evaluation.evaluate_heldout` through the run's `DistillStep`, so they are
the metrics training logs (`heldout/loss`, `heldout/loss/<t>`, `heldout/cos/<t>`). The student
keeps its own teacher-norm statistics (from its checkpoint): they are part of the trained
model, and changing them would score another function than the one trained.

A cache is accepted only when it holds the run's held-out views: the run folder records what
fixes them (`teachers.json`: `cache_fingerprint` and `heldout_views`, `train.run_folder`), and
every field in which the cache differs is named (`heldout_differences`). The result is printed
and written to `RUN/eval/<which>-<source>.json` (`eval_name`) so that runs can be compared.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_format.configfile import with_overrides
from cache_format.differences import FieldDifference
from cache_format.errors import CacheMismatchError, CheckpointError, ConfigError, DuneError
from cache_format.locations import absolute_path
from cache_format.manifest import Manifest
from cache_format.reader import open_cache
from cache_format.serde import to_dict
from train.checkpoint import BEST, checkpoint_dir, latest_stage_dir
from train.distributed import setup_distributed
from train.evaluation import evaluate_heldout
from train.export import TEACHERS_FILE, load_run_model
from train.run_data import open_run_data
from train.run_folder import HELDOUT_VIEWS, SIZES_FILE, heldout_record, read_teachers_record

#: Where `eval_run` writes its results, inside the run folder.
EVAL_DIR = "eval"


@dataclass(frozen=True)
class EvalResult:
    """One scoring of a run: which checkpoint, against what, and the held-out metrics.

    `source` is "cache" (targets decoded from `cache`) or "online" (`cache` then only supplies
    the views); `encoding` is the target cache's encoding (None online); `metrics` holds the
    keys training logs in its eval rows; `path` is the JSON file written.
    """

    run_dir: str
    checkpoint: str
    which: str
    step: int
    source: str
    cache: str
    encoding: dict[str, Any] | None
    heldout_images: int
    teachers: tuple[str, ...]
    metrics: dict[str, float]
    elapsed_s: float
    path: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what the eval file holds)."""
        return to_dict(self)


def eval_name(which: str, online: bool, location: str, encoding: str) -> str:
    """The eval file's stem: `<which>-online`, or `<which>-<cache folder>-<encoding>-<hash>`.

    The hash (6 hex digits of the location) keeps two caches with the same folder name apart.
    """
    if online:
        return f"{which}-online"
    folder = location.rstrip("/").rsplit("/", 1)[-1] or "cache"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder)[:40]
    digest = hashlib.sha256(location.encode("utf-8")).hexdigest()[:6]
    return f"{which}-{slug}-{encoding}-{digest}"


def heldout_differences(stored: dict[str, Any], manifest: Manifest
                        ) -> list[tuple[str, FieldDifference]]:
    """Every way `manifest`'s cache differs from the run's held-out views, each with what it
    means: "other views", "other held-out images", "missing teacher", "other teacher" or
    "other teacher rows". `stored` is the run's teachers.json (its `cache_fingerprint` and
    `heldout_views`). The encoding may differ: that is what a cache is compared for."""
    fp, record = stored["cache_fingerprint"], stored[HELDOUT_VIEWS]
    out: list[tuple[str, FieldDifference]] = []
    for d in manifest.differences(grid=fp["grid"], student_patch=fp["student_patch"],
                                  views_per_image=fp["views_per_image"],
                                  view_mode=record["view_mode"]):
        out.append(("other views", d))
    for d in manifest.differences(seed=record["seed"]):
        out.append(("other held-out images and views (the split and view seed)", d))
    found_views = to_dict(manifest.replay.views) if manifest.replay is not None else None
    if record["views"] is not None and found_views != record["views"]:
        for key in sorted(record["views"]):
            have = (found_views or {}).get(key, "<absent>")
            if have != record["views"][key]:
                out.append(("other views", FieldDifference(f"replay.views.{key}",
                                                           record["views"][key], have)))
    # The images: everything of a dataset fingerprint but where the build read them from.
    images = {d: {k: v for k, v in f.items() if k != "root"} for d, f in fp["datasets"].items()}
    for d in manifest.differences(datasets=images):
        out.append(("other held-out images", d))
    for d in manifest.differences(teachers=fp["teachers"]):
        out.append(("missing teacher" if d.missing_entry else "other teacher", d))
    for teacher, datasets in record["assignment"].items():
        if teacher not in manifest.teachers:
            continue  # already named as missing
        have = sorted(set(manifest.assignment.get(teacher, ())) & set(fp["datasets"]))
        if have != sorted(datasets):
            out.append(("other teacher rows", FieldDifference(f"assignment.{teacher}",
                                                              sorted(datasets), have)))
    return out


def check_heldout(stored: dict[str, Any], manifest: Manifest, location: str, run_dir: Path,
                  run_cache: str) -> None:
    """CacheMismatchError naming every difference, unless the cache holds the run's held-out
    views (`heldout_differences`)."""
    differ = heldout_differences(stored, manifest)
    if not differ:
        return
    lines = "".join(f"\n  - {what}: {d}" for what, d in differ)
    raise CacheMismatchError(
        f"{location} does not hold the held-out views of run {run_dir} (expected: the run's "
        f"cache {run_cache}; found: this cache):{lines}",
        hint=f"score against a cache of the same images, views and teachers (`dune-cache "
        f"transcode {run_cache} --encoding NAME --out NEW` derives one in another encoding), "
        "or against the teachers themselves with --online",
    )


def _run_record(stage_dir: Path, run_cache: str, teachers: list[str]) -> dict[str, Any]:
    """The run folder's teachers.json, with `heldout_views` taken from the run's cache when the
    folder was written before dune-train recorded it."""
    stored = read_teachers_record(stage_dir)
    if HELDOUT_VIEWS in stored:
        return stored
    datasets = list(stored["cache_fingerprint"]["datasets"])
    try:
        with open_cache(run_cache) as reader:
            stored[HELDOUT_VIEWS] = heldout_record(reader.manifest, teachers, datasets)
    except DuneError as exc:
        raise CheckpointError(
            f"{stage_dir / TEACHERS_FILE}: no {HELDOUT_VIEWS!r} record (the run predates it) "
            f"and the run's cache cannot be opened to read it: {exc}",
            hint=f"restore the run's cache at {run_cache}; it says which views were held out",
        ) from None
    return stored


def eval_run(run_dir: str | Path, *, cache: str | None = None, online: bool = False,
             which: str = "last") -> EvalResult:
    """Score run `run_dir`'s `which` checkpoint ("last" or "best") on its held-out views against
    `cache`'s targets, the online teachers (`online`) or its own cache; write and return it."""
    if cache and online:
        raise ConfigError("--cache and --online: pick one target source",
                          hint="--online scores against the teachers of the run's own cache")
    if which not in ("last", "best"):
        raise ConfigError(f"--which: expected last or best, found {which!r}")
    run = Path(run_dir)
    stage = latest_stage_dir(run)  # a staged run: its latest stage's folder
    if which == "best" and not (checkpoint_dir(stage) / BEST).is_file():
        raise CheckpointError(
            f"{checkpoint_dir(stage)}: no {BEST} (the run has kept no best checkpoint yet: it "
            "needs a held-out evaluation after step 0)",
            hint="score the last checkpoint: --which last",
        )
    cfg, model, payload, ckpt_path = load_run_model(run, which)
    if cfg.data.heldout_images == 0:
        raise ConfigError(f"{run}: data.heldout_images = 0, so the run holds out no images to "
                          "score", hint="train with data.heldout_images > 0")
    teachers = list(model.teachers)
    stored = _run_record(stage, cfg.data.cache, teachers)
    datasets = list(stored["cache_fingerprint"]["datasets"])
    target = absolute_path(cache) if cache else cfg.data.cache  # the config's is absolute
    with open_cache(target) as reader:
        check_heldout(stored, reader.manifest, reader.location, run, cfg.data.cache)
        encoding = reader.manifest.encoding
    # The run's own config, pointed at the target: the same selection, split and targets.
    eval_cfg = with_overrides(cfg, {"data.cache": target, "online": online,
                                    "data.teachers": teachers, "data.datasets": datasets})
    dist_info = setup_distributed(eval_cfg)
    if dist_info.world_size > 1:
        raise ConfigError("dune-train eval runs in one process; launch it without torchrun")
    sizes_file = stage / SIZES_FILE
    batch = (json.loads(sizes_file.read_text())["batch_size_per_device"]
             if sizes_file.is_file() else cfg.global_batch(1))
    ctx = open_run_data(eval_cfg, dist_info)
    try:
        model.to(dist_info.device)
        step = ctx.distill_step(model, dist_info.device, amp=cfg.amp)
        began = time.perf_counter()
        metrics = evaluate_heldout(step, ctx.heldout_data, batch_size=batch,
                                   collate=ctx.collate, at_step=int(payload.get("step", 0)))
    finally:  # a non-finite value stops the scoring: the cache is still closed
        ctx.reader.close()
    path = run / EVAL_DIR / f"{eval_name(which, online, target, encoding.name)}.json"
    result = EvalResult(
        run_dir=str(run), checkpoint=str(ckpt_path), which=which,
        step=int(payload.get("step", 0)), source="online" if online else "cache",
        cache=target, encoding=None if online else to_dict(encoding),
        heldout_images=cfg.data.heldout_images, teachers=tuple(ctx.heads), metrics=metrics,
        elapsed_s=time.perf_counter() - began, path=str(path),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
