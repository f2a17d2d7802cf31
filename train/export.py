"""Export a run: the student alone for timm, and the whole `DistillModel` (`train.model`).

`export_run` writes, from a run folder:
- `student.safetensors` + `student.json`: the student encoder alone, loadable without this
  project: `timm.create_model(cfg["architecture"], checkpoint_path="student.safetensors",
  **cfg["model_args"])`. The distilled features are the last block's tokens before the final
  norm: `model.forward_intermediates(x, indices=1, norm=False, return_prefix_tokens=True,
  output_fmt="NLC", intermediates_only=True)` (cls = the first prefix token).
- `full_model.safetensors` + `full_model.json`: everything (`student.*`, `projectors.<t>.*`,
  `norms.<t>.<tok>.*`) plus the run's config and the teachers' widths, for reuse as teacher
  heads or to continue distilling (`load_full_model`).

`export_dune` writes the same run in naver/dune's checkpoint layout (`train.dune_format`): one
`.pth` that the reference's `load_dune_from_checkpoint` loads, and that `init_from` and
`train.dune_format.model_from_dune` read back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from cache_format.errors import CheckpointError
from cache_format.serde import from_dict, to_dict
from train.checkpoint import BEST, LAST, checkpoint_dir, latest_stage_dir, load_checkpoint
from train.config import TrainConfig
from train.dune_format import save_dune_checkpoint, to_dune_checkpoint
from train.model import DistillModel, TeacherHead
from train.student import timm_kwargs

CONFIG_FILE = "config.json"
TEACHERS_FILE = "teachers.json"
#: The hint of every refusal of a folder that is not a run folder.
RUN_FOLDER_HINT = "pass the --out folder of a `dune-train fit` run"


def read_run(run_dir: str | Path) -> tuple[TrainConfig, dict[str, TeacherHead]]:
    """The resolved config and teacher heads stored in a run folder."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, TEACHERS_FILE):
        if not (run_dir / name).is_file():
            raise CheckpointError(
                f"{run_dir}: no {name}; this is not a dune-train run folder",
                hint=RUN_FOLDER_HINT,
            )
    cfg = TrainConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    teachers_raw = json.loads((run_dir / TEACHERS_FILE).read_text())
    return cfg, _heads(teachers_raw["heads"], run_dir / TEACHERS_FILE)


def _heads(raw: dict[str, Any], where: Path) -> dict[str, TeacherHead]:
    """The teacher heads of a run folder's or an export's JSON ({name: {dim, has_cls}})."""
    return {name: from_dict(TeacherHead, v, where=f"{where}: {name}") for name, v in raw.items()}


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[
    TrainConfig, DistillModel, dict[str, Any], Path
]:
    """A run's config, its DistillModel with the chosen checkpoint's weights, the checkpoint
    payload and its path; `which` = "best" (falls back to "last") or "last"."""
    run_dir = latest_stage_dir(run_dir)  # a staged run: its latest stage's folder
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
    return cfg, model, payload, ckpt_path


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "best") -> dict[str, Path]:
    """Export a run's student and full model; `which` = "best" (falls back to "last") or "last".

    Returns the written paths by role.
    """
    out_dir = Path(out_dir)
    cfg, model, payload, ckpt_path = load_run_model(run_dir, which)
    teachers = model.teachers
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
        "teachers": to_dict(teachers),
        "step": int(payload.get("step", 0)),
    }
    paths["full_config"].write_text(json.dumps(full_meta, indent=2) + "\n")
    return paths


def export_dune(
    run_dir: str | Path, out: str | Path, which: str = "best",
    rename: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write a run in naver/dune's layout: `out` itself when it ends in `.pth`, else
    `out/dune_checkpoint.pth`. `rename` maps our teacher names to the reference's."""
    cfg, model, payload, _ = load_run_model(run_dir, which)
    unknown = sorted(set(rename or {}) - set(model.teachers))
    if unknown:
        raise CheckpointError(
            f"--rename: {unknown} are not teachers of this run; its teachers are "
            f"{sorted(model.teachers)}"
        )
    out = Path(out)
    path = out if out.suffix == ".pth" else out / "dune_checkpoint.pth"
    checkpoint = to_dune_checkpoint(model, cfg, step=int(payload.get("step", 0)), rename=rename)
    return {"dune_checkpoint": save_dune_checkpoint(checkpoint, path)}


def load_full_model(export_dir: str | Path) -> DistillModel:
    """Rebuild the DistillModel written by `export_run` (weights included), in eval mode."""
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "full_model.json").read_text())
    cfg = TrainConfig.from_dict(meta["config"])
    model = DistillModel(cfg, _heads(meta["teachers"], export_dir / "full_model.json"))
    model.load_state_dict(load_file(str(export_dir / "full_model.safetensors")))
    return model.eval()
