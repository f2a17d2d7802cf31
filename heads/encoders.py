"""Frozen encoders behind one interface, named by one string (`--encoder` / ENCODER).

Every encoder is a `FrozenEncoder`: `forward_tokens(x) -> {"cls"?: [B, D], "patch": [B, T, D]}`
(float32, registers dropped, T = (H/p) * (W/p) row-major) for images normalized with its `mean`
and `std`, plus the facts a features cache records (name, arch, weights, patch size, width).

Encoder strings:
- `student:PATH[@TEACHER]`: a `dune-train export` folder, a run folder or one of its
  checkpoints; the student's own tokens, or through TEACHER's projector (heads/student.py).
- `dune:FILE.pth[@TEACHER]`: a released DUNE checkpoint (naver/dune layout), its encoder's
  tokens or TEACHER's projector output (heads/dune_checkpoint.py).
- `teacher:KIND`: a registered teacher kind (`dino2reg_vitlarge_14`, ...), weights from
  `checkpoint=` / `pretrained`, loaded exactly as `dune-cache build` loads it.
- `teacher:NAME@CONFIG`: the teacher called NAME in a `dune-cache build` config (a TOML file,
  or a cache folder, whose manifest stores its build config): same kind, weights, overrides and
  seed as the build. `teacher:*@CONFIG` names every teacher of the config.
- `timm:MODEL`: any timm ViT (the registry's `timm:` kind: `forward_features` tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cache_format.errors import ConfigError

if TYPE_CHECKING:
    from precompute.teachers.config import TeacherConfig

ENCODER_FORMS = ("student:PATH[@TEACHER]", "dune:FILE.pth[@TEACHER]", "teacher:KIND",
                 "teacher:NAME@CONFIG", "teacher:*@CONFIG", "timm:MODEL")


@dataclass(frozen=True, eq=False)
class FrozenEncoder:
    """A frozen encoder in eval mode and the facts that identify its features."""

    module: nn.Module
    name: str
    spec: str
    arch: str
    weights: str
    patch_size: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token_types: tuple[str, ...]

    @property
    def has_cls(self) -> bool:
        return "cls" in self.token_types

    @property
    def device(self) -> torch.device:
        first = next(iter(self.module.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Image (H, W) at which this encoder's token grid is `grid`."""
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens of normalized images [B, 3, H, W] (sides multiples of the patch), float32."""
        with torch.inference_mode():
            out = self.module.forward_tokens(x)
        return {k: v.float() for k, v in out.items() if k in self.token_types}

    def to(self, device: str | torch.device) -> FrozenEncoder:
        self.module.to(device)
        return self


def frozen(module: nn.Module) -> nn.Module:
    """`module` in eval mode without gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def safe_name(text: str) -> str:
    """A cache-node-safe short name (letters, digits, '_', '.', '-')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "encoder"
    return name if name[0].isalnum() else f"e{name}"


def load_encoders(spec: str, *, checkpoint: str | None = None, pretrained: bool = False,
                  device: str | torch.device = "cpu") -> list[FrozenEncoder]:
    """Every encoder `spec` names (one, except `teacher:*@CONFIG`), on `device`."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(f"encoder {spec!r}: expected one of {', '.join(ENCODER_FORMS)}")
    if kind == "student":
        from heads.student import load_student_encoder

        found = [load_student_encoder(*_path_and_teacher(rest))]
    elif kind == "dune":
        from heads.dune_checkpoint import load_dune_encoder

        found = [load_dune_encoder(*_path_and_teacher(rest))]
    elif kind == "timm":
        found = [from_teacher_config(_teacher_config(safe_name(rest), f"timm:{rest}",
                                                      checkpoint, pretrained), spec)]
    elif kind == "teacher":
        name, _, config = rest.partition("@")
        if config:
            found = [from_teacher_config(t, f"teacher:{t.name}@{config}")
                     for t in _config_teachers(config, name)]
        else:
            found = [from_teacher_config(_teacher_config(safe_name(name), name, checkpoint,
                                                          pretrained), spec)]
    else:
        raise ConfigError(f"encoder {spec!r}: unknown kind {kind!r}; expected one of "
                          f"{', '.join(ENCODER_FORMS)}")
    return [replace(e, spec=e.spec or spec).to(device) for e in found]


def load_encoder(spec: str, **kwargs: object) -> FrozenEncoder:
    """The one encoder `spec` names (`teacher:*@CONFIG` is refused here)."""
    found = load_encoders(spec, **kwargs)  # type: ignore[arg-type]
    if len(found) != 1:
        raise ConfigError(f"encoder {spec!r} names {len(found)} encoders; name one")
    return found[0]


def _path_and_teacher(rest: str) -> tuple[str, str | None]:
    """`PATH@TEACHER` -> (PATH, TEACHER); a path that itself holds '@' and exists stays whole."""
    path, sep, teacher = rest.rpartition("@")
    if not sep or not teacher or "/" in teacher or Path(rest).exists():
        return rest, None
    return path, teacher


def _teacher_config(name: str, kind: str, checkpoint: str | None,
                    pretrained: bool) -> TeacherConfig:
    from precompute.teachers.config import TeacherConfig

    return TeacherConfig(name=name, kind=kind, checkpoint=checkpoint, pretrained=pretrained)


def _config_teachers(config: str, name: str) -> list[TeacherConfig]:
    """The TeacherConfig(s) named `name` ("*": all) in a build config file or a cache folder."""
    path = Path(config)
    if path.is_dir():
        from cache_format.reader import open_cache
        from precompute.config import CacheBuildConfig

        build = CacheBuildConfig.from_dict(open_cache(path).manifest.build_config)
    else:
        from precompute.config import load_build_config

        build = load_build_config(path)
    teachers = list(build.teachers)
    if name != "*":
        teachers = [t for t in teachers if t.name == name]
        if not teachers:
            raise ConfigError(f"encoder teacher:{name}@{config}: no teacher {name!r} in that "
                              f"config; it has {[t.name for t in build.teachers]}")
    return teachers


def from_teacher_config(cfg: TeacherConfig, spec: str) -> FrozenEncoder:
    """A registered teacher (load_teacher: the same loading as `dune-cache build`)."""
    from precompute.teachers.loaded import load_teacher

    teacher = load_teacher(cfg)
    return FrozenEncoder(
        module=frozen(teacher.module), name=safe_name(cfg.name), spec=spec, arch=teacher.arch,
        weights=teacher.checkpoint_sha256, patch_size=teacher.patch_size, dim=teacher.dim,
        mean=teacher.mean, std=teacher.std, token_types=tuple(teacher.token_types))
