"""The cache pre-flight: everything about a cache that can make a run fail, checked before step 0.

`preflight` runs once per run (from `train.run_data.open_run_data`) and reports every problem at
once, each naming its field: the student's grid against the cache's, teachers and datasets the
run selects but the cache lacks, a teacher cached from other weights than
`data.expect_checkpoint_sha256` says, `data.roots` for datasets the cache does not hold, and the
sample domains against what the teacher-dropping strategy needs (`own_data` and
`own+generic_data` train an image on the teachers of its domain, so every dataset's domain must
be some selected teacher's; `own+generic_data` also needs exactly one generic domain, owned by a
selected teacher). The comparisons themselves are the manifest's (`Manifest.differences`).

The rules are also used one by one where a part is built on its own (`CacheTrainData`,
`CachedTargets`, `OnlineTargets`), so each rule exists once. `replay_spec` is how stage two gets
the manifest's replay section: a cache written before it existed is a CacheVersionError that
says to run `dune-cache upgrade`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cache_format.differences import FieldDifference
from cache_format.errors import CacheMismatchError
from cache_format.manifest import Manifest
from cache_format.replay import ReplaySpec, missing_replay_error
from train.config import TrainConfig

#: Teacher-dropping strategies that train an image only on the teachers of its domain.
_DOMAIN_STRATEGIES = ("own_data", "own+generic_data")


@dataclass(frozen=True)
class Preflight:
    """What the pre-flight established: the run's teachers and datasets (in the run's order),
    the replay section, each teacher's domain and the generic domain teacher dropping uses."""

    teachers: tuple[str, ...]
    datasets: tuple[str, ...]
    replay: ReplaySpec
    teacher_domains: dict[str, str]
    generic_domain: str


def replay_spec(manifest: Manifest, location: str) -> ReplaySpec:
    """The manifest's replay section, checked to cover the cache's datasets and teachers."""
    spec = manifest.replay
    if spec is None:
        raise missing_replay_error(location)
    lacking = [f"dataset {d!r}" for d in manifest.datasets if d not in spec.datasets]
    lacking += [f"teacher {t!r}" for t in manifest.teachers if t not in spec.teacher_domains]
    lacking += [
        f"dataset {d!r} with domain {fp.domain!r} (the replay section says "
        f"{spec.datasets[d].domain!r})"
        for d, fp in manifest.datasets.items()
        if d in spec.datasets and spec.datasets[d].domain != fp.domain
    ]
    if lacking:
        raise CacheMismatchError(
            f"{location}: the manifest's replay section does not describe {', '.join(lacking)}",
            hint="rerun `dune-cache build` with the cache's config: it rewrites the section",
        )
    return spec


def select_names(
    what: str, wanted: Sequence[str] | None, manifest: Manifest, location: str
) -> tuple[str, ...]:
    """`wanted` teachers or datasets (`what`), all of the cache's when empty; refused unless the
    cache holds each (the manifest's comparison) and each is named once."""
    if not wanted:
        return tuple(getattr(manifest, what))
    problems = [_describe(d) for d in manifest.differences(**{what: {n: {} for n in wanted}})]
    if len(set(wanted)) != len(wanted):
        problems.append(f"{what}: {list(wanted)} names some more than once")
    if problems:
        raise CacheMismatchError(
            f"{location}: " + "; ".join(problems),
            hint=f"choose {what} the cache holds (each once), or add them to the cache with "
            "`dune-cache build`",
        )
    return tuple(wanted)


