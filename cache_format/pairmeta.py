"""A (dataset, teacher) pair's metadata, format version 2: shard done marks, ok counts, statistics.

Each token shard's metadata is one `shard_meta` row, one store object written after the shard's
data: its done mark (column 0), its ok-sample count and its partial statistics (layout.PairColumns).
`finalize_stats` merges them into the pair's `summary`, which a reader of a complete pair reads
instead of the rows: one object per pair, whatever the number of shards. Rows are read here
directly (plainread.py, checksums verified), not through zarr-python.
"""

from __future__ import annotations

import numpy as np
import zarr

from cache_format import layout
from cache_format.errors import REPAIR_DAMAGED, VERIFY_HINT, CacheCorruptionError
from cache_format.files import Files
from cache_format.plainread import PlainArray, read_chunk

#: How to repair a damaged calibration chunk: the pair's tokens were encoded with it.
_CALIB_FIX = "the pair's tokens were encoded with it: rebuild the cache from a copy or anew"


class PairMeta:
    """The metadata arrays of one pair (`shard_meta`, `summary`), read on demand, not kept."""

    def __init__(self, group: zarr.Group, dataset: str, teacher: str, columns: layout.PairColumns,
                 files: Files) -> None:
        self.label = f"{dataset}/{teacher}"
        self.columns = columns
        self._files = files
        # One listing opens every array of the pair (each zarr.json read once, concurrently).
        # A required array the listing lacks is asked for by name: a listing is not trusted
        # to say it is absent.
        listed = {a.basename: a for a in group.array_values()}  # type: ignore[union-attr]
        self._arrays = {name: PlainArray.from_array(
                            listed[name] if name in listed else group[name],  # type: ignore[arg-type]
                            f"{self.label}, array {name!r}")
                        for name in (layout.SHARD_META, layout.SUMMARY)}
        self._calib = {name: PlainArray.from_array(a, f"{self.label}, array {name!r}")
                       for name, a in listed.items()
                       if name.endswith(("_calib_mean", "_calib_std"))}

    def calibration(self, tok: str) -> tuple[np.ndarray, np.ndarray]:
        """The int8 calibration (mean, std) float32 [D] of token type `tok`, checksums
        verified. Written with the pair, before any shard: a missing chunk is damage."""
        out = []
        for name in layout.calib_names(tok):
            array = self._calib.get(name)
            if array is None:
                raise CacheCorruptionError(
                    f"{self.label}: calibration array {name!r} is missing",
                    hint=VERIFY_HINT)
            out.append(np.array(read_chunk(self._files, array, 0, _CALIB_FIX, True)[0]))
        return out[0], out[1]

    def _read(self, name: str, chunk: int) -> np.ndarray:
        hint = (REPAIR_DAMAGED
                if name == layout.SHARD_META else "resume the build, which finalizes it again")
        return read_chunk(self._files, self._arrays[name], chunk, hint)[0]

    def done_mark(self, shard: int) -> bool:
        """Whether token shard `shard` was written completely (one read)."""
        return int(self._read(layout.SHARD_META, shard)[0, 0]) == layout.MARK_DONE

    def rows(self) -> np.ndarray:
        """Every shard's row, float64 [num_shards, W] (a row of zeros: never written)."""
        array = self._arrays[layout.SHARD_META]
        return np.concatenate([self._read(layout.SHARD_META, c) for c in range(array.num_chunks)]
                              or [np.zeros((0, self.columns.width))])

    def summary(self) -> np.ndarray | None:
        """The merged row once finalize_stats ran (column 0: MARK_DONE = every shard merged,
        MARK_PARTIAL = the done ones only), else None."""
        row = self._read(layout.SUMMARY, 0)
        return None if int(row[0]) == 0 else np.array(row)

    def verify(self) -> list[str]:
        """Read every chunk of the pair's metadata and calibration arrays; the damaged ones."""
        problems = []
        for array in self._arrays.values():
            for chunk in range(array.num_chunks):
                try:
                    read_chunk(self._files, array, chunk)
                except CacheCorruptionError as exc:
                    problems.append(str(exc))
        for array in self._calib.values():
            for chunk in range(array.num_chunks):
                try:
                    read_chunk(self._files, array, chunk, _CALIB_FIX, True)
                except CacheCorruptionError as exc:
                    problems.append(str(exc))
        return problems
