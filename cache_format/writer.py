"""CacheWriter: the only code that writes a cache (used by precompute/).

Structure changes (create, add_dataset, add_teacher: StructureWriter, structure_writer.py) and
finalizing come from one process; the shard writes (write_index_shard, write_shard) may come
from many processes at once, each owning different shards. Every shard is written whole in one
zarr write (after deleting any earlier attempt, so zarr never reads back a shard) and only then
gets its done mark, in its own store object: a crash leaves a shard without a mark, and a rerun
rewrites it entirely.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cache_format import layout, shards
from cache_format.errors import CacheNotFoundError, ConfigError, InvalidTokensError
from cache_format.locations import local_path
from cache_format.manifest import STATUS_CODES
from cache_format.shard_encode import check_tokens, encode_records, shard_object
from cache_format.stats import ChannelStats, merge_all
from cache_format.structure_writer import StructureWriter


class CacheWriter(StructureWriter):
    """Create or extend a cache (StructureWriter) and write its shards. Use `create` or `open`,
    not the class."""

    # -- index shards ----------------------------------------------------------------------
    def write_index_shard(self, dataset: str, shard: int, view_params: np.ndarray,
                          status: np.ndarray, fingerprints: np.ndarray | None = None) -> None:
        """Write one shard of the sample index: view parameters [n, P], status codes [n] and,
        for a dataset whose fingerprint names a `source_fingerprint` algorithm (required
        there, refused elsewhere), each sample's image's content fingerprint uint64 [n]."""
        start, stop = self.shard_bounds(dataset, shard)
        n, p = stop - start, len(self._manifest.view_param_names)
        view_params = np.asarray(view_params, dtype=np.float32)
        status = np.asarray(status)
        if view_params.shape != (n, p) or status.shape != (n,):
            raise ConfigError(
                f"dataset {dataset} index shard {shard}: expected view_params ({n}, {p}) and "
                f"status ({n},), found {view_params.shape} and {status.shape}")
        algorithm = self._dataset_fp(dataset).source_fingerprint
        if bool(algorithm) != (fingerprints is not None):
            raise ConfigError(
                f"dataset {dataset} index shard {shard}: the dataset records source "
                f"fingerprints ({algorithm!r}), none given" if algorithm else
                f"dataset {dataset} index shard {shard}: fingerprints given, but the dataset "
                "records none (its manifest entry names no source_fingerprint algorithm)",
                hint="pass fingerprints exactly when the dataset's fingerprint names an algorithm")
        if fingerprints is not None:
            fingerprints = np.asarray(fingerprints)
            if fingerprints.shape != (n,) or fingerprints.dtype != np.uint64:
                raise ConfigError(
                    f"dataset {dataset} index shard {shard}: expected fingerprints uint64 "
                    f"({n},), found {fingerprints.dtype} {fingerprints.shape}")
        unknown = sorted({int(c) for c in np.unique(status)} - {int(c) for c in STATUS_CODES})
        if unknown:
            raise ConfigError(f"dataset {dataset} index shard {shard}: unknown status codes "
                              f"{unknown}; known: {STATUS_CODES}")
        base = layout.dataset_path(dataset)
        meta = self._array(f"{base}/{layout.INDEX_META}")
        self._delete_chunk(meta, (shard, 0))
        self._clear_summary(base, (f"{base}/{layout.STATUSES}",))
        self._array(f"{base}/{layout.INDEX_ROWS}")[start:stop] = layout.pack_index_rows(
            view_params, status.astype(np.uint8), fingerprints)
        meta[shard] = layout.index_meta_row(status, len(self._manifest.status_codes))

    def index_shard_done(self, dataset: str, shard: int) -> bool:
        """Whether index shard `shard` of `dataset` was written completely."""
        self.shard_bounds(dataset, shard)
        meta = self._array(f"{layout.dataset_path(dataset)}/{layout.INDEX_META}")
        return int(meta[shard, 0]) == layout.MARK_DONE

    def index_rows(self, dataset: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(view parameters float32 [n, P], statuses uint8 [n]) of an index shard, as stored."""
        params, status, _ = self.index_rows_fingerprinted(dataset, shard)
        return params, status

    def index_rows_fingerprinted(self, dataset: str, shard: int
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(view parameters, statuses, source fingerprints uint64 [n] or None when the dataset
        records none) of an index shard, as stored."""
        start, stop = self.shard_bounds(dataset, shard)
        rows = self._array(f"{layout.dataset_path(dataset)}/{layout.INDEX_ROWS}")[start:stop]
        p = len(self._manifest.view_param_names)
        prints = (layout.unpack_fingerprints(rows, p)
                  if self._dataset_fp(dataset).source_fingerprint else None)
        return layout.unpack_view_params(rows, p), np.array(rows[:, -1]), prints

    def finalize_index(self, dataset: str) -> dict[int, int]:
        """Consolidate a complete index: write its statuses in large chunks (`status`), then its
        `summary` (complete mark and samples per status code), which readers then read instead
        of one object per shard. Refuses (CacheNotFoundError) while index shards are missing.
        Returns {status code: samples}. Idempotent."""
        base = layout.dataset_path(dataset)
        meta = self._array(f"{base}/{layout.INDEX_META}")[:]
        missing = np.nonzero(meta[:, 0] != layout.MARK_DONE)[0]
        if missing.size:
            raise CacheNotFoundError(
                f"{self.location}: dataset {dataset} has {missing.size} index shard(s) not "
                f"written (first: {missing[:10].tolist()})",
                hint="finish the index (`dune-cache build` resumes), then finalize")
        rows, status = (self._array(f"{base}/{name}")
                        for name in (layout.INDEX_ROWS, layout.STATUSES))
        n = self.num_samples(dataset)
        for start in range(0, n, layout.STATUS_CHUNK):  # whole chunks, a bounded buffer
            stop = min(start + layout.STATUS_CHUNK, n)
            status[start:stop] = rows[start:stop, rows.shape[1] - 1]
        summary = np.concatenate([[layout.MARK_DONE], meta[:, 1:].sum(axis=0)]).astype(np.int64)
        self._array(f"{base}/{layout.SUMMARY}")[:] = summary
        return {code: int(k) for code, k in enumerate(summary[1:].tolist()) if k}

    def _delete_chunk(self, array: zarr.Array, coords: tuple[int, ...]) -> None:
        """Delete one chunk object of `array` (a no-op when it does not exist)."""
        key = array.metadata.encode_chunk_key(coords)
        store_path = array.store_path
        sync(store_path.store.delete(f"{store_path.path}/{key}" if store_path.path else key))

    def _clear_summary(self, base: str, also: tuple[str, ...] = ()) -> None:
        """Before a shard of a finalized dataset or pair is rewritten: delete its summary (then
        the consolidated arrays in `also`), so that no reader trusts them any longer. Reads one
        object and writes nothing when there is no summary (the builder's case)."""
        summary = self._array(f"{base}/{layout.SUMMARY}")
        if int(summary[0]) == 0:
            return
        self._delete_chunk(summary, (0,))
        for path in also:
            self._array(path)[:] = 0

    # -- repair -----------------------------------------------------------------------------
    def forget_summary(self, dataset: str, teacher: str = "") -> None:
        """Delete a damaged summary (a pair's; with no teacher, the dataset's summary and
        consolidated statuses) without reading it; the next build merges or consolidates again
        from the shards' rows."""
        if teacher:
            self._teacher_fp(dataset, teacher)
            base = layout.teacher_path(dataset, teacher)
            self._delete_chunk(self._array(f"{base}/{layout.SUMMARY}"), (0,))
            return
        base = layout.dataset_path(dataset)
        self._delete_chunk(self._array(f"{base}/{layout.SUMMARY}"), (0,))
        statuses = self._array(f"{base}/{layout.STATUSES}")
        for chunk in range(shards.num_shards(statuses.shape[0], statuses.chunks[0])):
            self._delete_chunk(statuses, (chunk,))

    def forget_shard(self, dataset: str, teacher: str, shard: int) -> None:
        """Mark a damaged token shard as never written: delete its metadata row (its done mark)
        and the pair's summary, without reading either (they may be what is damaged). The next
        build recomputes exactly that shard and merges the statistics again."""
        self._teacher_fp(dataset, teacher)
        self.shard_bounds(dataset, shard)
        base = layout.teacher_path(dataset, teacher)
        self._delete_chunk(self._array(f"{base}/{layout.SUMMARY}"), (0,))
        self._delete_chunk(self._array(f"{base}/{layout.SHARD_META}"), (shard, 0))

    def forget_index_shard(self, dataset: str, shard: int) -> None:
        """Mark a damaged index shard as never written: delete the dataset's summary and
        consolidated statuses, then the shard's metadata row. The next build rewrites the same
        rows (views are a pure function of the seed) and consolidates the statuses again."""
        self.shard_bounds(dataset, shard)
        self.forget_summary(dataset)
        base = layout.dataset_path(dataset)
        self._delete_chunk(self._array(f"{base}/{layout.INDEX_META}"), (shard, 0))

    # -- token shards ----------------------------------------------------------------------
    def shard_done(self, dataset: str, teacher: str, shard: int) -> bool:
        """Whether token shard `shard` of (dataset, teacher) was written completely."""
        self._teacher_fp(dataset, teacher)
        self.shard_bounds(dataset, shard)
        meta = self._array(f"{layout.teacher_path(dataset, teacher)}/{layout.SHARD_META}")
        return int(meta[shard, 0]) == layout.MARK_DONE
    def write_shard(self, dataset: str, teacher: str, shard: int,
                    tokens: Mapping[str, np.ndarray], valid: np.ndarray) -> None:
        """Encode and write one whole token shard, its partial statistics, then its done mark.

        `tokens` maps each token type of the teacher to float32 "patch" [n, T, D] / "cls" [n, D]
        (n = samples in the shard); `valid[n]` marks the samples that were computed (status ok):
        only those are checked, stored and counted in the statistics; the others are stored as
        zeros. NaN/Inf in a valid row raises InvalidTokensError before anything is written.
        """
        fp = self._teacher_fp(dataset, teacher)
        spec, m = self._manifest.encoding, self._manifest
        start, stop = self.shard_bounds(dataset, shard)
        n = stop - start
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (n,):
            raise InvalidTokensError(f"{dataset}/{teacher} shard {shard}: expected valid of shape "
                                     f"({n},) (samples {start}..{stop - 1}), found {valid.shape}")
        arrays = check_tokens(dataset, teacher, shard, start, fp, tokens, valid, m.num_tokens)
        base = layout.teacher_path(dataset, teacher)
        calibration = ({tok: self.calibration(dataset, teacher, tok) for tok in arrays}
                       if spec.has_scale else {})
        records, part_stats, outside = encode_records(spec, fp, m.num_tokens, arrays, valid,
                                                      calibration)
        meta = self._array(f"{base}/{layout.SHARD_META}")
        self._delete_chunk(meta, (shard, 0))
        self._clear_summary(base)
        self._write_whole_shard(f"{base}/{layout.TOKENS}", shard, start, stop, records)
        columns = layout.PairColumns(fp.token_types, fp.dim)
        meta[shard] = columns.row(layout.MARK_DONE, int(valid.sum()), part_stats,
                                  outside if spec.has_scale else None)

    def _write_whole_shard(self, path: str, shard: int, start: int, stop: int,
                           values: np.ndarray) -> None:
        """Delete any earlier attempt of the shard object, then write the shard in one call.

        Deleting first matters: zarr merges a write into an existing shard by reading it, which
        would fail on (or keep bytes of) a damaged earlier attempt. Uncompressed records are
        written as the object zarr would write (shard_encode.shard_object), in one store call.
        """
        array = self._array(path)
        coords = (shard,) + (0,) * (array.ndim - 1)
        self._delete_chunk(array, coords)
        if self._manifest.encoding.codec != "none":
            array[start:stop] = values
            return
        data = shard_object(values, self._manifest.samples_per_shard)
        if data is not None:
            key = array.metadata.encode_chunk_key(coords)
            store_path = array.store_path
            sync(store_path.store.set(f"{store_path.path}/{key}" if store_path.path else key,
                                      default_buffer_prototype().buffer.from_bytes(data)))

    def shard_nbytes(self, dataset: str, teacher: str, shard: int) -> int:
        """Stored bytes of a token shard's data object (local caches; 0 for URLs)."""
        array = self._array(f"{layout.teacher_path(dataset, teacher)}/{layout.TOKENS}")
        key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
        local = local_path(self.location)
        if local is None:
            return 0
        path = os.path.join(local, array.path, key)
        return os.path.getsize(path) if os.path.exists(path) else 0

    def finalize_stats(self, dataset: str, teacher: str, *,
                       allow_incomplete: bool = False) -> dict[str, ChannelStats]:
        """Merge the per-shard partial statistics into the pair's final statistics (exact).

        Refuses (CacheNotFoundError listing them) while shards lack their done mark, unless
        `allow_incomplete`, which merges the done shards only.
        """
        fp = self._teacher_fp(dataset, teacher)
        base = layout.teacher_path(dataset, teacher)
        columns = layout.PairColumns(fp.token_types, fp.dim)
        rows = self._array(f"{base}/{layout.SHARD_META}")[:]
        done = rows[:, 0] == layout.MARK_DONE
        if not allow_incomplete and not done.all():
            missing = np.nonzero(~done)[0]
            raise CacheNotFoundError(
                f"{self.location}: {dataset}/{teacher} has {missing.size} shard(s) without a "
                f"done mark (first: {missing[:10].tolist()}); statistics would be incomplete",
                hint="finish writing the shards, or pass allow_incomplete=True",
            )
        parsed = [columns.parse(rows[i]) for i in np.nonzero(done)[0]]
        result = {tok: merge_all((p[2][tok] for p in parsed), fp.dim)
                  for tok in fp.token_types}
        mark = layout.MARK_DONE if done.all() else layout.MARK_PARTIAL
        counts = [columns.out_of_range(rows[i]) for i in np.nonzero(done)[0]]
        out_of_range = {tok: (sum(c[tok][0] for c in counts), sum(c[tok][1] for c in counts))
                        for tok in fp.token_types}
        self._array(f"{base}/{layout.SUMMARY}")[:] = columns.row(
            mark, sum(p[1] for p in parsed), result, out_of_range)
        return result
