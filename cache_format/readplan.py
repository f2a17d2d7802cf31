"""What a batch read of a cache needs, worked out once per (dataset, teachers): the reader's
plan of which record array to read per teacher, where each token type's values and scale sit
in a record, the output arrays a batch is read into, and the prepared outputs of a one-sample
read (see reader.py, which owns the plans).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

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


def _tensor_guard(tensor: torch.Tensor) -> list:
    """SampleSlot's record of one tensor, its reference count still to fill in."""
    storage = tensor.untyped_storage()
    return [tensor, 0, tensor._version, tensor.data_ptr(), storage, storage._cdata,
            _storage_use_count(storage._cdata)]  # type: ignore[misc]


class SampleSlot:
    """The outputs of a one-sample read of one plan, prepared once and handed out again while
    nobody outside the reader holds any part of them (see `free`).

    Wrapping a record's fields as torch tensors (torch.from_numpy, about 2 us each) and as
    EncodedTokens cost as much as the rest of a small record's read together, so a slot keeps
    them: a read fills the slot's record buffers in place and returns new dicts of the same
    EncodedTokens objects.
    """

    __slots__ = ("targets", "_parts", "_encoded", "_tensors")

    def __init__(self, plan: ReadPlan) -> None:
        arrays = plan.outputs(1)
        #: What ShardReader.read fills: each part's whole record buffer (its fields view it).
        self.targets = [(part.records, (arrays[part.start].base,)) for part in plan.parts]
        tensors = [torch.from_numpy(array) for array in arrays]
        self._parts = tuple(
            (part.teacher, tuple(
                (tok.tok, EncodedTokens._of(tensors[tok.values],
                                            None if tok.scale is None else tensors[tok.scale],
                                            plan.spec, tok.calib_mean, tok.calib_std))
                for tok in part.toks))
            for part in plan.parts)
        # What `free` compares, per EncodedTokens: [object, Python references]; per tensor:
        # [tensor, references, version counter (every in-place op, metadata ones included,
        # bumps it), data pointer (share_memory_ and `.data =` move the data without bumping
        # the version), its storage (held, so that the use count reads a live object), the
        # storage's address, the storage's use count (views and t.numpy() arrays add to it)].
        self._encoded = [[enc, 0] for _, encs in self._parts for _, enc in encs]
        self._tensors = ([] if _storage_use_count is None
                         else [_tensor_guard(tensor) for tensor in tensors])
        del tensors  # the counts below are of the slot's own references only
        count = sys.getrefcount
        # The same references `free` sees: the slot's lists, the loop variable, the argument.
        for guard in self._encoded:
            enc = guard[0]
            guard[1] = count(enc)
        for guard in self._tensors:
            tensor = guard[0]
            guard[1] = count(tensor)

    def free(self) -> bool:
        """Nobody outside holds the slot's EncodedTokens, tensors or views of them, and no
        tensor was changed in place or moved: the slot may be filled again. (A slot whose
        tensor was changed in place stays out of reuse for good.)"""
        if _storage_use_count is None:
            return False
        count = sys.getrefcount
        for enc, refs in self._encoded:
            if count(enc) != refs:
                return False
        for tensor, refs, version, pointer, _, address, uses in self._tensors:
            if (count(tensor) != refs or tensor._version != version
                    or _storage_use_count(address) != uses or tensor.data_ptr() != pointer):
                return False
        return True

    def result(self) -> dict[str, dict[str, EncodedTokens]]:
        """{teacher: {tok: EncodedTokens}}: new dicts (the caller's to change) of the slot's
        objects."""
        return {teacher: dict(encs) for teacher, encs in self._parts}
