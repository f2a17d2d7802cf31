"""The trained model (student + per-teacher projectors + teacher norms) and its export formats.

`DistillModel` is what a run trains and checkpoints. `export_run` writes, from a run folder:
- `student.safetensors` + `student.json`: the student encoder alone, loadable without this
  project: `timm.create_model(cfg["architecture"], checkpoint_path="student.safetensors",
  **cfg["model_args"])`. The distilled features are the last block's tokens before the final
  norm: `model.forward_intermediates(x, indices=1, norm=False, return_prefix_tokens=True,
  output_fmt="NLC", intermediates_only=True)` (cls = the first prefix token).
- `full_model.safetensors` + `full_model.json`: everything (`student.*`, `projectors.<t>.*`,
  `norms.<t>.<tok>.*`) plus the run's config and the teachers' widths, for reuse as teacher
  heads or to continue distilling (`load_full_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cache_format.errors import CheckpointError
from cache_format.manifest import TOKEN_TYPES
from train.checkpoint import BEST, LAST, checkpoint_dir, load_checkpoint
from train.config import TrainConfig
from train.projectors import build_projector, split_tokens
from train.student import build_student, timm_kwargs
from train.teacher_norm import TeacherNorm

CONFIG_FILE = "config.json"
TEACHERS_FILE = "teachers.json"


@dataclass(frozen=True)
class TeacherHead:
    """What the model needs to know of one teacher: its width and whether it has a cls token."""

    dim: int
    has_cls: bool


class DistillModel(nn.Module):
    """Student encoder plus one projector and one TeacherNorm per teacher token type.

    `forward(images)` returns each teacher's predicted tokens {"cls"?, "patch"}; the norms are
    applied to the *targets* (outside `forward`), so DDP wraps only what has gradients.
    """

    def __init__(self, cfg: TrainConfig, teachers: dict[str, TeacherHead], total_steps: int = 1):
        super().__init__()
        self.teachers = dict(teachers)
        self.student = build_student(cfg.student)
        width = self.student.embed_dim
        self.projectors = nn.ModuleDict(
            {
                name: build_projector(
                    cfg.projector.kind,
                    width,
                    head.dim,
                    n_blocks=cfg.projector.n_blocks,
                    num_heads=self.student.num_heads,
                )
                for name, head in self.teachers.items()
            }
        )
        self.norms = nn.ModuleDict(
            {
                name: nn.ModuleDict(
                    {
                        tok: TeacherNorm(head.dim, mode=cfg.norm.mode, total_steps=total_steps)
                        for tok in (TOKEN_TYPES if head.has_cls else ("patch",))
                    }
                )
                for name, head in self.teachers.items()
            }
        )

    def forward(self, images: Tensor) -> dict[str, dict[str, Tensor]]:
        """Normalized images [B, 3, H, W] -> {teacher: {"cls": [B, D], "patch": [B, T, D]}}."""
        tokens = self.student.forward_tokens(images)
        return {
            name: split_tokens(projector(tokens), has_cls=self.teachers[name].has_cls)
            for name, projector in self.projectors.items()
        }

    def trainable_state(self) -> dict[str, Tensor]:
        """Student and projector weights (what DDP syncs); norms are saved separately."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("norms.")}


def read_run(run_dir: str | Path) -> tuple[TrainConfig, dict[str, TeacherHead]]:
    """The resolved config and teacher heads stored in a run folder."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, TEACHERS_FILE):
        if not (run_dir / name).is_file():
            raise CheckpointError(
                f"{run_dir}: no {name}; this is not a dune-train run folder",
                hint="pass the --out folder of a `dune-train fit` run",
            )
    cfg = TrainConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    teachers_raw = json.loads((run_dir / TEACHERS_FILE).read_text())
    teachers = {
        name: TeacherHead(dim=int(v["dim"]), has_cls=bool(v["has_cls"]))
        for name, v in teachers_raw["heads"].items()
    }
    return cfg, teachers


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "best") -> dict[str, Path]:
    """Export a run's student and full model; `which` = "best" (falls back to "last") or "last".

    Returns the written paths by role.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, teachers = read_run(run_dir)
    ckpt_path = checkpoint_dir(run_dir) / (BEST if which == "best" else LAST)
    if which == "best" and not ckpt_path.is_file():
        ckpt_path = checkpoint_dir(run_dir) / LAST
    payload = load_checkpoint(ckpt_path)
    model = DistillModel(cfg, teachers)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_path}: model keys do not fit the run's config: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    student_state = {k: v.contiguous() for k, v in model.student.vit.state_dict().items()}
    paths = {
        "student_weights": out_dir / "student.safetensors",
        "student_config": out_dir / "student.json",
        "full_weights": out_dir / "full_model.safetensors",
        "full_config": out_dir / "full_model.json",
    }
    save_file(student_state, str(paths["student_weights"]))
    student_meta: dict[str, Any] = {
        "architecture": cfg.student.arch,
        "model_args": timm_kwargs(cfg.student),
        "num_prefix_tokens": model.student.num_prefix_tokens,
        "features": "last block tokens before the final norm; cls = prefix token 0",
        "source_checkpoint": str(ckpt_path),
        "step": int(payload.get("step", 0)),
    }
    paths["student_config"].write_text(json.dumps(student_meta, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["full_weights"])
    )
    full_meta = {
        "config": cfg.to_dict(),
        "teachers": {n: {"dim": h.dim, "has_cls": h.has_cls} for n, h in teachers.items()},
        "step": int(payload.get("step", 0)),
    }
    paths["full_config"].write_text(json.dumps(full_meta, indent=2) + "\n")
    return paths


def load_full_model(export_dir: str | Path) -> DistillModel:
    """Rebuild the DistillModel written by `export_run` (weights included), in eval mode."""
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "full_model.json").read_text())
    cfg = TrainConfig.from_dict(meta["config"])
    teachers = {
        n: TeacherHead(int(v["dim"]), bool(v["has_cls"])) for n, v in meta["teachers"].items()
    }
    model = DistillModel(cfg, teachers)
    model.load_state_dict(load_file(str(export_dir / "full_model.safetensors")))
    return model.eval()


def load_exported_student(export_dir: str | Path) -> torch.nn.Module:
    """The exported student as a plain timm model (what a downstream user would do)."""
    import timm

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "student.json").read_text())
    return timm.create_model(
        meta["architecture"],
        checkpoint_path=str(export_dir / "student.safetensors"),
        **meta["model_args"],
    )
