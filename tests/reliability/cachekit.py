"""A small complete cache to attack, what it reads as, and checks that nothing else was lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cache_format.encodings import EncodingSpec
from cache_format.reader import open_cache
from cache_format.testing import build_tiny_cache, tiny_teacher
from cache_format.writer import CacheWriter

DATASETS = (("a", 5), ("b", 3))
TEACHERS = (tiny_teacher("t1", dim=16), tiny_teacher("t2", dim=8, token_types=("patch",)))


def make_cache(path: Path) -> Path:
    """Two datasets x two teachers, int8, one skipped sample per dataset; planned recorded."""
    build_tiny_cache(path, EncodingSpec("int8"), teachers=TEACHERS, datasets=DATASETS,
                     invalid=(3,))
    writer = CacheWriter.open(path)
    writer.set_planned({t.name: [d for d, _ in DATASETS] for t in TEACHERS})
    return path


def snapshot(path: Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Every ok sample of every pair, decoded: what a trainer would read."""
    out = {}
    with open_cache(path) as reader:
        for dataset in reader.datasets:
            ok = np.flatnonzero(reader.index(dataset).ok)
            for teacher in reader.teachers_for(dataset):
                batch = reader.read_encoded(dataset, ok, [teacher])[teacher]
                out[(dataset, teacher)] = {tok: enc.decode().numpy().copy()
                                           for tok, enc in batch.items()}
    return out


def assert_rest_intact(path: Path, before: dict, damaged: set[tuple[str, str]]) -> None:
    """Every pair outside `damaged` still reads exactly as before."""
    with open_cache(path) as reader:
        for (dataset, teacher), tokens in before.items():
            if (dataset, teacher) in damaged:
                continue
            ok = np.flatnonzero(reader.index(dataset).ok)
            batch = reader.read_encoded(dataset, ok, [teacher])[teacher]
            for tok, values in tokens.items():
                np.testing.assert_array_equal(batch[tok].decode().numpy(), values)


def flip_byte(path: Path, at: int, xor: int = 0x5A) -> None:
    """XOR one byte of a file."""
    data = bytearray(path.read_bytes())
    data[at] ^= xor
    path.write_bytes(bytes(data))


def edit_manifest(cache: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Apply `edit(manifest_dict)` to the root zarr.json by hand, as a person would."""
    meta = json.loads((cache / "zarr.json").read_text())
    edit(meta["attributes"]["dune_cache"])
    (cache / "zarr.json").write_text(json.dumps(meta, indent=2))
