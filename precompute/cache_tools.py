"""What `dune-cache info`, `verify` and `ls` do: describe, check and find caches.

- `cache_info(path)`: the manifest, sizes per (dataset, teacher), statuses, completeness, as a
  JSON-ready dict (the `--json` output; the tables print the same facts).
- `verify_cache(path, recompute=N)`: `CacheReader.verify` (every chunk, metadata included,
  checksums and counts; see cache_format/verify.py) and, with `recompute`, re-runs
  each teacher on N random cached views and compares fresh and cached tokens per token (cosine),
  against the encoding's fidelity floor. Any problem makes the report fail.
- `redo_damaged(path)`: what `dune-cache build --redo-damaged` does first: verify, then mark
  every damaged shard as never written, so that the build recomputes exactly those.
- `skipped_images(path)`: every image skipped by the build, with its reason (`ls --skipped`).
- `find_caches(folder)`: every cache under a folder, one summary each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cache_format import locate, out_of_range
from cache_format.completeness import completeness
from cache_format.errors import CacheCorruptionError
from cache_format.files import tree_nbytes
from cache_format.manifest import STATUS_OK, status_name
from cache_format.reader import CacheReader, open_cache
from cache_format.serde import to_dict
from cache_format.writer import CacheWriter

if TYPE_CHECKING:  # the builder's config is imported when --recompute runs
    from precompute.config import CacheBuildConfig

#: Per-token cosine (fresh vs cached, 1st percentile) each encoding must keep. int8 is the
#: format's tested floor; fp16 / bf16 lose far less, the floor leaves room for a rerun on
#: another device (bf16 autocast on a GPU against a CPU build). int4 / int4h: 4 bits lose more
#: (1st percentile 0.93-0.99 on the activations of docs/encodings.md); the floor catches a
#: broken cache, not the encoding's own loss.
FIDELITY_FLOORS: dict[str, float] = {"int8": 0.9995, "fp16": 0.999, "bf16": 0.999,
                                    "int4": 0.9, "int4h": 0.9}


def _pair_facts(reader: CacheReader, dataset: str, teacher: str, nbytes: int) -> dict[str, Any]:
    """One pair's line of `info`: its metadata (the consolidated summary of a complete pair),
    plus one existence check (a stat) per done shard's file, so that a lost file is never
    shown as complete; `verify` is what reads everything."""
    done = reader.pair_done(dataset, teacher)
    complete = reader.pair_complete(dataset, teacher)
    lost = reader.lost_shard_files(dataset, teacher) if reader.index_complete(dataset) else []
    return {
        "teacher": teacher, "dataset": dataset, "shards_done": int(done.sum()),
        "shards": int(done.size), "stats_final": reader.stats_final(dataset, teacher),
        "bytes": nbytes, "lost_shard_files": lost, "complete": complete and not lost,
        "out_of_range": out_of_range.fractions(reader, dataset, teacher),
    }


def cache_info(path: str) -> dict[str, Any]:
    """Everything `dune-cache info` shows, as a JSON-ready dict."""
    with open_cache(path) as reader:
        m = reader.manifest
        datasets = []
        for name, fp in m.datasets.items():
            counts = reader.status_counts(name)
            statuses = {status_name(c): n for c, n in sorted(counts.items())}
            index_done = reader.index_done(name)
            datasets.append({
                **to_dict(fp), "samples": reader.num_samples(name), "statuses": statuses,
                "index_shards_done": int(index_done.sum()), "index_shards": int(index_done.size),
                "index_complete": bool(index_done.all()),
            })
        total, pair_bytes = reader.nbytes_by_pair()  # one walk of the folder, not one per pair
        pairs = [_pair_facts(reader, d, t, pair_bytes[d, t])
                 for t, names in m.assignment.items() for d in names]
        found = completeness(reader)  # against what was planned, not what happens to be there
        return {
            "path": reader.location,
            "format_version": m.format_version,
            "grid": list(m.grid),
            "student_patch": m.student_patch,
            "views_per_image": m.views_per_image,
            "view_mode": m.view_mode,
            "seed": m.seed,
            "samples_per_shard": m.samples_per_shard,
            "encoding": to_dict(m.encoding),
            "teachers": [to_dict(fp) for fp in m.teachers.values()],
            "datasets": datasets,
            "pairs": pairs,
            "bytes": total,
            "complete": all(p["complete"] for p in pairs)
            and all(d["index_complete"] for d in datasets) and found.complete,
            "missing": list(found.incomplete) + [
                f"{p['dataset']}/{p['teacher']}: shard file(s) lost: {p['lost_shard_files']}"
                for p in pairs if p["lost_shard_files"]],
            "damaged": list(found.damaged),
        }


@dataclass
class VerifyResult:
    """What `verify_cache` found; `ok` is False on any problem."""

    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_shards: list[tuple[str, str, int]] = field(default_factory=list)
    recompute: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage, nothing missing, counts right, fidelity above the floor."""
        return not self.problems


