"""Teacher targets for a batch: decoded from the cache on the device, or computed live.

Both providers answer `targets(batch) -> Targets`, a dict `{teacher: {"cls": [B, D] (when the
teacher has one), "patch": [B, T, D]}}` of float32 tensors on the device, with
`Targets.presence` (bool [B, n_teachers], the batch's presence) beside it. Rows where a teacher
has no features (data-sharing strategy `own`) are zeros in its tensors and False in presence:
the loss and the teacher statistics must mask them (they never stand for a teacher output).

- `CachedTargets` decodes the batch's encoded tokens on the device with `decode_tokens_torch`
  (int8 with the calibration of each row's dataset).
- `OnlineTargets` runs the cache's own teachers (same architecture and weights, checked against
  the manifest's fingerprints) on `batch.images`, the very views the cache was built from,
  exactly as stage one does: resize to the teacher's input size (`resize_for_teacher`),
  normalize with its mean / std, `forward_tokens` without gradients (bf16 autocast on CUDA).
  It is the reference's way of training and the baseline for the cached-vs-online parity.

Online mode is the only part of stage two that needs stage one's teacher code, and the only
reader of the manifest's `build_config` (the record of how each teacher was loaded): both are
imported in `_load_cached_teachers` alone, when online targets are built, so that a cached run
never imports the teacher registry, its models or the builder's config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cache_format.encodings import decode_tokens_torch
from cache_format.errors import CacheMismatchError, ConfigError
from cache_format.manifest import TOKEN_TYPES, Manifest
from cache_format.reader import CacheReader
from cache_format.serde import from_dict
from precompute.render import normalize, resize_for_teacher
from train.batch import Batch
from train.preflight import select_names

if TYPE_CHECKING:  # annotations only: the teacher code is imported when online targets are built
    from precompute.teachers.loaded import LoadedTeacher


class Targets(dict[str, dict[str, Tensor]]):
    """`{teacher: {tok: float32 tensor [B, ...]}}` plus `presence` (bool [B, n_teachers]).

    Absent rows hold zeros; mask them with `presence[:, teacher_names.index(t)]`.
    """

    def __init__(
        self,
        tokens: Mapping[str, dict[str, Tensor]],
        presence: Tensor,
        teacher_names: tuple[str, ...],
    ) -> None:
        super().__init__(tokens)
        self.presence = presence
        self.teacher_names = teacher_names

    def present(self, teacher: str) -> Tensor:
        """bool [B]: the rows where `teacher` has features."""
        return self.presence[:, self.teacher_names.index(teacher)]


def _check_batch(batch: Batch, teacher_names: tuple[str, ...], who: str) -> None:
    if tuple(batch.teacher_names) != teacher_names:
        raise ConfigError(
            f"{who}: the batch carries teachers {list(batch.teacher_names)} but the targets were "
            f"built for {list(teacher_names)}; build both from the same teacher list, in order"
        )


def _zeros(batch_size: int, dims: int, tok: str, num_tokens: int, device: torch.device) -> Tensor:
    shape = (batch_size, num_tokens, dims) if tok == "patch" else (batch_size, dims)
    return torch.zeros(shape, dtype=torch.float32, device=device)


class CachedTargets:
    """Targets decoded from the batch's encoded tokens, on `device`.

    `reader` supplies the encoding and the int8 calibration of each (dataset, teacher, token
    type); `teachers` must be the batch's teacher list (None = all of the cache's).
    """

    def __init__(
        self,
        reader: CacheReader,
        teachers: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        manifest = reader.manifest
        self.reader = reader
        self.device = torch.device(device)
        self.spec = manifest.encoding
        self.num_tokens = manifest.num_tokens
        self.teacher_names = select_names("teachers", teachers, manifest, reader.location)
        fps = {t: manifest.teachers[t] for t in self.teacher_names}
        self.dims: dict[str, int] = {t: fp.dim for t, fp in fps.items()}
        self.token_types: dict[str, tuple[str, ...]] = {
            t: tuple(tok for tok in TOKEN_TYPES if tok in fp.token_types)
            for t, fp in fps.items()
        }
        self._calib: dict[tuple[str, str, str], tuple[Tensor, Tensor]] = {}

    def _calibration(self, dataset: str, teacher: str, tok: str) -> tuple[Tensor, Tensor]:
        """int8 calibration of a (dataset, teacher, tok), moved to the device once."""
        key = (dataset, teacher, tok)
        if key not in self._calib:
            calib = self.reader.calibration(dataset, teacher, tok)
            if calib is None:
                raise CacheMismatchError(f"{self.reader.location}: no int8 calibration for {key}")
            self._calib[key] = (calib[0].to(self.device), calib[1].to(self.device))
        return self._calib[key]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Targets:
        """float32 targets of every selected teacher for every row (zeros where absent)."""
        _check_batch(batch, self.teacher_names, "CachedTargets")
        n = len(batch)
        out: dict[str, dict[str, Tensor]] = {}
        dataset_rows = None
        for teacher in self.teacher_names:
            out[teacher] = {}
            encoded = batch.tokens.get(teacher, {})
            rows = batch.rows.get(teacher)
            for tok in self.token_types[teacher]:
                full = _zeros(n, self.dims[teacher], tok, self.num_tokens, self.device)
                out[teacher][tok] = full
                if rows is None or tok not in encoded:
                    continue
                enc = encoded[tok]
                rows_dev = rows.to(self.device, non_blocking=True)
                values = enc.values.to(self.device, non_blocking=True)
                scale = None if enc.scale is None else enc.scale.to(self.device, non_blocking=True)
                if not self.spec.has_scale:
                    full.index_copy_(0, rows_dev, decode_tokens_torch(values, scale, self.spec))
                    continue
                # int8: each dataset has its own calibration; decode row groups per dataset.
                if dataset_rows is None:
                    dataset_rows = batch.dataset.cpu()
                row_datasets = dataset_rows[rows.cpu()]
                for d in torch.unique(row_datasets).tolist():
                    sel = torch.nonzero(row_datasets == d).squeeze(1).to(self.device)
                    mean, std = self._calibration(batch.dataset_names[d], teacher, tok)
                    decoded = decode_tokens_torch(
                        values.index_select(0, sel),
                        None if scale is None else scale.index_select(0, sel),
                        self.spec,
                        mean,
                        std,
                    )
                    full.index_copy_(0, rows_dev.index_select(0, sel), decoded)
        return Targets(out, batch.presence.to(self.device), self.teacher_names)


class OnlineTargets:
    """Targets computed live by the cache's own teachers on `batch.images` (see module doc).

    The teachers are rebuilt from the manifest's build config (`_load_cached_teachers`): each
    must reproduce the cached fingerprint (checkpoint sha256 or random-init seed, architecture,
    dims, patch size, token types, normalization), else CacheMismatchError. Its checkpoint file
    must therefore still be where the build read it. A `factory:` teacher named in the cache is
    refused unless `DUNE_TRUST_CACHE_CODE=1` (a cache never makes us import its code).
    """

    def __init__(
        self,
        manifest: Manifest,
        teachers: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.grid: tuple[int, int] = (int(manifest.grid[0]), int(manifest.grid[1]))
        self.num_tokens = manifest.num_tokens
        self.teacher_names = select_names("teachers", teachers, manifest, "OnlineTargets")
        self.teachers = _load_cached_teachers(manifest, self.teacher_names, self.device)
        self.dims: dict[str, int] = {t: m.dim for t, m in self.teachers.items()}
        self.token_types: dict[str, tuple[str, ...]] = {
            t: tuple(tok for tok in TOKEN_TYPES if tok in m.token_types)
            for t, m in self.teachers.items()
        }
        self.input_sizes: dict[str, tuple[int, int]] = {
            t: m.input_size(self.grid) for t, m in self.teachers.items()
        }

    def forward_teacher(self, teacher: str, images: Tensor) -> dict[str, Tensor]:
        """One teacher's float32 tokens for rendered views [b, 3, H, W] in [0, 1]."""
        model = self.teachers[teacher]
        x = resize_for_teacher(images.to(self.device, torch.float32), self.input_sizes[teacher])
        x = normalize(x, model.mean, model.std)
        use_bf16 = self.device.type == "cuda"
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16),
        ):
            return model.forward_tokens(x)

    def __call__(self, batch: Batch) -> Targets:
        """float32 targets of every teacher, computed on its present rows only (zeros elsewhere)."""
        _check_batch(batch, self.teacher_names, "OnlineTargets")
        n = len(batch)
        presence = batch.presence.to(self.device)
        images = batch.images.to(self.device)
        out: dict[str, dict[str, Tensor]] = {}
        for t, teacher in enumerate(self.teacher_names):
            rows = torch.nonzero(presence[:, t]).squeeze(1)
            out[teacher] = {
                tok: _zeros(n, self.dims[teacher], tok, self.num_tokens, self.device)
                for tok in self.token_types[teacher]
            }
            if rows.numel() == 0:
                continue
            tokens = self.forward_teacher(teacher, images.index_select(0, rows))
            for tok, value in tokens.items():
                out[teacher][tok].index_copy_(0, rows, value.float())
        return Targets(out, presence, self.teacher_names)


