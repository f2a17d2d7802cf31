"""What the reader hands out: encoded token batches, the sample index, shard blocks, reports."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cache_format.encodings import EncodingSpec, decode_tokens_torch
from cache_format.manifest import STATUS_OK


@dataclass(frozen=True)
class EncodedTokens:
    """A batch of one token type of one teacher, as stored: decode with `decode()`.

    `values` [B, T, D] / [B, D] in the stored dtype (int8, float16, or uint16 bf16 bit
    patterns); `scale` [B, T] / [B] float32 for int8, else None; calibration [D] for int8.
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
class SampleIndex:
    """A dataset's sample index: sample s is image s // V (key keys[s // V]), view s % V."""

    dataset: str
    keys: np.ndarray
    view_params: np.ndarray
    status: np.ndarray
    views_per_image: int
    view_param_names: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        """Number of samples (images x views)."""
        return int(self.status.shape[0])

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the samples whose status is ok (their tokens are stored)."""
        return self.status == STATUS_OK

    def key_of(self, sample: int) -> str:
        """Image key of `sample`."""
        return str(self.keys[sample // self.views_per_image])


@dataclass(frozen=True)
class ShardBlock:
    """One shard of one (dataset, teacher): decoded tokens of samples [start, stop)."""

    shard: int
    start: int
    stop: int
    tokens: dict[str, torch.Tensor]


@dataclass(frozen=True)
class VerifyReport:
    """Result of `CacheReader.verify()`: damaged chunks and shards still missing."""

    shards_checked: int
    problems: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """No damaged data (missing shards are reported separately)."""
        return not self.problems
