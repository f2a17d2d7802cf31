"""Weights for teachers: read a checkpoint file safely, map its keys, report what does not fit.

Every teacher builder goes through `load_checkpoint_into`: read the file (`torch.load` with
`weights_only=True`, or safetensors), let the teacher's key mapper rename keys and set aside the
parts of a larger model it does not need (a decoder, a detection head), compare names and shapes
with the module, and refuse with a `CheckpointError` that lists every missing, unexpected and
mis-shaped key. The file's sha256 (streamed) goes into the cache manifest, so a cache records
exactly which weights produced it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache_format.errors import CheckpointError
from precompute.teachers.config import TeacherConfig

_LIST_LIMIT = 20  # names listed per category in an error; the count is always exact
_HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints are GBs: never read whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def random_init_id(seed: int) -> str:
    """What the manifest records as the checksum of randomly initialized weights."""
    return f"random-init:seed={seed}"


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a model's random init, restoring the caller's RNG after.

    Two processes that build the same architecture inside `seeded_init(s)` get bit-identical
    weights (same torch / timm versions), which the reproducibility tests rely on.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def initial_weights(seed: int, *, from_checkpoint: bool) -> Iterator[None]:
    """Context for building a teacher module: seeded random init, or no init at all.

    When a checkpoint will overwrite every weight, the module is built on the meta device (no
    memory, no init: a ViT-L's random init costs ~10 s on a CPU) and `load_checkpoint_into`
    assigns the file's tensors.
    """
    if from_checkpoint:
        with torch.device("meta"):
            yield
    else:
        with seeded_init(seed):
            yield


def read_checkpoint(path: str | Path, *, where: str) -> Any:
    """Load a `.pth` / `.pt` / `.bin` (pickle, weights only) or `.safetensors` file on the CPU.

    `argparse.Namespace` is allowed in addition to tensors and plain containers: the official
    MASt3R and Multi-HMR checkpoints store their training arguments as one; the weights-only
    unpickler rebuilds it from plain attribute values and runs no code.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(
            f"{where}.checkpoint: no file at {str(file)!r}",
            hint="download the checkpoint or fix the path",
        )
    try:
        if file.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader raises its own types; name the file in one error
        raise CheckpointError(
            f"{where}.checkpoint: cannot read {str(file)!r} as a weights-only checkpoint"
            f"{_unsafe_globals(file)}: {type(exc).__name__}: {exc}",
            hint="re-save the state dict with safetensors.torch.save_file from a trusted session",
        ) from exc


def _unsafe_globals(file: Path) -> str:
    """Which classes the pickle would need beyond plain weights (listed, never loaded)."""
    if file.suffix.lower() == ".safetensors":
        return ""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # not a readable zip pickle at all: the loader's own error says why
        return ""
    found = [name for name in found if name != "argparse.Namespace"]
    return f" (it needs {', '.join(found)})" if found else ""


def find_state_dict(
    obj: Any, container_keys: tuple[str, ...], *, path: str
) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: under the first of `container_keys` present, or the top.

    A `module.` prefix on every key (a model saved from DistributedDataParallel) is removed.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key in container_keys:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path}: no tensors found under {', '.join(container_keys) or '-'} or at the top "
            f"level; top-level keys: {_names(sorted(map(str, obj)))}"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


@dataclass
class MappedState:
    """A key mapper's result: tensors under the module's names, and what it set aside.

    `original_names` maps a renamed key back to its name in the file and `file_name` names a
    key the file lacks as the file would, so that errors speak the checkpoint's language;
    `ignored` lists keys that belong to the rest of a larger model.
    """

    tensors: dict[str, torch.Tensor]
    original_names: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    file_name: Callable[[str], str] | None = None


