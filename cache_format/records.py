"""What the reader hands out: encoded token batches, shard blocks, reports, open settings.

The sample index lives in sample_index.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any

import torch

from cache_format.encodings import EncodingSpec, decode_tokens_torch
from cache_format.errors import ConfigError


@dataclass(frozen=True)
class EncodedTokens:
    """A batch of one token type of one teacher, as stored: decode with `decode()`.

    `values` [B, T, D] / [B, D] in the stored dtype (int8, float16, uint16 bf16 bit patterns,
    or uint8 [B, T, ceil(D/2)] / [B, ceil(D/2)] for int4 and int4h: two values per byte);
    `scale` [B, T] / [B] float32 for int8, [B, T, G] / [B, G] float16 for int4 and int4h, else
    None; calibration [D] for int8, int4 and int4h.
    """

    values: torch.Tensor
    scale: torch.Tensor | None
    spec: EncodingSpec = field(default_factory=EncodingSpec)
    calib_mean: torch.Tensor | None = None
    calib_std: torch.Tensor | None = None

    @classmethod
    def _of(cls, values: torch.Tensor, scale: torch.Tensor | None, spec: EncodingSpec,
            calib_mean: torch.Tensor | None, calib_std: torch.Tensor | None) -> EncodedTokens:
        """The same object as the constructor builds, without the frozen dataclass __init__
        (about 1 us of the few a random read costs): for the reader's hot path."""
        obj = object.__new__(cls)
        fields = obj.__dict__
        fields["values"] = values
        fields["scale"] = scale
        fields["spec"] = spec
        fields["calib_mean"] = calib_mean
        fields["calib_std"] = calib_std
        return obj

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedTokens:
        """Move the tensors (values, scale, calibration) to `device`."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, values=move(self.values), scale=move(self.scale),
                       calib_mean=move(self.calib_mean), calib_std=move(self.calib_std))

    def pin_memory(self) -> EncodedTokens:
        """Page-locked copies of the batch tensors, for asynchronous host-to-device copies."""
        return replace(self, values=self.values.pin_memory(),
                       scale=None if self.scale is None else self.scale.pin_memory())

    def decode(self) -> torch.Tensor:
        """float32 tokens on the tensors' device."""
        return decode_tokens_torch(self.values, self.scale, self.spec, self.calib_mean,
                                   self.calib_std)


@dataclass(frozen=True)
class OpenSettings:
    """How a reader was opened: `open_cache`'s keyword arguments besides the path.

    A reader remembers them (`CacheReader.settings`) so that a process that reopens the cache,
    a DataLoader worker for one, opens it exactly as the parent did: same fsspec
    `storage_options` (credentials, endpoints), threads, checksum policy and local shard cache
    (`shard_cache_dir`, `shard_cache_bytes`: every worker of a node shares the folder).
    """

    threads: int = 4
    storage_options: Mapping[str, Any] | None = None
    index_cache_entries: int = 65536
    verify_checksums: bool = True
    sample_index_cache_bytes: int = 8 << 20
    shard_cache_dir: str | None = None
    shard_cache_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("threads", "index_cache_entries", "sample_index_cache_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"open_cache {name}: expected >= 1, found "
                                  f"{getattr(self, name)}")
        if self.shard_cache_dir and self.shard_cache_bytes < 1:
            raise ConfigError(f"open_cache shard_cache_bytes: expected >= 1 with "
                              f"shard_cache_dir={self.shard_cache_dir!r}, found "
                              f"{self.shard_cache_bytes}",
                              hint="give the local shard cache a size in bytes")
        if self.storage_options is not None:  # a private copy: the caller's dict may change
            object.__setattr__(self, "storage_options", dict(self.storage_options))

    def kwargs(self) -> dict[str, Any]:
        """The settings as `open_cache` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclass_fields(self)}


@dataclass(frozen=True)
class ShardBlock:
    """One shard of one (dataset, teacher): decoded tokens of samples [start, stop)."""

    shard: int
    start: int
    stop: int
    tokens: dict[str, torch.Tensor]


@dataclass(frozen=True)
class VerifyReport:
    """Result of `CacheReader.verify()`: damaged or inconsistent data (`problems`), token shards
    never written (`missing`), and what else a build still has to do (`incomplete`: index
    shards never written, statistics never merged), and which shards are damaged."""

    shards_checked: int
    problems: tuple[str, ...]
    missing: tuple[str, ...]
    incomplete: tuple[str, ...] = ()
    #: The shards found damaged, to recompute: (dataset, teacher, shard), teacher "" for an
    #: index shard. Damage outside shards (manifest, zarr.json, keys, calibration) is only in
    #: `problems`.
    damaged_shards: tuple[tuple[str, str, int], ...] = ()

    @property
    def ok(self) -> bool:
        """No damaged data (missing shards are reported separately)."""
        return not self.problems
