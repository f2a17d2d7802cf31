"""What a batch read of a cache needs, worked out once per (dataset, teachers): the reader's
plan of which record array to read per teacher, where each token type's values and scale sit
in a record, and the output arrays a batch is read into (see reader.py, which owns the plans).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from cache_format.encodings import EncodingSpec
from cache_format.layout import RecordField
from cache_format.sharded_layout import ShardedLayout


class TokenSlot(NamedTuple):
    """Where one token type of a teacher lands in a batch's output arrays (indexes into the
    list `ReadPlan.outputs` returns) and the int8 calibration it decodes with."""

    tok: str
    values: int
    scale: int | None
    calib_mean: torch.Tensor | None
    calib_std: torch.Tensor | None


class PlanPart(NamedTuple):
    """One teacher of a batch read: its record array and fields, its outputs [start, stop),
    its token types, its done marks. A tuple, so the hot path unpacks it without lookups."""

    teacher: str
    records: ShardedLayout
    fields: tuple[RecordField, ...]
    start: int
    stop: int
    done: bytearray
    toks: tuple[TokenSlot, ...]


@dataclass(frozen=True, eq=False)  # hashed by identity: it keys the buffer pool
class ReadPlan:
    """What a batch of one dataset reads for some teachers (computed once per combination)."""

    key: tuple[str, tuple[str, ...]]
    num_samples: int
    samples_per_shard: int
    spec: EncodingSpec
    parts: tuple[PlanPart, ...]

    def outputs(self, batch: int) -> list[np.ndarray]:
        """New output arrays of a batch of `batch` samples: part by part, field by field.

        One sample: the fields of a part are views of one record buffer, which is read whole
        (one destination and one checksum pass are faster than scattered ones). More: one
        C-contiguous [batch, ...] array per field, so every tensor of a batch is dense.
        """
        arrays = []
        for part in self.parts:
            if batch == 1:
                record = np.empty((1, part.records.sample_nbytes), dtype=np.uint8)
                arrays += [record[0, f.offset : f.offset + f.nbytes].view(f.dtype)
                           .reshape(1, *f.shape) for f in part.fields]
            else:
                arrays += [np.empty((batch, *f.shape), dtype=f.dtype) for f in part.fields]
        return arrays


def plan_outputs(key: tuple[ReadPlan, int]) -> list[np.ndarray]:
    """New output arrays for the BufferPool key (plan, batch size)."""
    plan, batch = key
    return plan.outputs(batch)


def field_array(records: np.ndarray, field: RecordField) -> np.ndarray:
    """Field `field` of every record in `records[n, R]`, as a new C-contiguous [n, ...] array."""
    raw = np.ascontiguousarray(records[:, field.offset : field.offset + field.nbytes])
    return raw.view(field.dtype).reshape(records.shape[0], *field.shape)