@dataclass(frozen=True)
class KeyReport:
    """How a mapped state dict fits a module: every missing, unexpected and mis-shaped key."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    ignored: int = 0

    @property
    def ok(self) -> bool:
        """True when the state dict fills the module exactly."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One readable line per problem category."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {_names(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} expected {tuple(e)} found {tuple(f)}" for k, e, f in self.mismatched]
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {_names(shown)}")
        return "; ".join(parts) if parts else "all keys match"


def _names(names: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    if len(names) > _LIST_LIMIT:
        shown += f", ... ({len(names) - _LIST_LIMIT} more)"
    return shown


def _shallow_first(key: str) -> tuple[int, str]:
    # top-level names (cls_token, pos_embed, norm.*) say more about a mix-up than block N's keys
    return key.count("."), key


def compare_keys(mapped: MappedState, expected: Mapping[str, torch.Tensor]) -> KeyReport:
    """Compare names and shapes of `mapped` with `expected` (a module's state dict)."""
    have, want = set(mapped.tensors), set(expected)
    in_file = mapped.file_name or (lambda key: key)
    missing = tuple(sorted((in_file(k) for k in want - have), key=_shallow_first))
    unexpected = tuple(
        sorted((mapped.original_names.get(k, k) for k in have - want), key=_shallow_first)
    )
    mismatched = tuple(
        (mapped.original_names.get(k, k), tuple(expected[k].shape), tuple(mapped.tensors[k].shape))
        for k in sorted(have & want)
        if tuple(expected[k].shape) != tuple(mapped.tensors[k].shape)
    )
    return KeyReport(missing, unexpected, mismatched, ignored=len(mapped.ignored))


Mapper = Callable[[dict[str, torch.Tensor], nn.Module], MappedState]


def load_checkpoint_into(
    target: nn.Module,
    checkpoint: str,
    mapper: Mapper,
    *,
    container_keys: tuple[str, ...],
    where: str,
    arch: str,
) -> str:
    """Fill `target` from `checkpoint` through `mapper`; return the file's sha256.

    `mapper(state, target)` renames keys and may adapt `target` to the file (a position
    embedding grid of another size); every other difference is a `CheckpointError` that lists
    the keys by name.
    """
    raw = read_checkpoint(checkpoint, where=where)
    state = find_state_dict(raw, container_keys, path=checkpoint)
    try:
        mapped = mapper(state, target)
    except CheckpointError as exc:  # a mapper knows what is wrong; we add which file
        raise CheckpointError(f"{where}.checkpoint: {checkpoint!r}: {exc}", hint=exc.hint) from exc
    expected = target.state_dict()
    report = compare_keys(mapped, expected)
    if not report.ok:
        raise CheckpointError(
            f"{where}.checkpoint: {checkpoint!r} does not fit {arch}: {report.describe()}",
            hint="check that `kind` (and any embed_dim/depth/num_heads override) matches the file",
        )
    # Assign (not copy) so that a module built on the meta device gets real tensors; cast to
    # the module's dtype so that an fp16 file still gives an fp32 teacher.
    tensors = {k: v.to(expected[k].dtype).contiguous() for k, v in mapped.tensors.items()}
    target.load_state_dict(tensors, strict=True, assign=True)
    unset = [n for n, t in (*target.named_parameters(), *target.named_buffers()) if t.is_meta]
    if unset:
        raise CheckpointError(
            f"{where}.checkpoint: {checkpoint!r} left {arch} without values for {_names(unset)}"
        )
    return sha256_file(checkpoint)


def teacher_weights(
    target: nn.Module, cfg: TeacherConfig, mapper: Mapper, *, container_keys: tuple[str, ...],
    arch: str,
) -> str:
    """What a teacher's weights are, as the manifest records them: `target` filled from
    `cfg.checkpoint` (the file's sha256), or without one the random-init id of `cfg.init_seed`
    (the module was built inside `initial_weights`, seeded)."""
    if cfg.checkpoint is None:
        return random_init_id(cfg.init_seed)
    return load_checkpoint_into(target, cfg.checkpoint, mapper, container_keys=container_keys,
                                where=cfg.where, arch=arch)
