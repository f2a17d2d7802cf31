"""What a batch read of a cache needs, worked out once per (dataset, teachers): the reader's
plan of which record array to read per teacher, where each token type's values and scale sit
in a record, the output arrays a batch is read into, and the prepared outputs of a one-sample
read (see reader.py, which owns the plans).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from cache_format.encodings import EncodingSpec
from cache_format.layout import RecordField
from cache_format.records import EncodedTokens
from cache_format.sharded_layout import ShardedLayout

#: How many tensors share a storage (torch's own count; views and t.numpy() arrays add to it).
#: Private to torch: without it no slot counts as free, so every one-sample read builds a new
#: SampleSlot (buffers and tensors), slower but still correct.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
if not getattr(sys, "_is_gil_enabled", lambda: True)():
    # Free-threaded Python: another thread's references are not in sys.getrefcount's exact
    # count, so "nobody else holds it" cannot be told: never reuse a slot.
    _storage_use_count = None


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
        """New output arrays of a batch of `batch` samples, part by part, field by field: one
        C-contiguous [batch, ...] array per field, so every tensor of a batch is dense. (A
        one-sample read fills a SampleSlot instead.)"""
        return [np.empty((batch, *f.shape), dtype=f.dtype)
                for part in self.parts for f in part.fields]


def plan_outputs(key: tuple[ReadPlan, int]) -> list[np.ndarray]:
    """New output arrays for the BufferPool key (plan, batch size)."""
    plan, batch = key
    return plan.outputs(batch)


def field_array(records: np.ndarray, field: RecordField) -> np.ndarray:
    """Field `field` of every record in `records[n, R]`, as a new C-contiguous [n, ...] array."""
    raw = np.ascontiguousarray(records[:, field.offset : field.offset + field.nbytes])
    return raw.view(field.dtype).reshape(records.shape[0], *field.shape)


def _field_tensor(record: torch.Tensor, field: RecordField) -> torch.Tensor:
    """Field `field` of a one-sample record tensor (uint8 [R]) as a [1, *shape] tensor of its
    dtype that shares the record's storage and version counter, and is no view of it
    (`_base` is None: a caller can reach no tensor of the slot that `free` does not watch).

    The byte range is shaped first and reinterpreted last: `view(dtype)` makes a
    non-differentiable alias (same storage, same version counter, no base), where a shape
    view of it would be a view whose `_base` is an intermediate tensor the slot does not hold.
    Fields sit at multiples of their item size (layout.record_fields), as `view(dtype)` needs.
    """
    data = record[field.offset : field.offset + field.nbytes]
    if field.shape:
        *lead, last = field.shape
        data = data.view(1, *lead, last * field.dtype.itemsize)
    return data.view(torch.from_numpy(np.empty(0, field.dtype)).dtype)


def _slot_parts(plan: ReadPlan) -> tuple[list, tuple, list, list, list]:
    """A new SampleSlot's read targets, result parts and guards (reference counts to fill in:
    see SampleSlot.__init__)."""
    targets, records, tensors = [], [], []
    for part in plan.parts:
        buffer = np.empty((1, part.records.sample_nbytes), dtype=np.uint8)  # one row
        plain = part.records.sample_nbytes + 4 if part.records.compressor == "none" else -1
        targets.append((part.records, [buffer, bytearray(4)], plain))
        record = torch.from_numpy(buffer[0])
        records.append(record)
        tensors += [_field_tensor(record, f) for f in part.fields]
    parts = tuple((part.teacher, {tok.tok: EncodedTokens._of(
        tensors[tok.values], None if tok.scale is None else tensors[tok.scale], plan.spec,
        tok.calib_mean, tok.calib_std) for tok in part.toks}) for part in plan.parts)
    encoded = [[enc, 0] for _, encs in parts for enc in encs.values()]
    fields = [[tensor, 0, tensor.data_ptr()] for tensor in tensors]
    guards = []
    if _storage_use_count is not None:
        for record in records:
            storage = record.untyped_storage()
            guards.append((record._version, record, storage, storage._cdata,
                           _storage_use_count(storage._cdata)))
    return targets, parts, encoded, fields, guards


class SampleSlot:
    """The outputs of a one-sample read of one plan, prepared once and handed out again while
    nobody outside the reader holds any part of them (see `free`).

    Wrapping a record's fields as torch tensors (about 2 us each) and as EncodedTokens cost as
    much as the rest of a small record's read together, so a slot keeps them: a read fills
    the slot's record buffers in place (one buffer per part, read whole with its checksum:
    one destination and one checksum pass are faster than scattered ones) and returns new
    dicts of the same EncodedTokens objects.

    `free` runs on every one-sample read, just after a record has streamed through the CPU
    caches, where each question to torch costs about 0.2 us of cache misses: the field tensors
    of a part are aliases of one record tensor (one storage, one version counter), so the
    storage and version questions are asked once per part, not once per field.
    """

    __slots__ = ("targets", "_parts", "_encoded", "_fields", "_records")

    def __init__(self, plan: ReadPlan) -> None:
        #: What ShardReader.read_records fills: per part, its record array, the scatter list
        #: of one positional read (the record buffer, the 4 bytes of the stored checksum) and
        #: the chunk length of an uncompressed record (-1: compressed, no inline read).
        self.targets: list[tuple[ShardedLayout, list[Any], int]]
        # What `free` compares. Per EncodedTokens: [object, Python references]. Per field
        # tensor: [tensor, references, data pointer (share_memory_ and `.data =` move data
        # without bumping the version)]. Per record tensor (no caller's to hold: the fields
        # are no views of it, their `_base` is None): (version counter, shared by its fields:
        # every in-place op on any of them, metadata ones included, bumps it; the tensor; its
        # storage, held so that the use count reads a live object; the storage's address;
        # its use count: a view of any field, or any tensor sharing the storage, adds to it).
        self.targets, self._parts, self._encoded, self._fields, self._records = (
            _slot_parts(plan))
        # Built in a function whose locals are gone: the counts below are of the slot's own
        # references only, the same references `free` sees (the guard containers, the loop
        # variable, getrefcount's argument).
        count = sys.getrefcount
        for guard in self._encoded:
            enc = guard[0]
            guard[1] = count(enc)
        for guard in self._fields:
            tensor = guard[0]
            guard[1] = count(tensor)
        # Frozen as tuples (one object each instead of a list and its item array: fewer cache
        # misses in `free`); each object keeps exactly one guard's reference, so the counts hold.
        self._encoded = tuple(map(tuple, self._encoded))
        self._fields = tuple(map(tuple, self._fields))
        self._records = tuple(self._records)

    def free(self) -> bool | None:
        """True: nobody outside holds the slot's EncodedTokens, tensors or views of them, and
        no tensor was changed in place or moved, so the slot may be filled again. False: held
        (it may be free later). None: a tensor was changed in place or moved; the slot is
        never free again (BufferPool drops it)."""
        if _storage_use_count is None:
            return None
        count = sys.getrefcount
        for enc, refs in self._encoded:
            if count(enc) != refs:
                return False
        for tensor, refs, pointer in self._fields:
            if count(tensor) != refs:
                return False
            if tensor.data_ptr() != pointer:
                return None
        for version, record, _, address, uses in self._records:
            if record._version != version:
                return None
            if _storage_use_count(address) != uses:
                return False
        return True

    def result(self) -> dict[str, dict[str, EncodedTokens]]:
        """{teacher: {tok: EncodedTokens}}: new dicts (the caller's to change) of the slot's
        objects."""
        if len(self._parts) == 1:  # one teacher, the common case: no comprehension frame
            (teacher, encs), = self._parts
            return {teacher: encs.copy()}
        return {teacher: encs.copy() for teacher, encs in self._parts}
