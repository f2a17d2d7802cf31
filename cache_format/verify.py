"""`CacheReader.verify`: read every chunk of a cache and check that its metadata agrees with it.

One check, used by the reader and the CLI (`dune-cache verify`):
- every chunk of every index array, metadata included (sample_index.SampleIndex.verify: also
  each written index shard's statuses against its metadata row, the consolidated statuses and
  summary against the rows);
- every chunk of every pair's metadata and calibration arrays, and every record of every written
  token shard (checksums);
- absence against the metadata: a written shard whose ok-sample count is not the number of
  records its file stores (a shard file written and then lost reads as 0 stored), or differs
  from the dataset's ok statuses in that shard;
- counts: merged statistics count = ok samples (x tokens per sample for patch tokens), no
  sample pending in a complete index.
Token shards never written are listed as `missing`, index shards and statistics never written
as `incomplete` (a build to resume), not as damage.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import zarr
import zarr.storage

from cache_format import layout, out_of_range, shards
from cache_format.completeness import completeness
from cache_format.errors import REPAIR_DAMAGED as REPAIR
from cache_format.errors import CacheCorruptionError, CacheVersionError
from cache_format.manifest import (
    MANIFEST_SHA_ATTR,
    ROOT_ATTR,
    STATUS_OK,
    STATUS_PENDING,
    keys_sha256,
)
from cache_format.records import VerifyReport

if TYPE_CHECKING:
    from cache_format.reader import CacheReader
    from cache_format.sample_index import SampleIndex



#: `VerifyReport.damaged_shards`' shard number for "only the summary is damaged": merging the
#: shards' rows again (a dataset: consolidating its statuses again) repairs it.
SUMMARY_ONLY = -1


def verify_cache(reader: CacheReader) -> VerifyReport:
    """Check `reader`'s cache (see the module docstring); never raises for damage found."""
    problems: list[str] = []
    missing: list[str] = []
    incomplete: list[str] = []
    checked = 0
    damaged: list[tuple[str, str, int]] = []
    problems.extend(_verify_metadata(reader))
    if problems:  # arrays whose zarr metadata is damaged cannot be read as what they claim
        return VerifyReport(0, tuple(problems), (), ())
    for dataset in reader.datasets:
        status, index_done = _verify_index(reader, dataset, problems, incomplete, damaged)
        for teacher in reader.teachers_for(dataset):
            checked += _verify_pair(reader, dataset, teacher, status, index_done, problems,
                                    missing, incomplete, damaged)
    found = completeness(reader)
    problems.extend(p for p in found.damaged if p not in problems)
    reported = " ".join([*missing, *incomplete])
    incomplete.extend(p for p in found.incomplete if p.split(":")[0] not in reported)
    return VerifyReport(checked, tuple(problems), tuple(missing), tuple(incomplete),
                        tuple(dict.fromkeys(damaged)))


def _reference_metadata(reader: CacheReader) -> dict[str, dict]:
    """{path: zarr metadata} of the cache's groups and arrays as this code creates them for its
    manifest (built in memory, remembered per manifest: a fuzz run verifies one cache often)."""
    m = reader.manifest
    key_bytes = tuple(
        int(reader._group[f"{layout.dataset_path(d)}/{layout.KEY_UTF8}"].shape[0])
        for d in m.datasets)
    cache_key = (json.dumps(m.to_dict(), sort_keys=True), key_bytes)
    hit = _REFERENCES.get(cache_key)
    if hit is not None:
        return hit
    root = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    for (dataset, fp), nbytes in zip(m.datasets.items(), key_bytes, strict=True):
        group = root.require_group(layout.dataset_path(dataset))
        layout.create_index_arrays(group, nbytes, fp.num_images, m.views_per_image,
                                   m.samples_per_shard, len(m.view_param_names),
                                   len(m.status_codes),
                                   fingerprinted=bool(fp.source_fingerprint))
    for teacher, datasets in m.assignment.items():
        fp = m.teachers[teacher]
        for dataset in datasets:
            group = root.require_group(layout.teacher_path(dataset, teacher))
            layout.create_teacher_arrays(group, m.encoding, reader.num_samples(dataset),
                                         m.num_tokens, fp.dim, fp.token_types,
                                         m.samples_per_shard)
    store = root.store._store_dict  # type: ignore[attr-defined]
    found = {key[: -len("zarr.json")].rstrip("/"): json.loads(value.to_bytes())
             for key, value in store.items() if key.endswith("zarr.json")}
    if len(_REFERENCES) >= 8:
        _REFERENCES.clear()
    _REFERENCES[cache_key] = found
    return found


