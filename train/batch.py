"""A collated training batch: images, ids, teacher presence and still-encoded teacher tokens.

`collate_cached` stacks the items of `train.data.CacheTrainData` (run in the DataLoader worker,
so numpy arrays become tensors there); `Batch.to` / `pin_memory` move it as a whole. Teacher
tokens cover only the rows where the teacher is present, so nothing can feed placeholder zeros
into a loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cache_format.records import EncodedTokens

__all__ = ["Batch", "EncodedBatch", "EncodedItem", "collate_cached", "split_encoded"]

# One item's tokens: {teacher: {token type: (values, scale or None)}}, as stored.
EncodedItem = dict[str, dict[str, tuple[np.ndarray, np.ndarray | None]]]


def split_encoded(encoded: Mapping[str, Mapping[str, EncodedTokens]], n: int
                  ) -> list[EncodedItem]:
    """Per-item views of a batch read ({teacher: {tok: EncodedTokens}} of n rows, as
    `CacheReader.read_encoded` returns it): what dataset items carry to `collate_cached`."""
    out: list[EncodedItem] = [{} for _ in range(n)]
    for teacher, toks in encoded.items():
        for tok, enc in toks.items():
            values = enc.values.numpy()
            scale = None if enc.scale is None else enc.scale.numpy()
            for i in range(n):
                out[i].setdefault(teacher, {})[tok] = (values[i],
                                                       None if scale is None else scale[i])
    return out


@dataclass
class EncodedBatch:
    """One teacher's token type for the present rows of a batch, still encoded."""

    values: Tensor  # [n_present, ...] int8 / float16 / uint16 (bf16 bits)
    scale: Tensor | None  # [n_present, ...] float32 (int8 only)


@dataclass
class Batch:
    """A collated batch. Teacher tokens cover only the rows where the teacher is present.

    `presence[b, t]` says whether teacher `teacher_names[t]` has features for row b;
    `rows[teacher]` lists those rows (ascending) and `tokens[teacher][tok]` holds their encoded
    tokens in that order. Absent rows are never materialised, so nothing can feed placeholder
    zeros into a loss. `domains` gives each row's domain name (teacher dropping uses it).
    """

    images: Tensor  # float32 [B, 3, H, W] in [0, 1], unnormalized
    dataset: Tensor  # long [B]
    domain: Tensor  # long [B]
    sample: Tensor  # long [B]
    presence: Tensor  # bool [B, n_teachers]
    teacher_names: tuple[str, ...]
    dataset_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    rows: dict[str, Tensor] = field(default_factory=dict)  # long [n_present] per teacher
    tokens: dict[str, dict[str, EncodedBatch]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def domains(self) -> tuple[str, ...]:
        """The domain name of each row."""
        return tuple(self.domain_names[i] for i in self.domain.tolist())

    def _map(self, fn: Any) -> Batch:
        return Batch(
            images=fn(self.images),
            dataset=fn(self.dataset),
            domain=fn(self.domain),
            sample=fn(self.sample),
            presence=fn(self.presence),
            teacher_names=self.teacher_names,
            dataset_names=self.dataset_names,
            domain_names=self.domain_names,
            rows={t: fn(r) for t, r in self.rows.items()},
            tokens={
                t: {
                    tok: EncodedBatch(fn(e.values), None if e.scale is None else fn(e.scale))
                    for tok, e in toks.items()
                }
                for t, toks in self.tokens.items()
            },
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor moved to `device` (encoded tokens stay encoded)."""
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader's pin_memory calls this)."""
        return self._map(lambda x: x.pin_memory())


def collate_cached(items: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack dataset items into a `Batch` (numpy arrays become tensors here, in the worker)."""
    if not items:
        raise ValueError("collate_cached: no items")
    teacher_names = tuple(items[0]["teacher_names"])
    presence = np.stack([np.asarray(it["presence"], dtype=bool) for it in items])
    rows: dict[str, Tensor] = {}
    tokens: dict[str, dict[str, EncodedBatch]] = {}
    for t, teacher in enumerate(teacher_names):
        present = np.flatnonzero(presence[:, t])
        # Online runs carry no tokens: presence alone then says which rows a teacher serves.
        if present.size == 0 or teacher not in items[int(present[0])]["tokens"]:
            continue
        rows[teacher] = torch.from_numpy(present.astype(np.int64))
        tokens[teacher] = {}
        for tok in items[int(present[0])]["tokens"][teacher]:
            pairs = [items[int(i)]["tokens"][teacher][tok] for i in present]
            values = torch.from_numpy(np.stack([p[0] for p in pairs]))
            scale = None
            if pairs[0][1] is not None:
                scale = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))
            tokens[teacher][tok] = EncodedBatch(values, scale)
    return Batch(
        images=torch.stack([it["image"] for it in items]),
        dataset=torch.tensor([int(it["dataset"]) for it in items], dtype=torch.long),
        domain=torch.tensor([int(it["domain"]) for it in items], dtype=torch.long),
        sample=torch.tensor([int(it["sample"]) for it in items], dtype=torch.long),
        presence=torch.from_numpy(presence),
        teacher_names=teacher_names,
        dataset_names=tuple(items[0]["dataset_names"]),
        domain_names=tuple(items[0]["domain_names"]),
        rows=rows,
        tokens=tokens,
    )