def _recompute(reader: CacheReader, n: int, result: VerifyResult, seed: int,
               trust: bool = False, own: CacheBuildConfig | None = None) -> None:
    """Re-run each teacher on n random ok samples (spread over its datasets) and compare.

    Teachers whose kind runs user code are rebuilt only when trusted or defined in `own`, the
    user's build config (precompute/teachers/trust.py); `own`'s definition is then the one used.
    """
    from precompute.config import CacheBuildConfig
    from precompute.sources import open_source
    from precompute.teachers.loaded import load_teacher
    from precompute.teachers.trust import check_cache_teachers
    from precompute.units import UnitSettings, compute_tokens

    m = reader.manifest
    if not m.build_config:
        result.problems.append("--recompute: the manifest has no build_config, so the teachers "
                               "and images are unknown")
        return
    config = CacheBuildConfig.from_dict(m.build_config)
    mine = {t.name: t for t in own.teachers} if own is not None else {}
    check_cache_teachers([t for t in config.teachers if t.name in reader.teachers],
                         f"{reader.location}: --recompute", trust=trust, own=mine)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = UnitSettings(config, device, torch.get_num_threads())
    floor = FIDELITY_FLOORS[m.encoding.name]
    rng = np.random.default_rng(seed)
    sources = {}
    for teacher in reader.teachers:
        cfg = mine.get(teacher) or next((t for t in config.teachers if t.name == teacher), None)
        if cfg is None:
            result.problems.append(f"--recompute: teacher {teacher} is not in the stored "
                                   "build config")
            continue
        model = load_teacher(cfg, device)
        if model.checkpoint_sha256 != m.teachers[teacher].checkpoint_sha256:
            result.problems.append(
                f"--recompute: teacher {teacher}: its weights now hash to "
                f"{model.checkpoint_sha256}, the cache was built with "
                f"{m.teachers[teacher].checkpoint_sha256}")
            continue
        cosines: list[np.ndarray] = []
        for dataset in reader.datasets_for(teacher):
            index = reader.index(dataset)
            ok = np.nonzero(index.ok)[0]
            share = min(len(ok), -(-n // len(reader.datasets_for(teacher))))
            if share == 0:
                continue
            chosen = np.sort(rng.choice(ok, size=share, replace=False))
            if dataset not in sources:
                dcfg = config.dataset(dataset)
                sources[dataset] = open_source(dcfg, config.build.max_pixels,
                                               config.build.unusual_modes)
            fresh = compute_tokens(settings, model, sources[dataset], chosen.tolist(),
                                   index.view_params_of(chosen))
            cached = reader.read_encoded(dataset, chosen, [teacher])[teacher]
            for tok, values in fresh.items():
                a = torch.from_numpy(values).reshape(-1, values.shape[-1])
                b = cached[tok].decode().reshape(-1, values.shape[-1])
                cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy())
        if not cosines:
            continue
        cos = np.concatenate(cosines)
        entry = {"teacher": teacher, "tokens": int(cos.size), "mean": float(cos.mean()),
                 "p01": float(np.percentile(cos, 1)), "min": float(cos.min()), "floor": floor}
        result.recompute.append(entry)
        if entry["p01"] < floor:
            result.problems.append(
                f"--recompute: teacher {teacher}: 1st-percentile cosine fresh vs cached "
                f"{entry['p01']:.6f} is below the {m.encoding.name} floor {floor}")


def verify_cache(path: str, recompute: int = 0, seed: int = 0, *, trust: bool = False,
                 own: CacheBuildConfig | None = None) -> VerifyResult:
    """Check a cache (see the module docstring); never raises for problems found in the data.

    `trust` / `own`: see `_recompute` (a cache's `factory:` teachers are never run unasked).
    """
    result = VerifyResult()
    with open_cache(path) as reader:
        report = reader.verify()
        result.shards_checked = report.shards_checked
        result.damaged_shards = list(report.damaged_shards)
        result.problems.extend(report.problems)
        result.problems.extend(f"missing: {m}" for m in report.missing)
        result.problems.extend(report.incomplete)
        if recompute > 0:
            _recompute(reader, recompute, result, seed, trust, own)
    return result


def _summary_line(path: str, manifest: dict[str, Any]) -> dict[str, Any]:
    datasets = manifest.get("datasets", {})
    views = manifest.get("views_per_image", 1)
    return {
        "path": path,
        "bytes": tree_nbytes(path),
        "grid": manifest.get("grid"),
        "encoding": manifest.get("encoding", {}).get("name"),
        "teachers": sorted(manifest.get("teachers", {})),
        "datasets": sorted(datasets),
        "samples": sum(d.get("num_images", 0) * views for d in datasets.values()),
    }


def find_caches(folder: str) -> list[dict[str, Any]]:
    """Every cache under `folder` (not looking inside caches), sorted by path."""
    return [_summary_line(path, manifest) for path, manifest in locate.find_caches(folder)]


def redo_damaged(path: str) -> list[str]:
    """Verify the cache, then mark every damaged shard (index or tokens) as never written, so
    that the build that follows recomputes exactly those; returns what was marked. Damage that
    no shard recompute repairs (the manifest, a zarr.json, keys, calibration) is refused in one
    CacheCorruptionError naming it, before anything is changed."""
    with open_cache(path) as reader:
        report = reader.verify()
    unexplained = [p for p in report.problems if any(w in p for w in _NOT_SHARDS) or not any(
        _names_shard(p, d, t, s) for d, t, s in report.damaged_shards)]
    if unexplained:
        raise CacheCorruptionError(
            f"{path}: damage that recomputing shards cannot repair: " + "; ".join(unexplained[:3])
            + (f" (and {len(unexplained) - 3} more)" if len(unexplained) > 3 else ""),
            hint="restore the cache from a copy, or rebuild it into a new --cache path")
    writer = CacheWriter.open(path)
    done = []
    for dataset, teacher, shard in report.damaged_shards:
        if shard < 0:  # verify.SUMMARY_ONLY
            writer.forget_summary(dataset, teacher)
            done.append(f"{dataset}/{teacher} summary" if teacher else f"{dataset} summary")
        elif teacher:
            writer.forget_shard(dataset, teacher, shard)
            done.append(f"{dataset}/{teacher} token shard {shard}")
        else:
            writer.forget_index_shard(dataset, shard)
            done.append(f"{dataset} index shard {shard}")
    return done


#: Words of verify problems about parts that no shard recompute rewrites.
_NOT_SHARDS = ("key_utf8", "key_offsets", "keys_sha256", "_calib_", "zarr.json", "manifest")


def _names_shard(problem: str, dataset: str, teacher: str, shard: int) -> bool:
    """Whether a verify problem is about that shard (its pair or dataset is named in it)."""
    names = (f"{dataset}/{teacher}", f"'{dataset}', teacher '{teacher}'") if teacher else (
        f"dataset '{dataset}'", f"dataset {dataset} ")
    return any(n in problem for n in names)


def skipped_images(path: str) -> list[dict[str, Any]]:
    """Every image with a view that the build skipped: dataset, image index, key, reason."""
    out = []
    with open_cache(path) as reader:
        for dataset in reader.datasets:
            index = reader.index(dataset)
            status = index.status.reshape(-1, reader.manifest.views_per_image)
            bad = np.flatnonzero((status != STATUS_OK).any(axis=1))
            if not bad.size:
                continue
            for image, key in zip(bad.tolist(), index.keys_of(bad), strict=True):
                codes = [c for c in status[image].tolist() if c != STATUS_OK]
                out.append({"dataset": dataset, "image": image, "key": key,
                            "reason": status_name(codes[0])})
    return out
