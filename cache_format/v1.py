"""Reading format version 1, kept small and apart: its array names, its sample index and its pair
metadata, behind the same interface as version 2's (sample_index.SampleIndex, pairmeta.PairMeta).

Version 1 stored per shard several small objects (a `status`, `view_params` and `index_done`
chunk per dataset; a `done` mark and three partial-statistics rows per token type per pair) and
keys as a zarr string array (`key`, vlen-utf8) that tensorstore cannot read. `dune-cache upgrade`
(upgrade.py) rewrites that metadata into version 2 in place; until then this module reads it as
the version-1 reader did. The token records (`tokens`) and calibration arrays are the same in
both versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

from cache_format import layout
from cache_format.errors import FOREIGN_CACHE_HINT, CacheVersionError
from cache_format.manifest import STATUS_CODES
from cache_format.plainread import STRINGS
from cache_format.sample_index import SampleIndex
from cache_format.stats import ChannelStats

#: The format version this module reads.
VERSION = 1
KEY = "key"
VIEW_PARAMS = "view_params"
STATUS = "status"
INDEX_DONE = "index_done"
DONE = "done"
STATS = "stats"
FINAL = "final"


def stats_names(tok: str, *, partial: bool) -> tuple[str, str, str]:
    """(count, mean, m2) array paths, relative to the pair group, of `tok`'s statistics."""
    kind = "part_" if partial else ""
    return tuple(f"{STATS}/{tok}_{kind}{q}" for q in ("count", "mean", "m2"))  # type: ignore[return-value]