_REFERENCES: dict[tuple[str, tuple[int, ...]], dict[str, dict]] = {}


def _verify_metadata(reader: CacheReader) -> list[str]:
    """Every group's and array's zarr metadata (zarr.json) against what this code writes for
    the manifest: a damaged or edited zarr.json changes how its chunks are read, so it is
    damage even when every chunk's checksum holds. Format version 2 only."""
    if reader.manifest.format_version != 2:
        return []
    try:
        reference = _reference_metadata(reader)
    except Exception as exc:  # zarr's parser fails in many ways on a damaged zarr.json
        return [f"{reader.location}: zarr metadata unreadable ({type(exc).__name__}: {exc})"]
    problems = []
    files = reader._fast.files
    for path, expected in reference.items():
        name = f"{path}/zarr.json" if path else "zarr.json"
        try:
            raw = files.read_all(name)
            found = None if raw is None else json.loads(raw)
        except ValueError as exc:
            problems.append(f"{reader.location}: {name} does not parse ({exc})")
            continue
        if found is None:
            problems.append(f"{reader.location}: {name} is missing")
            continue
        if not path:  # the root: the manifest is checked by its checksum, on open
            attrs = found.pop("attributes", {})
            expected = {k: v for k, v in expected.items() if k != "attributes"}
            extra = sorted(set(attrs) - {ROOT_ATTR, MANIFEST_SHA_ATTR})
            if extra:
                problems.append(f"{reader.location}: zarr.json: unexpected root attributes "
                                f"{extra}")
            if MANIFEST_SHA_ATTR not in attrs:
                problems.append(f"{reader.location}: zarr.json has no manifest checksum "
                                f"({MANIFEST_SHA_ATTR}), so an edit of the manifest cannot be "
                                "told from the build's (caches built before checksums: "
                                "`dune-cache upgrade CACHE` adds it)")
        if found != expected:
            problems.append(f"{reader.location}: {name} differs from the zarr metadata this "
                            "cache's manifest implies (edited or damaged)")
    return problems


