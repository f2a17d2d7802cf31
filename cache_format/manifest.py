"""The cache manifest: what a cache holds, stored as the root attribute "dune_cache".

A trainer compares the manifest with its own config before step 0 (`Manifest.check_against`)
so that a cache built for another grid, teacher checkpoint or data list is refused with a message
naming the field, not discovered as bad numbers hours later.

Versioning rule: FORMAT_VERSION grows whenever a reader of the previous version could misread a
cache of the new one. A reader refuses a cache whose version is newer than its own. A new token
encoding is additive (version 2 gained int4 and int4h): a reader that does not know a cache's
encoding name refuses it by name (every version-2 reader does, since EncodingSpec validates it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from cache_format.differences import FieldDifference, compare_fields
from cache_format.encodings import ENCODING_NAMES, UNKNOWN_ENCODING_HINT, EncodingSpec
from cache_format.errors import (
    CacheCorruptionError,
    CacheMismatchError,
    CacheVersionError,
    ConfigError,
)
from cache_format.replay import ReplaySpec
from cache_format.serde import from_dict, to_dict

FORMAT_VERSION = 2
ROOT_ATTR = "dune_cache"
#: Root attribute holding the SHA-256 of the manifest's canonical JSON (`manifest_sha256`). It
#: sits beside the manifest, so an edit of any manifest field that does not also recompute it
#: (a hand edit, a flipped byte) is refused when the cache is opened.
MANIFEST_SHA_ATTR = "dune_cache_sha256"
#: The token types a teacher can give, in storage order: "patch" always, "cls" when it has one.
#: The one definition: teachers, the writer, the reader and the trainer all use this.
TOKEN_TYPES: tuple[str, ...] = ("cls", "patch")

#: Per-sample status codes stored in each dataset's `status` array (uint8).
STATUS_CODES: dict[str, str] = {
    "0": "pending",
    "1": "ok",
    "2": "zero_bytes",
    "3": "truncated",
    "4": "not_an_image",
    "5": "unsupported_mode",
    "6": "too_large",
    "7": "unreadable",
}
STATUS_OK = 1
STATUS_PENDING = 0

# Dataset and teacher names become zarr node names, TOML keys ([sharing.matrix], [data.roots])
# and parts of dotted CLI overrides (`data.roots.<name>`), so they keep to a portable character
# set without '.': a dotted name would read as a nested table in TOML and in an override.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"
# Caches written before the rule above allowed '.' in dataset and teacher names. A stored name is
# a fact about an existing cache, not a choice: fingerprints (what a manifest holds) accept those
# names so that such a cache stays readable; every config that names something new is held to
# NAME_RULE.
_STORED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def status_name(code: int) -> str:
    """The name of status code `code` ("ok", "truncated", ...)."""
    try:
        return STATUS_CODES[str(int(code))]
    except KeyError:
        raise ConfigError(f"status code {code} is unknown; known: {STATUS_CODES}") from None


def status_code(name: str) -> int:
    """The uint8 code of status `name`."""
    for code, known in STATUS_CODES.items():
        if known == name:
            return int(code)
    raise ConfigError(
        f"status {name!r} is unknown; expected one of {', '.join(STATUS_CODES.values())}"
    )


def check_node_name(
    name: str, what: str, *, stored: bool = False, names: str = "cache groups and TOML keys"
) -> None:
    """Refuse a dataset / teacher / domain / stage name that is not a portable name
    (`NAME_RULE`); `names` says what the name becomes, for the message.

    The one name rule of the project: configs of both stages and the manifest call it.
    `stored=True` (the manifest's fingerprints) also accepts the '.' that caches written before
    the rule allowed, so that those caches stay readable.
    """
    pattern = _STORED_NAME_RE if stored else _NAME_RE
    if not isinstance(name, str) or not pattern.match(name):
        raise ConfigError(f"{what}: expected a name of {NAME_RULE} (it names {names}), "
                          f"found {name!r}")


def manifest_sha256(stored: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a stored manifest's canonical JSON: keys sorted, no whitespace, UTF-8."""
    text = json.dumps(stored, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_attrs(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The root attributes that store a manifest: the manifest and its checksum (written in one
    update, so that they never disagree on disk)."""
    return {ROOT_ATTR: dict(stored), MANIFEST_SHA_ATTR: manifest_sha256(stored)}


def check_manifest_sha(attrs: Mapping[str, Any], where: str) -> None:
    """Refuse a root whose manifest no longer matches its checksum (CacheCorruptionError).

    Caches written before the checksum existed have none; they are accepted as they are (the
    next write through CacheWriter adds it)."""
    found = attrs.get(MANIFEST_SHA_ATTR)
    version = (attrs.get(ROOT_ATTR) or {}).get("format_version")
    if found is None or (isinstance(version, int) and version > FORMAT_VERSION):
        return  # no checksum yet; or a newer format, refused by Manifest.from_dict's own rule
    actual = manifest_sha256(attrs[ROOT_ATTR])
    if found != actual:
        raise CacheCorruptionError(
            f"{where}: the manifest (root attribute {ROOT_ATTR!r} in zarr.json) does not match "
            f"its checksum {MANIFEST_SHA_ATTR}: expected {found!r}, found {actual!r}; it was "
            "edited or damaged after the build wrote it",
            hint="restore the cache's zarr.json from a copy, or rebuild the cache; a manifest "
            "is never edited by hand")


def keys_sha256(keys: Iterable[str]) -> str:
    """SHA-256 (hex) of an ordered key list: each key's UTF-8 bytes followed by a NUL byte."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class TeacherFingerprint:
    """What identifies a teacher's outputs: a cache built with another one is not reusable.

    `input_size` is (height, width) in pixels, `mean`/`std` the input normalization, `token_types`
    the stored token types ("patch", plus "cls" when the teacher has one), `dim` the output width.
    """

    name: str
    arch: str
    checkpoint_sha256: str
    input_size: tuple[int, int]
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    token_types: tuple[str, ...]
    dim: int

    def __post_init__(self) -> None:
        check_node_name(self.name, "teacher name", stored=True)
        if "patch" not in self.token_types or not set(self.token_types) <= set(TOKEN_TYPES):
            raise ConfigError(
                f"teacher {self.name}: token_types must hold 'patch' and optionally 'cls', "
                f"found {self.token_types}"
            )
        if self.dim <= 0 or self.patch_size <= 0 or min(self.input_size) <= 0:
            raise ConfigError(
                f"teacher {self.name}: dim, patch_size and input_size must be positive, found "
                f"dim={self.dim}, patch_size={self.patch_size}, input_size={self.input_size}"
            )
        if len(self.mean) != len(self.std):
            raise ConfigError(f"teacher {self.name}: mean and std differ in length")

    @property
    def has_cls(self) -> bool:
        """Whether this teacher stores a cls token."""
        return "cls" in self.token_types


@dataclass(frozen=True)
class DatasetFingerprint:
    """What identifies a dataset's ordered image list (`keys_sha256` from `keys_sha256()`).

    `source_fingerprint` names the algorithm of the per-image content fingerprints stored in the
    dataset's index rows (cache_format/source_fingerprint.py); "" when it has none (built before
    them, upgraded from version 1, or written by a tool that never replays its images)."""

    name: str
    source_kind: str
    root: str
    num_images: int
    keys_sha256: str
    domain: str = ""
    source_fingerprint: str = ""

    def __post_init__(self) -> None:
        check_node_name(self.name, "dataset name", stored=True)
        if self.num_images <= 0:
            raise ConfigError(
                f"dataset {self.name}: num_images must be > 0, found {self.num_images}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.keys_sha256):
            raise ConfigError(
                f"dataset {self.name}: keys_sha256 must be 64 lowercase hex digits "
                f"(cache_format.manifest.keys_sha256(keys)), found {self.keys_sha256!r}"
            )
        if self.source_fingerprint and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}",
                                                        self.source_fingerprint):
            raise ConfigError(
                f"dataset {self.name}: source_fingerprint must be an algorithm name such as "
                f"'crc64-xz' (or '' for none), found {self.source_fingerprint!r}")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything a cache promises about its contents (root attribute "dune_cache")."""

    format_version: int = FORMAT_VERSION
    grid: tuple[int, int]
    student_patch: int
    views_per_image: int
    view_mode: str
    seed: int
    samples_per_shard: int
    encoding: EncodingSpec
    teachers: dict[str, TeacherFingerprint] = field(default_factory=dict)
    datasets: dict[str, DatasetFingerprint] = field(default_factory=dict)
    assignment: dict[str, tuple[str, ...]] = field(default_factory=dict)
    view_param_names: tuple[str, ...] = ()
    status_codes: dict[str, str] = field(default_factory=lambda: dict(STATUS_CODES))
    build_config: dict[str, Any] = field(default_factory=dict)
    #: What stage two replays views from (cache_format/replay.py); None in older caches.
    replay: ReplaySpec | None = None
    #: Where the tokens came from when no teacher ran: `dune-cache transcode` records the source
    #: cache ({"transcoded_from": location, "encoding": {...}}); empty for a build.
    origin: dict[str, Any] = field(default_factory=dict)
    #: {teacher: [datasets]}: every pair the build config asks for, recorded by the builder
    #: before it adds any pair. Completeness is judged against it (a pair planned but never
    #: added is missing, not absent by choice); empty in caches written before it.
    planned: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.grid) != 2 or min(self.grid) <= 0:
            raise ConfigError(f"manifest.grid: expected two positive ints, found {self.grid}")
        if self.student_patch <= 0 or self.views_per_image <= 0:
            raise ConfigError(
                "manifest.student_patch and manifest.views_per_image must be positive, found "
                f"{self.student_patch} and {self.views_per_image}"
            )
        if self.samples_per_shard <= 0 or self.samples_per_shard % self.views_per_image:
            raise ConfigError(
                f"manifest.samples_per_shard: expected a positive multiple of views_per_image "
                f"({self.views_per_image}), found {self.samples_per_shard}"
            )
        for teacher, names in self.assignment.items():
            if teacher not in self.teachers:
                raise ConfigError(f"manifest.assignment: teacher {teacher!r} has no fingerprint")
            missing = [d for d in names if d not in self.datasets]
            if missing:
                raise ConfigError(
                    f"manifest.assignment.{teacher}: datasets {missing} have no fingerprint"
                )
        for name, fp in [*self.teachers.items(), *self.datasets.items()]:
            if fp.name != name:
                raise ConfigError(f"manifest: entry {name!r} holds a fingerprint named {fp.name!r}")
        replay = self.replay
        if replay is not None and (replay.seed, replay.views_per_image, replay.views.mode) != (
                self.seed, self.views_per_image, self.view_mode):
            raise ConfigError(
                f"manifest.replay: seed {replay.seed}, views_per_image {replay.views_per_image} "
                f"and view mode {replay.views.mode!r} must equal the manifest's ({self.seed}, "
                f"{self.views_per_image}, {self.view_mode!r})"
            )

    @property
    def images_per_shard(self) -> int:
        """Whole images in one shard (samples_per_shard is a multiple of views_per_image): image
        i of a dataset lies in shard i // images_per_shard."""
        return self.samples_per_shard // self.views_per_image

    @property
    def num_tokens(self) -> int:
        """Patch tokens per sample (gh * gw)."""
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what is stored in the root attributes)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "cache") -> Manifest:
        """Parse a stored manifest; a newer format version raises CacheVersionError."""
        if not isinstance(data, Mapping) or "format_version" not in data:
            raise CacheVersionError(
                f"{where}: the root attribute {ROOT_ATTR!r} has no format_version; "
                "this is not a dune-distill cache (or a damaged one)"
            )
        found = data["format_version"]
        if not isinstance(found, int) or found < 1:
            raise CacheVersionError(f"{where}: unknown cache format_version {found!r}")
        if found > FORMAT_VERSION:
            raise CacheVersionError(
                f"{where}: the cache was written with format version {found}, but this "
                f"dune-distill reads format versions up to {FORMAT_VERSION}",
                hint="upgrade dune-distill (pip install -U dune-distill) to read this cache",
            )
        data = dict(data)
        name = (data.get("encoding") or {}).get("name") if isinstance(
            data.get("encoding"), Mapping) else None
        if name is not None and name not in ENCODING_NAMES:
            # New encodings are additive within a format version: an encoding this version does
            # not know is a cache it cannot decode, refused before anything else is read.
            raise CacheVersionError(
                f"{where}: manifest.encoding.name is {name!r}, but this dune-distill decodes "
                f"only {', '.join(ENCODING_NAMES)}", hint=UNKNOWN_ENCODING_HINT)
        if data.get("replay") is not None:  # versioned on its own: parsed (and refused) first
            data["replay"] = ReplaySpec.from_dict(data["replay"], where=f"{where}: manifest.replay")
        return from_dict(cls, data, where="manifest")

    def differences(self, **expected: Any) -> list[FieldDifference]:
        """Every field that differs from `expected`, innermost key first named (empty: equal).

        Keyword names are manifest fields. `teachers` / `datasets` take a mapping (or an
        iterable) of fingerprints: each named entry must exist and match field by field; entries
        of the cache that are not named are fine (a trainer may use a subset). A mapping's value
        may also be a dict of some fingerprint fields ({} = only "must exist"). `assignment`
        compares the named teachers only. Other fields compare by value (tuples and lists alike).
        """
        known = {f.name for f in fields(self)}
        out: list[FieldDifference] = []
        for name, value in expected.items():
            if name not in known:
                raise ConfigError(
                    f"check_against: {name!r} is not a manifest field; known: {sorted(known)}"
                )
            found = getattr(self, name)
            if name in ("teachers", "datasets"):
                entries = value.items() if isinstance(value, Mapping) else (
                    (fp.name, fp) for fp in value)
                for entry, fp in entries:
                    if entry not in found:
                        out.append(FieldDifference(f"{name}.{entry}", "present", "absent",
                                                   missing_entry=True, note=f" (the cache has "
                                                   f"{sorted(found)})"))
                        continue
                    want, have = to_dict(fp), to_dict(found[entry])
                    if isinstance(fp, Mapping):  # some fields only
                        have = {k: v for k, v in have.items() if k in want}
                    compare_fields(f"{name}.{entry}", want, have, out)
            elif name == "assignment":
                for teacher, datasets in dict(value).items():
                    compare_fields(f"assignment.{teacher}", sorted(datasets),
                             sorted(found.get(teacher, ())), out)
            else:
                compare_fields(name, to_dict(value), to_dict(found), out)
        return out

    def check_against(self, **expected: Any) -> None:
        """Raise CacheMismatchError naming every field that differs (see `differences`)."""
        differ = self.differences(**expected)
        if differ:
            raise CacheMismatchError(
                "; ".join(str(d) for d in differ),
                hint="rebuild the cache with this config, or point the config at a matching "
                "cache" if not any(d.missing_entry for d in differ) else
                "build the missing part into the cache, or use another cache",
            )