def _load_cached_teachers(
    manifest: Manifest, names: Sequence[str], device: torch.device
) -> dict[str, LoadedTeacher]:
    """The cache's teachers, rebuilt from the manifest's build config and checked against their
    fingerprints. The one place stage two imports the teacher code and reads `build_config`."""
    from precompute.teachers.config import TeacherConfig
    from precompute.teachers.loaded import load_teacher
    from precompute.teachers.trust import check_cache_teachers

    stored = manifest.build_config.get("teachers")
    entries = {e.get("name"): e for e in stored or [] if isinstance(e, Mapping)}
    missing = [name for name in names if name not in entries]
    if missing:
        raise CacheMismatchError(
            f"OnlineTargets: the manifest's build_config does not say how teachers {missing} "
            "were loaded, so they cannot be rebuilt",
            hint="rebuild the cache with `dune-cache build`",
        )
    configs = {name: from_dict(TeacherConfig, dict(entries[name]),
                               where=f"build_config.teachers[{name}]") for name in names}
    # The manifest is untrusted input: a `factory:` teacher in it runs only when the user set
    # DUNE_TRUST_CACHE_CODE=1 (precompute/teachers/trust.py). Checked before any import.
    check_cache_teachers(configs.values(), "OnlineTargets")
    grid = (int(manifest.grid[0]), int(manifest.grid[1]))
    teachers = {}
    for name in names:
        teacher = load_teacher(configs[name], device)
        _check_fingerprint(teacher, manifest, grid)
        teachers[name] = teacher
    return teachers