def grid_problem(manifest: Manifest, size: tuple[int, int], patch: int) -> str | None:
    """Why a student taking `size` pixels with `patch` does not fit the cache's token grid."""
    grid = (size[0] // patch, size[1] // patch)
    whole = size[0] % patch == 0 and size[1] % patch == 0
    if whole and not manifest.differences(grid=grid, student_patch=patch):
        return None
    (gh, gw), cached_patch = manifest.grid, manifest.student_patch
    return (
        f"the cache was built for the token grid {gh}x{gw} (manifest grid ({gh}, {gw})) at "
        f"student patch {cached_patch} ({gh * cached_patch}x{gw * cached_patch} px), but the "
        f"student takes {size[0]}x{size[1]} px with patch {patch}, i.e. the grid "
        f"{grid[0]}x{grid[1]} (grid ({grid[0]}, {grid[1]}))"
        + ("" if whole else " (not a whole grid)")
    )


def roots_problem(roots: Mapping[str, str], manifest: Manifest) -> str | None:
    """Why `roots` (dataset -> where its images are now) does not fit the cache, if it does not."""
    unknown = sorted(set(roots) - set(manifest.datasets))
    if not unknown:
        return None
    return f"roots: {unknown} are not datasets of the cache (it has {sorted(manifest.datasets)})"


def grid_hint(manifest: Manifest) -> str:
    """How to fix a grid problem."""
    size = (manifest.grid[0] * manifest.student_patch, manifest.grid[1] * manifest.student_patch)
    return (f"set the student's img_size to {size[0]} with a /{manifest.student_patch} student, "
            "or build a cache for the student's grid")


def domain_problems(
    strategy: str, teachers: Sequence[str], datasets: Sequence[str], spec: ReplaySpec
) -> list[str]:
    """What keeps `strategy` from serving every sample of `datasets` with `teachers`."""
    if strategy not in _DOMAIN_STRATEGIES:
        return []
    owned = {spec.teacher_domains[t]: t for t in teachers}
    teacher_domains = {t: spec.teacher_domains[t] for t in teachers}
    problems = []
    orphans = {d: spec.datasets[d].domain for d in datasets if spec.datasets[d].domain not in owned}
    if orphans:
        problems.append(
            f"dropping.strategy {strategy!r} trains an image only on the teachers of its domain, "
            f"but the domain of dataset(s) {orphans} is no selected teacher's (teacher domains "
            f"{teacher_domains})"
        )
    generic = spec.generic_domains
    if strategy == "own+generic_data" and len(generic) != 1:
        problems.append(
            f"dropping.strategy 'own+generic_data' trains every teacher on one generic domain, "
            f"but the cache declares several generic domains {list(generic)}"
        )
    elif strategy == "own+generic_data" and generic[0] not in owned:
        problems.append(
            f"dropping.strategy 'own+generic_data': the generic domain {generic[0]!r} is no "
            f"selected teacher's (teacher domains {teacher_domains})"
        )
    return problems


def _describe(difference: FieldDifference, config: str = "") -> str:
    """A manifest difference in the run's words (`config`: the prefix of the run's fields)."""
    kind, _, rest = difference.path.partition(".")
    name, _, field = rest.partition(".")
    what = {"teachers": "teacher", "datasets": "dataset"}.get(kind, kind)
    if difference.missing_entry:
        return f"{config}{kind}: {what} {name!r} is not in the cache{difference.note}"
    if kind == "teachers" and field == "checkpoint_sha256":
        return (f"{config}expect_checkpoint_sha256: teacher {name!r} was cached from a "
                f"checkpoint with sha256 {difference.found}, but the run expects "
                f"{difference.expected}")
    return str(difference)


def preflight(cfg: TrainConfig, manifest: Manifest, location: str, *, student_patch: int
              ) -> Preflight:
    """Check the cache against the run once, before step 0; raise CacheMismatchError naming
    every problem (CacheVersionError for a cache without a replay section)."""
    spec = replay_spec(manifest, location)
    teachers = tuple(cfg.data.teachers) or tuple(manifest.teachers)
    datasets = tuple(cfg.data.datasets) or tuple(manifest.datasets)
    expected_teachers: dict[str, Mapping[str, str]] = {t: {} for t in teachers}
    for teacher, sha in cfg.data.expect_checkpoint_sha256.items():
        expected_teachers[teacher] = {"checkpoint_sha256": sha}
    differences = manifest.differences(teachers=expected_teachers,
                                       datasets={d: {} for d in datasets})
    # (problem, how to fix it), in the order a reader fixes them.
    problems: list[tuple[str, str]] = []
    size = cfg.student.img_size
    grid = grid_problem(manifest, (size, size), student_patch)
    if grid:
        problems.append((f"student {cfg.student.arch} at img_size {size}: {grid}",
                         grid_hint(manifest)))
    for difference in differences:
        problems.append((_describe(difference, "data."), (
            "choose teachers and datasets the cache holds" if difference.missing_entry else
            "rebuild the cache with the expected weights, or fix data.expect_checkpoint_sha256")))
    roots = roots_problem(cfg.data.roots, manifest)
    if roots:
        problems.append((f"data.{roots}", "remove them from data.roots"))
    # Domains are only compared once every selected teacher and dataset exists.
    if not any(d.missing_entry for d in differences):
        problems += [(p, "pick another dropping.strategy, or select teachers for every domain")
                     for p in domain_problems(cfg.dropping.strategy, teachers, datasets, spec)]
    if problems:
        text = [p for p, _ in problems]
        lines = text[0] if len(text) == 1 else "".join(f"\n  - {p}" for p in text)
        raise CacheMismatchError(f"{location} does not fit this run: {lines}",
                                 hint="; ".join(dict.fromkeys(h for _, h in problems)))
    return Preflight(
        teachers=teachers,
        datasets=datasets,
        replay=spec,
        teacher_domains={t: spec.teacher_domains[t] for t in teachers},
        generic_domain=spec.generic_domains[0],
    )
