"""A distilled student as a frozen encoder: its own tokens, or through one teacher's projector.

Reads what `dune-train` writes, never its Python objects (train/export.py, train/checkpoint.py):
- an export folder: `full_model.json` (`config` = the run's TrainConfig dict, `teachers` =
  {name: {dim, has_cls}}) + `full_model.safetensors` (`student.vit.*`, `projectors.<t>.*`,
  `norms.<t>.<tok>.*`); or only `student.json` (`architecture`, `model_args`) +
  `student.safetensors` (the bare timm ViT), which gives the student's own tokens;
- a run folder (`config.json`, `teachers.json`, `checkpoints/best.pt` or `last.pt`, whose
  `model` entry has the same keys as full_model.safetensors), or one checkpoint file of it.

The student is rebuilt with `train.student.build_student` and the projector with
`train.projectors.build_projector`, so the tokens are exactly the ones distilled: the last
block's cls + patches before the final norm; through a projector, its output split back into cls
and patch (what the teacher's normalized tokens were compared with during training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from cache_format.errors import CheckpointError, ConfigError
from cache_format.manifest import TOKEN_TYPES
from cache_format.serde import from_dict
from heads.encoders import FrozenEncoder, frozen, safe_name
from train.checkpoint import BEST, LAST, checkpoint_dir, load_checkpoint
from train.projectors import build_projector
from train.student import Student, StudentConfig, build_student


class StudentTokens(nn.Module):
    """Student encoder, optionally followed by one projector: `forward_tokens` -> cls, patch."""

    def __init__(self, student: Student, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.projector = student, projector
        self.patch_size = student.patch_size
        self.embed_dim = (projector.linear.out_features if projector is not None
                          else student.embed_dim)

    def forward_tokens(self, x: Tensor) -> dict[str, Tensor]:
        tokens = self.student.forward_tokens(x)
        if self.projector is not None:
            tokens = self.projector(tokens)
        return {"cls": tokens[:, 0], "patch": tokens[:, 1:]}


def load_student_encoder(path: str, teacher: str | None = None) -> FrozenEncoder:
    """The student found at `path` (export folder, run folder or checkpoint file)."""
    where = Path(path)
    if where.is_file():  # a checkpoint of a run: <run>/checkpoints/<name>.pt
        return _from_run(where.parent.parent, where, teacher, path)
    if (where / "full_model.json").is_file():
        meta = _json(where / "full_model.json")
        state = load_file(str(where / "full_model.safetensors"))
        return _build(meta["config"], meta["teachers"], state, teacher, path,
                      weights=f"export:{where.resolve()}")
    if (where / "student.json").is_file():
        if teacher is not None:
            raise ConfigError(f"encoder student:{path}@{teacher}: this export has no projectors "
                              "(no full_model.json); use the student's own tokens")
        meta = _json(where / "student.json")
        args = meta["model_args"]
        cfg = StudentConfig(arch=meta["architecture"], img_size=int(args["img_size"]),
                            layerscale_init=float(args.get("init_values") or 0.0),
                            **{k: args[k] for k in ("embed_dim", "depth", "num_heads")
                               if k in args})
        state = {f"student.vit.{k}": v for k, v in
                 load_file(str(where / "student.safetensors")).items()}
        return _build({"student": _plain(cfg)}, {}, state, None, path,
                      weights=f"export:{where.resolve()}")
    if (where / "config.json").is_file():
        ckpt = checkpoint_dir(where) / BEST
        if not ckpt.is_file():
            ckpt = checkpoint_dir(where) / LAST
        return _from_run(where, ckpt, teacher, path)
    raise CheckpointError(f"student:{path}: not an export folder (full_model.json or "
                          "student.json), a run folder (config.json) or a checkpoint file",
                          hint="pass the output of `dune-train export` or a `dune-train fit` run")


def _plain(cfg: StudentConfig) -> dict[str, Any]:
    from cache_format.serde import to_dict

    return to_dict(cfg)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc})") from None


def _from_run(run: Path, ckpt: Path, teacher: str | None, spec: str) -> FrozenEncoder:
    config, heads = _json(run / "config.json"), _json(run / "teachers.json")["heads"]
    payload = load_checkpoint(ckpt)
    return _build(config, heads, payload["model"], teacher, spec,
                  weights=f"run:{ckpt.resolve()}@step{int(payload.get('step', 0))}")


def _build(config: dict[str, Any], heads: dict[str, Any], state: dict[str, Tensor],
           teacher: str | None, spec: str, *, weights: str) -> FrozenEncoder:
    """Student (+ one projector) from a TrainConfig dict, the teachers' widths and the weights."""
    student_cfg = from_dict(StudentConfig, dict(config["student"]), where="student")
    student = build_student(student_cfg)
    student.load_encoder_state({k.removeprefix("student."): v for k, v in state.items()
                                if k.startswith("student.")})
    projector = None
    name = "student"
    if teacher is not None:
        if teacher not in heads:
            raise ConfigError(f"encoder student:...@{teacher}: the run has no projector "
                              f"{teacher!r}; it has {sorted(heads)}")
        proj = config.get("projector", {})
        projector = build_projector(proj.get("kind", "tp"), student.embed_dim,
                                    int(heads[teacher]["dim"]),
                                    n_blocks=int(proj.get("n_blocks", 1)),
                                    num_heads=student.num_heads)
        prefix = f"projectors.{teacher}."
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = projector.load_state_dict(found, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"student projector {teacher!r}: keys do not fit: missing "
                                  f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        name = f"student@{teacher}"
    module = frozen(StudentTokens(student, projector))
    mean, std = student.pixel_mean_std
    proj_kind = config.get("projector", {}).get("kind", "tp") if projector is not None else ""
    return FrozenEncoder(
        module=module, name=safe_name(name), spec=f"student:{spec}" + (f"@{teacher}" if teacher
                                                                        else ""),
        arch=f"{student_cfg.arch} dim={student.embed_dim} depth={len(student.vit.blocks)}"
             + (f" + {proj_kind} projector -> {teacher}" if projector is not None else ""),
        weights=weights, patch_size=student.patch_size, dim=int(module.embed_dim),
        mean=mean, std=std, token_types=TOKEN_TYPES)


__all__ = ["StudentTokens", "load_student_encoder"]
