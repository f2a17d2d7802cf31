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

from typing import TYPE_CHECKING

import numpy as np

from cache_format import layout, out_of_range, shards
from cache_format.errors import CacheCorruptionError, CacheVersionError
from cache_format.manifest import STATUS_OK, STATUS_PENDING
from cache_format.records import VerifyReport

if TYPE_CHECKING:
    from cache_format.reader import CacheReader


def verify_cache(reader: CacheReader) -> VerifyReport:
    """Check `reader`'s cache (see the module docstring); never raises for damage found."""
    problems: list[str] = []
    missing: list[str] = []
    incomplete: list[str] = []
    checked = 0
    for dataset in reader.datasets:
        status, index_done = _verify_index(reader, dataset, problems, incomplete)
        for teacher in reader.teachers_for(dataset):
            checked += _verify_pair(reader, dataset, teacher, status, index_done, problems,
                                    missing, incomplete)
    return VerifyReport(checked, tuple(problems), tuple(missing), tuple(incomplete))


def _verify_index(reader: CacheReader, dataset: str, problems: list[str],
                  missing: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Check a dataset's index; its statuses and index done marks (None when they cannot be
    read)."""
    try:
        index = reader.index(dataset)
        found = index.verify()
        problems.extend(found)
        if found:
            return None, None
        done = reader.index_done(dataset)
        status = index.status
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


def _verify_pair(reader: CacheReader, dataset: str, teacher: str, status: np.ndarray | None,
                 index_done: np.ndarray | None, problems: list[str], missing: list[str],
                 incomplete: list[str]) -> int:
    """Check one pair; the number of token shards read."""
    label = f"{dataset}/{teacher}"
    try:
        meta = reader.pair_meta(dataset, teacher)
        found = meta.verify()
        problems.extend(found)
        if found:
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
            continue
        indexed = status is not None and index_done is not None and index_done[shard]
        if indexed and ok != int((status[start:stop] == STATUS_OK).sum()):
            problems.append(f"{label} shard {shard}: metadata says {ok} ok sample(s), the index "
                            f"{int((status[start:stop] == STATUS_OK).sum())}")
        elif stored != ok:
            lost = "its shard file is missing" if stored == 0 else f"{stored} stored"
            problems.append(f"{label} shard {shard}: written with {ok} ok sample(s), {lost} "
                            "(lost or damaged; delete its metadata row and resume the build)")
    summary = meta.summary()
    unmarked = int((rows[:, 0] != layout.MARK_DONE).sum())
    if summary is not None and int(summary[0]) == layout.MARK_DONE and unmarked:
        problems.append(f"{label}: marked complete, but {unmarked} shard(s) have no metadata row "
                        "(lost; delete the pair's summary and resume the build)")
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