def _check_fingerprint(teacher: LoadedTeacher, manifest: Manifest, grid: tuple[int, int]) -> None:
    """Refuse a rebuilt teacher whose weights or shape facts differ from the cached ones (every
    differing field named, through the manifest's own comparison)."""
    rebuilt: dict[str, Any] = {
        "checkpoint_sha256": teacher.checkpoint_sha256,
        "arch": teacher.arch,
        "dim": teacher.dim,
        "patch_size": teacher.patch_size,
        "input_size": tuple(teacher.input_size(grid)),
        "token_types": tuple(teacher.token_types),  # in the order the builder stores them
        "mean": tuple(float(v) for v in teacher.mean),
        "std": tuple(float(v) for v in teacher.std),
    }
    differ = manifest.differences(teachers={teacher.name: rebuilt})
    if differ:
        prefix = f"teachers.{teacher.name}."
        detail = "; ".join(f"{d.path.removeprefix(prefix)} is {d.expected!r} but the cache was "
                           f"built with {d.found!r}" for d in differ)
        raise CacheMismatchError(
            f"online teacher {teacher.name!r}: {detail}; online targets would not be the cached "
            "teacher's",
            hint="load the same weights the cache was built from (the checkpoint file where the "
            "build read it), or rebuild the cache",
        )