class V1SampleIndex(SampleIndex):
    """A version-1 dataset index: `key` (vlen-utf8), `view_params` f32 [N, P], `status` u8 [N],
    `index_done` u8 [num_shards] (one chunk per shard)."""

    ARRAYS = (KEY, VIEW_PARAMS, STATUS, INDEX_DONE)
    STATUS_ARRAY = STATUS

    def _check_shapes(self) -> None:
        keys, params, status = (self._arrays[n] for n in (KEY, VIEW_PARAMS, STATUS))
        n, v, p = status.shape[0], self.views_per_image, len(self.view_param_names)
        problem = ""
        if not keys.vlen or status.dtype != np.uint8 or params.dtype != np.float32:
            problem = (f"dtypes key {keys.dtype}, view_params {params.dtype}, status "
                       f"{status.dtype}; expected strings, float32, uint8")
        elif params.shape != (n, p) or len(status.shape) != 1:
            problem = f"view_params {params.shape} and status {status.shape}, expected ({n}, {p})"
        elif keys.shape != (n // v,) or n % v:
            problem = f"{keys.shape[0]} keys for {n} samples at {v} views per image"
        if problem:
            raise CacheVersionError(f"dataset {self.dataset!r}: index arrays disagree: {problem}",
                                    hint=FOREIGN_CACHE_HINT)

    def _load_status(self) -> np.ndarray:
        return self._load(self._arrays[STATUS])

    def _done(self) -> np.ndarray:
        return self._load(self._arrays[INDEX_DONE]).astype(bool)

    def summary(self) -> np.ndarray | None:
        if not self._done().all():
            return None
        return layout.index_meta_row(self.status, len(STATUS_CODES))

    def shard_meta(self) -> np.ndarray:
        done, status = self._done(), self.status
        sps = self._arrays[STATUS].rows_per_chunk
        rows = np.zeros((done.size, 1 + len(STATUS_CODES)), dtype=np.int64)
        for shard in np.nonzero(done)[0].tolist():
            rows[shard] = layout.index_meta_row(status[shard * sps : (shard + 1) * sps],
                                                rows.shape[1] - 1)
        return rows

    def keys_of(self, images: Sequence[int] | np.ndarray) -> list[str]:
        rows = self._rows(images, self.num_images, "image")
        out: list[str] = [""] * rows.size
        for block, where, local in self._by_chunk(self._arrays[KEY], rows):
            # Key by key: a StringDType slice of `block` would grow block's string arena.
            for position, row in zip(where.tolist(), local.tolist(), strict=True):
                out[position] = block[row]
        return out

    def view_params_of(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = self._rows(samples, self.num_samples, "sample")
        out = np.empty((rows.size, len(self.view_param_names)), dtype=np.float32)
        for block, where, local in self._by_chunk(self._arrays[VIEW_PARAMS], rows):
            out[where] = block[local]
        return out

    def view_rows_of(self, samples: Sequence[int] | np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        return self.view_params_of(samples), None  # version 1 stored no source fingerprints

    @property
    def keys(self) -> np.ndarray:
        return self._load(self._arrays[KEY]).astype(STRINGS)

    @property
    def view_params(self) -> np.ndarray:
        return self._load(self._arrays[VIEW_PARAMS])

    def verify(self) -> tuple[str, ...]:
        return self._verify_chunks()

    def _fix_hint(self, array: object, chunk: int) -> str:
        return "run `dune-cache upgrade` on a healthy copy, or rebuild the cache"




class V1PairMeta:
    """A version-1 pair's `done` marks, per-shard and merged statistics, as version 2's rows
    (pairmeta.PairMeta's interface), read with zarr-python."""

    def __init__(self, group: zarr.Group, dataset: str, teacher: str,
                 columns: layout.PairColumns, num_tokens: int) -> None:
        self.label = f"{dataset}/{teacher}"
        self.columns = columns
        self._group = group
        self._num_tokens = num_tokens

    def done_mark(self, shard: int) -> bool:
        return bool(self._group[DONE][shard])  # type: ignore[index]

    def _ok(self, counts: np.ndarray) -> np.ndarray:
        """Ok samples from the first token type's counts (patch counts every token)."""
        first = self.columns.token_types[0]
        return counts // (self._num_tokens if first == "patch" else 1)

    def _stats(self, partial: bool) -> dict[str, tuple[np.ndarray, ...]]:
        return {tok: tuple(np.atleast_1d(self._group[p][:])  # type: ignore[index]
                           for p in stats_names(tok, partial=partial))
                for tok in self.columns.token_types}

    def rows(self) -> np.ndarray:
        done = np.asarray(self._group[DONE][:], dtype=bool)  # type: ignore[index]
        parts = self._stats(partial=True)
        rows = np.zeros((done.size, self.columns.width))
        ok = self._ok(parts[self.columns.token_types[0]][0])
        for shard in np.nonzero(done)[0].tolist():
            stats = {tok: ChannelStats(int(c[shard]), m[shard], m2[shard])
                     for tok, (c, m, m2) in parts.items()}
            rows[shard] = self.columns.row(layout.MARK_DONE, int(ok[shard]), stats)
        return rows

    def summary(self) -> np.ndarray | None:
        if not self._group[f"{STATS}/{FINAL}"][0]:  # type: ignore[index]
            return None
        done = np.asarray(self._group[DONE][:], dtype=bool)  # type: ignore[index]
        merged = self._stats(partial=False)
        stats = {tok: ChannelStats(int(c[0]), m, m2) for tok, (c, m, m2) in merged.items()}
        ok = int(self._ok(merged[self.columns.token_types[0]][0])[0])
        mark = layout.MARK_DONE if done.all() else layout.MARK_PARTIAL
        return self.columns.row(mark, ok, stats)

    def verify(self) -> list[str]:
        problems = []
        for array in self._group.array_values():  # type: ignore[union-attr]
            if array.basename == layout.TOKENS:
                continue
            try:
                array[...]
            except Exception as exc:  # zarr's checksum and decode errors vary
                problems.append(f"{self.label}, array {array.path}: unreadable ({exc})")
        for array in self._group[STATS].array_values():  # type: ignore[union-attr]
            try:
                array[...]
            except Exception as exc:
                problems.append(f"{self.label}, array {array.path}: unreadable ({exc})")
        return problems