def _verify_index(reader: CacheReader, dataset: str, problems: list[str],
                  missing: list[str], damaged: list[tuple[str, str, int]]
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Check a dataset's index; its statuses and index done marks (None when they cannot be
    read). Index shards found damaged go to `damaged` as (dataset, "", shard)."""
    try:
        index = reader.index(dataset)
        found = index.verify()
        problems.extend(found)
        if found:  # the shards to redo; else only the consolidation (summary, statuses)
            shards_ = _damaged_index_shards(index)
            if not shards_ and all("summary" in p or "statuses" in p for p in found):
                shards_ = [SUMMARY_ONLY]
            damaged.extend((dataset, "", s) for s in shards_)
            return None, None
        done = reader.index_done(dataset)
        status = index.status
        if keys_sha256(index.keys.tolist()) != reader.manifest.datasets[dataset].keys_sha256:
            problems.append(f"dataset {dataset}: the stored keys do not hash to the manifest's "
                            "keys_sha256 (key_utf8 / key_offsets edited or damaged)")
            return None, None
    except (CacheCorruptionError, CacheVersionError, ValueError) as exc:
        problems.append(f"dataset {dataset} index: {exc}")
        return None, None
    if not done.all():
        missing.append(f"{dataset}: {int((~done).sum())} index shard(s) never written "
                       "(resume the build)")
    else:
        pending = int((status == STATUS_PENDING).sum())
        if pending:
            problems.append(f"{dataset}: {pending} sample(s) still pending in a complete index")
    return status, done


def _damaged_index_shards(index: SampleIndex) -> list[int]:
    """Index shards whose rows or metadata row cannot be read, or disagree (to redo)."""
    rows, meta_array = index._arrays[layout.INDEX_ROWS], index._arrays[layout.INDEX_META]
    out = []
    for shard in range(rows.num_chunks):
        try:
            block = index._read_chunk(rows, shard)[0]
            meta = index._read_chunk(meta_array, shard)[0][0]
        except CacheCorruptionError:
            out.append(shard)
            continue
        start, stop = shards.shard_bounds(shard, index.num_samples, rows.rows_per_chunk)
        if meta[0] and not np.array_equal(
                meta, layout.index_meta_row(block[: stop - start, -1], meta.size - 1)):
            out.append(shard)
    return out


def _verify_pair(reader: CacheReader, dataset: str, teacher: str, status: np.ndarray | None,
                 index_done: np.ndarray | None, problems: list[str], missing: list[str],
                 incomplete: list[str], damaged: list[tuple[str, str, int]]) -> int:
    """Check one pair; the number of token shards read. Token shards found damaged go to
    `damaged` as (dataset, teacher, shard)."""
    label = f"{dataset}/{teacher}"
    try:
        meta = reader.pair_meta(dataset, teacher)
        found = meta.verify()
        problems.extend(found)
        if found:
            before = len(damaged)
            for shard in range(reader.num_shards(dataset)):
                try:
                    meta.done_mark(shard)
                except CacheCorruptionError:
                    damaged.append((dataset, teacher, shard))
            if len(damaged) == before:  # the rows hold: is it the summary (or calibration)?
                try:
                    meta.summary()
                except CacheCorruptionError:
                    damaged.append((dataset, teacher, SUMMARY_ONLY))
            return 0
        rows = meta.rows()
        records = reader._records(dataset, teacher)[0]
    except (CacheCorruptionError, CacheVersionError) as exc:
        problems.append(str(exc))
        return 0
    n, sps = reader.num_samples(dataset), reader.manifest.samples_per_shard
    checked = 0
    for shard in range(reader.num_shards(dataset)):
        start, stop = shards.shard_bounds(shard, n, sps)
        if int(rows[shard, 0]) != layout.MARK_DONE:
            missing.append(f"{label} shard {shard}")
            continue
        checked += 1
        ok = int(rows[shard, 1])
        try:
            reader._fast.read_shard(records, shard, stop - start)
            stored = reader._fast.stored_samples(records, shard)
        except CacheCorruptionError as exc:
            problems.append(str(exc))
            damaged.append((dataset, teacher, shard))
            continue
        indexed = status is not None and index_done is not None and index_done[shard]
        if indexed and ok != int((status[start:stop] == STATUS_OK).sum()):
            problems.append(f"{label} shard {shard}: metadata says {ok} ok sample(s), the index "
                            f"{int((status[start:stop] == STATUS_OK).sum())}")
            damaged.append((dataset, teacher, shard))
        elif stored != ok:
            lost = "its shard file is missing" if stored == 0 else f"{stored} stored"
            problems.append(f"{label} shard {shard}: written with {ok} ok sample(s), {lost} "
                            f"(lost or damaged; {REPAIR})")
            damaged.append((dataset, teacher, shard))
    summary = meta.summary()
    unmarked = int((rows[:, 0] != layout.MARK_DONE).sum())
    if summary is not None and int(summary[0]) == layout.MARK_DONE and unmarked:
        problems.append(f"{label}: marked complete, but {unmarked} shard(s) have no metadata row "
                        f"(lost; {REPAIR})")
        damaged.extend((dataset, teacher, int(s)) for s in
                       np.flatnonzero(rows[:, 0] != layout.MARK_DONE))
    if summary is None:
        incomplete.append(f"{label}: statistics never finalized (resume the build)")
    elif status is not None and index_done is not None and index_done.all():
        ok = int((status == STATUS_OK).sum())
        for tok, stats in meta.columns.parse(summary)[2].items():
            expected = ok * (reader.manifest.num_tokens if tok == "patch" else 1)
            if int(summary[0]) == layout.MARK_DONE and stats.count != expected:
                problems.append(f"{label} {tok}: statistics count {stats.count}, expected "
                                f"{expected} ({ok} ok samples)")
    problems.extend(out_of_range.problems(label, out_of_range.reader_counts(reader, dataset,
                                                                           teacher)))
    return checked
