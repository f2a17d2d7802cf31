"""Seeded fuzz: random single-byte flips, truncations and deletions over every file of a small
cache. Each one is detected (opening the cache refuses it in one DuneError, or `verify` reports
it) or provably harmless (a zarr.json whose parsed JSON is unchanged, e.g. one whitespace byte
turned into another). `--fuzz-count N` (or DUNE_FUZZ_COUNT) sets the number of trials."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cache_format.errors import DuneError
from cache_format.reader import open_cache
from tests.reliability.cachekit import make_cache

SEED = 20251130
#: Trials in `make test`: every file of the cache (100) is hit once, about 20 s here.
DEFAULT_COUNT = 100


def _count(config: pytest.Config) -> int:
    option = config.getoption("--fuzz-count", default=None)
    if option is not None:
        return int(option)
    return int(os.environ.get("DUNE_FUZZ_COUNT", DEFAULT_COUNT))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _damage(path: Path, rng: np.random.Generator) -> str:
    """Apply one random fault to `path`; what it was."""
    data = path.read_bytes()
    kind = rng.choice(["flip", "truncate", "delete"]) if data else "delete"
    if kind == "flip":
        at, xor = int(rng.integers(len(data))), int(rng.integers(1, 256))
        changed = bytearray(data)
        changed[at] ^= xor
        path.write_bytes(bytes(changed))
        return f"flip byte {at} ^ {xor:#04x}"
    if kind == "truncate":
        size = int(rng.integers(len(data)))
        path.write_bytes(data[:size])
        return f"truncate {len(data)} -> {size} bytes"
    path.unlink()
    return "delete"


def _detected(cache: Path) -> str | None:
    """How the damage showed (None: it did not)."""
    try:
        with open_cache(cache) as reader:
            report = reader.verify()
    except DuneError as exc:
        return f"refused on open ({type(exc).__name__})"
    if report.problems:
        return "verify: damaged"
    if report.missing or report.incomplete:
        return "verify: incomplete"
    return None


def _harmless(original: bytes, path: Path) -> str | None:
    """Why the damage cannot change what the cache means (None: no proof)."""
    if path.name == "zarr.json" and path.exists():
        try:
            if json.loads(path.read_bytes()) == json.loads(original):
                return "same JSON after parsing"
        except ValueError:
            return None
    return None


def test_fuzz_single_faults_are_detected_or_harmless(tmp_path: Path, request: pytest.FixtureRequest,
                                                    record_property) -> None:  # type: ignore[no-untyped-def]
    """Random single-byte flips, truncations and deletions over every file of a small cache: each is
    detected or provably harmless."""
    count = _count(request.config)
    cache = make_cache(tmp_path / "cache")
    files = _files(cache)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(files))
    outcomes: Counter[str] = Counter()
    silent = []
    for trial in range(count):
        path = files[int(order[trial % len(files)])]
        original = path.read_bytes()
        what = _damage(path, rng)
        try:
            how = _detected(cache) or _harmless(original, path)
        except Exception as exc:  # anything but a DuneError is a failure to report cleanly
            how = None
            what += f" -> {type(exc).__name__}: {exc}"
        if how is None:
            silent.append(f"{path.relative_to(cache)}: {what}")
        else:
            outcomes[how] += 1
        path.write_bytes(original)  # restore: the next trial starts from a sound cache
    summary = ", ".join(f"{n} {how}" for how, n in sorted(outcomes.items()))
    record_property("trials", count)
    record_property("detail", f"seed {SEED}, {len(files)} files; {summary}"
                    + (f"; {len(silent)} SILENT" if silent else ""))
    assert not silent, "damage neither detected nor provably harmless:\n" + "\n".join(silent)
    assert open_cache(cache).verify().ok  # every file restored
