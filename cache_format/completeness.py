"""Whether a cache holds everything its manifest says it should: judged against what was
planned, never against what happens to be there.

The builder records every (teacher, dataset) pair its config asks for in the manifest's
`planned` section before it adds any pair; a pair whose `add_teacher` died is then missing, not
absent by choice. Caches written before `planned` existed are judged against the teachers of
their replay section (each must hold tokens of at least one dataset) and their assignment.

Metadata only (each dataset's and pair's summary: one small read each), so the trainer runs it
before step 0 and `dune-cache info` shows it; `verify` adds it to its full read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache_format.errors import (
    REPAIR_DAMAGED,
    CacheCorruptionError,
    CacheNotFoundError,
    CacheVersionError,
)
from cache_format.manifest import STATUS_OK

if TYPE_CHECKING:
    from cache_format.reader import CacheReader


@dataclass(frozen=True)
class Completeness:
    """What is missing (`incomplete`: a build to resume) and what disagrees (`damaged`)."""

    incomplete: tuple[str, ...]
    damaged: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Everything planned is there and the summaries agree."""
        return not self.incomplete and not self.damaged


def planned_pairs(reader: CacheReader) -> dict[str, tuple[str, ...]]:
    """{teacher: datasets} the cache should hold: the manifest's `planned` section, else (older
    caches) its assignment, with every teacher of the replay section."""
    m = reader.manifest
    if m.planned:
        return {t: tuple(d) for t, d in m.planned.items()}
    planned = {t: tuple(d) for t, d in m.assignment.items()}
    if m.replay is not None:
        for teacher in m.replay.teacher_domains:
            planned.setdefault(teacher, ())
    return planned


def completeness(reader: CacheReader, datasets: Sequence[str] | None = None) -> Completeness:
    """Check `datasets` (default: every dataset planned or present) against the plan."""
    m = reader.manifest
    planned = planned_pairs(reader)
    names = list(datasets) if datasets is not None else list(dict.fromkeys(
        [*m.datasets, *(d for ds in planned.values() for d in ds)]))
    incomplete: list[str] = []
    damaged: list[str] = []
    ok_counts: dict[str, int] = {}
    for dataset in names:
        if dataset not in m.datasets:
            incomplete.append(f"dataset {dataset}: planned but never added (resume the build)")
            continue
        try:
            summary = reader.index(dataset).summary()
        except (CacheCorruptionError, CacheVersionError) as exc:
            damaged.append(str(exc))
            continue
        if summary is None:
            incomplete.append(f"dataset {dataset}: index not complete (resume the build)")
        else:
            ok_counts[dataset] = int(summary[1 + STATUS_OK])
    for teacher, planned_datasets in planned.items():
        if not planned_datasets and not m.assignment.get(teacher):
            incomplete.append(f"teacher {teacher}: in the build config, but no dataset holds "
                              "its tokens (its add_teacher never finished; resume the build)")
        for dataset in planned_datasets:
            if dataset not in names:
                continue
            if dataset not in m.assignment.get(teacher, ()):
                incomplete.append(f"{dataset}/{teacher}: planned, never added (its add_teacher "
                                  "never finished; resume the build)")
                continue
            _check_pair(reader, dataset, teacher, ok_counts, incomplete, damaged)
    for teacher, assigned in m.assignment.items():  # pairs held beyond the plan
        for dataset in assigned:
            if dataset in names and dataset not in planned.get(teacher, ()):
                _check_pair(reader, dataset, teacher, ok_counts, incomplete, damaged)
    return Completeness(tuple(incomplete), tuple(damaged))


def _check_pair(reader: CacheReader, dataset: str, teacher: str, ok_counts: dict[str, int],
                incomplete: list[str], damaged: list[str]) -> None:
    """A pair's summary: final, and holding as many ok samples as its dataset's index."""
    label = f"{dataset}/{teacher}"
    try:
        if not reader.pair_complete(dataset, teacher):
            done = reader.pair_done(dataset, teacher)
            incomplete.append(f"{label}: {int(done.sum())} of {done.size} token shard(s) "
                              "written, statistics not final (resume the build)")
            return
        summary = reader.pair_meta(dataset, teacher).summary()
    except (CacheCorruptionError, CacheVersionError) as exc:
        damaged.append(str(exc))
        return
    if summary is not None and dataset in ok_counts and int(summary[1]) != ok_counts[dataset]:
        damaged.append(f"{label}: its summary holds {int(summary[1])} ok sample(s), the "
                       f"dataset's index {ok_counts[dataset]}")


def require_complete(reader: CacheReader, datasets: Sequence[str] | None = None) -> None:
    """Raise one error naming what is missing (CacheNotFoundError) or inconsistent
    (CacheCorruptionError): what a trainer calls before step 0."""
    found = completeness(reader, datasets)
    if found.damaged:
        raise CacheCorruptionError(
            f"{reader.location}: " + "; ".join(found.damaged),
            hint=f"the cache is damaged: {REPAIR_DAMAGED}")
    if found.incomplete:
        more = f" (and {len(found.incomplete) - 3} more)" if len(found.incomplete) > 3 else ""
        raise CacheNotFoundError(
            f"{reader.location}: the cache is not complete: "
            + "; ".join(found.incomplete[:3]) + more,
            hint="resume the build (`dune-cache build CONFIG` finishes it; "
            "`dune-cache info` shows what is missing)")
