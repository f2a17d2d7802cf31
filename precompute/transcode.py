"""`dune-cache transcode`: derive a cache in another encoding from an existing one, no teacher.

Users build once at high precision (fp16 / bf16) and derive compact caches for ablations. The
new cache keeps the source's settings (grid, views, seed, shard size), datasets (keys, view
parameters, statuses: the same index) and teachers (fingerprints); only the encoding changes.
Each token shard is decoded from the source and encoded again, through the same writer a build
uses, so statistics are counted on the new cache's decoded values, exactly as a build does.
A calibrated target (int8, int4, int4h) is calibrated on the first `calibration_samples` ok
samples of each pair in index order (the build's rule), decoded from the source.

Resumable like a build: rerunning the same command skips datasets, index shards, pairs and
token shards already written (their done marks). The manifest's `origin` records the source
cache and its encoding; a rerun with another source or encoding is refused (CacheMismatchError).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cache_format.encodings import EncodingSpec, fit_calibration
from cache_format.errors import ConfigError
from cache_format.manifest import FORMAT_VERSION, STATUS_OK, DatasetFingerprint
from cache_format.reader import CacheReader, open_cache
from cache_format.serde import to_dict
from cache_format.writer import CacheWriter

#: Calibration sample of an int8 target when the source's build config does not name one.
DEFAULT_CALIBRATION_SAMPLES = 256


@dataclass(frozen=True)
class TranscodeReport:
    """What a transcode run did: token shards written now, and those found already done."""

    out: str
    encoding: str
    shards_written: int
    shards_skipped: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return to_dict(self)


def transcode(source: str, out: str, spec: EncodingSpec, *,
              calibration_samples: int | None = None) -> TranscodeReport:
    """Write (or finish writing) the cache `out`: `source`'s content in encoding `spec`.

    Every (dataset, teacher) pair of the source must be complete (its statistics final): a
    half-built source would give a cache that no rerun could finish.
    """
    written = skipped = 0
    with open_cache(source) as reader:
        _check_complete(reader)
        m = reader.manifest
        wanted = calibration_samples or int(m.build_config.get("build", {}).get(
            "calibration_samples", DEFAULT_CALIBRATION_SAMPLES))
        origin = {"transcoded_from": reader.location, "encoding": to_dict(m.encoding)}
        target = replace(m, format_version=FORMAT_VERSION, encoding=spec, teachers={},
                         datasets={}, assignment={}, origin=origin)
        writer = CacheWriter.create(out, target, exist_ok=True)
        if writer.manifest.build_config != m.build_config:
            writer.set_build_config(m.build_config)
        if m.replay is not None and writer.manifest.replay != m.replay:
            writer.set_replay(m.replay)
        for dataset, fp in m.datasets.items():
            _copy_index(reader, writer, dataset, fp)
            for teacher in reader.teachers_for(dataset):
                w, s = _transcode_pair(reader, writer, dataset, teacher, spec, wanted)
                written, skipped = written + w, skipped + s
    return TranscodeReport(writer.location, spec.name, written, skipped)


def _check_complete(reader: CacheReader) -> None:
    for dataset in reader.datasets:
        if not reader.index_complete(dataset):
            raise ConfigError(f"{reader.location}: dataset {dataset}'s index is not complete",
                              hint="finish the source's build first (`dune-cache build`)")
        for teacher in reader.teachers_for(dataset):
            if not reader.stats_final(dataset, teacher):
                raise ConfigError(
                    f"{reader.location}: {dataset}/{teacher} is not complete (statistics not "
                    "final); transcode reads complete pairs only",
                    hint="finish the source's build first (`dune-cache build`)")


def _copy_index(reader: CacheReader, writer: CacheWriter, dataset: str,
                fp: DatasetFingerprint) -> None:
    """The same keys, view parameters and statuses, index shard by index shard."""
    index = reader.index(dataset)
    if not writer.has_dataset(dataset):
        writer.add_dataset(fp, index.keys.tolist())
    status = index.status
    for shard in range(writer.num_shards(dataset)):
        if writer.index_shard_done(dataset, shard):
            continue
        start, stop = writer.shard_bounds(dataset, shard)
        params, prints = index.view_rows_of(np.arange(start, stop))
        writer.write_index_shard(dataset, shard, params, status[start:stop], prints)
    writer.finalize_index(dataset)  # idempotent


def _transcode_pair(reader: CacheReader, writer: CacheWriter, dataset: str, teacher: str,
                    spec: EncodingSpec, calibration_samples: int) -> tuple[int, int]:
    """Decode each token shard of the source and write it encoded; (written, skipped)."""
    fp = reader.manifest.teachers[teacher]
    status = reader.index(dataset).status
    if not writer.has_teacher(dataset, teacher):
        calibration = (_calibration(reader, dataset, teacher, status, calibration_samples)
                       if spec.has_scale else None)
        writer.add_teacher(dataset, fp, calibration)
    written = skipped = 0
    for block in reader.iter_shards(dataset, teacher):
        if writer.shard_done(dataset, teacher, block.shard):
            skipped += 1
            continue
        tokens = {tok: x.numpy() for tok, x in block.tokens.items()}
        writer.write_shard(dataset, teacher, block.shard, tokens,
                           status[block.start : block.stop] == STATUS_OK)
        written += 1
    writer.finalize_stats(dataset, teacher)
    return written, skipped


def _calibration(reader: CacheReader, dataset: str, teacher: str, status: np.ndarray,
                 wanted: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Calibration of a calibrated target (int8, int4, int4h) from the first `wanted` ok
    samples (the build's rule)."""
    ok = np.flatnonzero(status == STATUS_OK)[:wanted]
    if ok.size == 0:
        raise ConfigError(f"{reader.location}: {dataset} has no ok sample to calibrate "
                          f"{teacher} (int8, int4 and int4h need a calibration)")
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, ok.size, 64):
        batch = reader.read_encoded(dataset, ok[start : start + 64], [teacher])[teacher]
        for tok, enc in batch.items():
            parts.setdefault(tok, []).append(enc.decode().numpy().copy())
    return {tok: fit_calibration(np.concatenate(xs)) for tok, xs in parts.items()}
