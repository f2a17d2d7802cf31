"""naver/dune's checkpoint layout, both ways: our `DistillModel` <-> the reference's `.pth` dict.

The reference (`model/dune.py`, `load_dune_from_checkpoint`) reads a `torch.save`d dict:
- `model`: the `DUNE` module's state dict: `encoder.*` (a DINOv2-style ViT), `projectors.<t>.*`
  (Transformer Projectors) and `teacher_norms.<t>.normalizers.<cls|patch>.{mean,std}`;
- `args`: an `argparse.Namespace` with `image_size`, `enc_args` (dict: `arch`, `patch_size`,
  `num_register_tokens`, `layerscale_init`, ...), `proj_args` (dict: `num_blocks`, ...) and
  `teachers` (sorted list of teacher names, looked up in the reference's teacher table).
The reference reads `args.image_size` as an attribute and loads with `weights_only=False`, so
`args` must be a Namespace (a dict would not load there); we read it back with
`weights_only=True`, allowing `argparse.Namespace` and nothing else.

Differences between the two parameterisations, all exact in the forward pass:
- the reference's encoder keeps its blocks in one chunk (`encoder.blocks.0.<i>.*`), timm in
  `blocks.<i>.*`;
- the reference's position table has a cls slot added to the cls token; timm's DINOv2 models
  (`no_embed_class`) have none. Export writes a zero cls slot; import folds the slot into the
  cls token;
- the reference's `mask_token` (unused without masks) is written as zeros and dropped on import;
- `register_tokens` <-> timm's `reg_token`;
- a projector `scale` parameter (reference option `scale=0`) is folded into the final Linear.
Our own extras (the student's timm config, teacher widths, the step) travel under the top-level
key `dune_distill`, which the reference ignores.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cache_format.dinov2_keys import fold_cls_slot, holds_cls_slot, timm_key
from cache_format.errors import CheckpointError
from cache_format.serde import from_dict, to_dict
from train.config import ProjectorConfig, TrainConfig
from train.model import DistillModel, TeacherHead
from train.student import StudentConfig

# The reference's encoder sizes, by its `arch` name: (embed_dim, depth, num_heads).
REFERENCE_ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
EXTRAS_KEY = "dune_distill"
DUNE_FILE_HINT = "pass a .pth written by naver/dune or by `dune-train export --format dune`"


@dataclass
class DuneCheckpoint:
    """A checkpoint in the reference's layout, split into the parts our model is made of.

    `encoder` has timm keys (ready for `Student.load_encoder_state`), `projectors[t]` our
    projector keys, `norms[t][tok]` = (mean, std).
    """

    student: StudentConfig
    heads: dict[str, TeacherHead]
    encoder: dict[str, Tensor]
    projectors: dict[str, dict[str, Tensor]]
    norms: dict[str, dict[str, tuple[Tensor, Tensor]]]
    n_blocks: int
    step: int = 0
    args: dict[str, Any] = field(default_factory=dict)


# -- ours -> reference ----------------------------------------------------------------------------
def to_dune_checkpoint(
    model: DistillModel, cfg: TrainConfig, step: int = 0, rename: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The reference's checkpoint dict (`model`, `args`, `iter`) for `model`, built from `cfg`.

    `rename` maps our teacher names to the reference's (its loader looks teachers up by name).
    """
    rename = rename or {}
    student_cfg, projector_kind = cfg.student, cfg.projector.kind
    if projector_kind not in ("tp", "linear"):
        raise CheckpointError(
            f"projector.kind: the DUNE layout has Transformer Projectors only, found "
            f"{projector_kind!r}",
            hint="export a run with projector.kind = 'tp' (or 'linear', = tp with 0 blocks)",
        )
    vit = model.student.vit
    state: dict[str, Tensor] = {
        f"encoder.{k}": v for k, v in _encoder_to_reference(vit).items()
    }
    for ours, projector in model.projectors.items():
        name = rename.get(ours, ours)
        for key, value in projector.state_dict().items():
            state[f"projectors.{name}.{key}"] = value.detach().clone()
        for tok, norm in model.norms[ours].items():
            for buffer in ("mean", "std"):
                value = getattr(norm, buffer).detach().clone().float()
                state[f"teacher_norms.{name}.normalizers.{tok}.{buffer}"] = value
    embed_dim, depth, heads = model.student.embed_dim, len(vit.blocks), model.student.num_heads
    enc_args: dict[str, Any] = {
        "arch": _reference_arch(embed_dim, depth, heads),
        "patch_size": model.student.patch_size,
        "num_register_tokens": int(vit.num_reg_tokens),
        "layerscale_init": student_cfg.layerscale_init,
        "qkv_bias": True,
        "ln_affine": True,
    }
    if REFERENCE_ARCHS.get(enc_args["arch"]) != (embed_dim, depth, heads):
        # Not one of the reference's sizes: record ours (its `get_model` builds only its sizes).
        enc_args.update(embed_dim=embed_dim, depth=depth, num_heads=heads)
    proj_args = {
        "num_blocks": cfg.projector.n_blocks if projector_kind == "tp" else 0,
        "num_heads": heads,
        "layerscale_init": 1e-4,
        "qkv_bias": True,
        "ln_affine": True,
        "scale": 1.0,
    }
    args = argparse.Namespace(
        image_size=student_cfg.img_size,
        enc_args=enc_args,
        proj_args=proj_args,
        teachers=sorted(rename.get(t, t) for t in model.projectors),
    )
    extras = {
        "student": to_dict(student_cfg),
        "heads": {rename.get(t, t): to_dict(h) for t, h in model.teachers.items()},
    }
    return {"model": state, "args": args, "iter": int(step), EXTRAS_KEY: extras}


def _encoder_to_reference(vit: torch.nn.Module) -> dict[str, Tensor]:
    """timm DINOv2-style ViT state -> the reference encoder's keys (see the module docstring)."""
    src = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    out: dict[str, Tensor] = {}
    cls = src.pop("cls_token")
    pos = src.pop("pos_embed")
    reg = src.pop("reg_token", None)
    if vit.no_embed_class:
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    elif reg is not None:
        raise CheckpointError(
            "student: registers with position embeddings of their own have no DUNE layout",
            hint="use a DINOv2-style timm student (e.g. vit_base_patch14_reg4_dinov2)",
        )
    out["cls_token"], out["pos_embed"] = cls, pos
    if reg is not None:
        out["register_tokens"] = reg
    out["mask_token"] = torch.zeros(1, cls.shape[-1], dtype=cls.dtype)
    for key, value in src.items():
        if key.startswith("blocks."):
            index, rest = key.removeprefix("blocks.").split(".", 1)
            out[f"blocks.0.{index}.{rest}"] = value
        elif key.startswith(("patch_embed.", "norm.")):
            out[key] = value
        else:
            raise CheckpointError(
                f"student: parameter {key!r} has no place in the DUNE encoder layout",
                hint="use a DINOv2-style timm student without a head (num_classes=0)",
            )
    return out


def _reference_arch(embed_dim: int, depth: int, num_heads: int) -> str:
    """The reference's arch name for these sizes; for other sizes the closest width's name."""
    for name, sizes in REFERENCE_ARCHS.items():
        if sizes == (embed_dim, depth, num_heads):
            return name
    return min(REFERENCE_ARCHS, key=lambda n: abs(REFERENCE_ARCHS[n][0] - embed_dim))


def save_dune_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint dict with `torch.save` (the reference reads `.pth` files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


# -- reference -> ours ----------------------------------------------------------------------------
def read_dune_file(path: str | Path) -> dict[str, Any]:
    """`torch.load` a reference checkpoint with weights_only=True (argparse.Namespace allowed)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many kinds; name the file
        raise CheckpointError(
            f"{path}: cannot be read as a DUNE checkpoint with weights_only=True ({exc})",
            hint=DUNE_FILE_HINT,
        ) from None
    if not is_dune_checkpoint(raw):
        raise CheckpointError(
            f"{path}: not in the DUNE layout: expected a dict with 'model' (encoder.* keys) and "
            f"'args', found keys {sorted(raw)[:10] if isinstance(raw, dict) else type(raw)}",
            hint=DUNE_FILE_HINT,
        )
    return raw


def is_dune_file(path: str | Path) -> bool:
    """A `.pth` path: the reference's file suffix (our run checkpoints are `.pt`)."""
    return Path(path).suffix == ".pth"


def is_dune_checkpoint(raw: Any) -> bool:
    """True for a loaded dict in the reference's layout (`model` with `encoder.*`, and `args`)."""
    return (
        isinstance(raw, dict) and "args" in raw and isinstance(raw.get("model"), dict)
        and any(strip_wrappers(k).startswith("encoder.") for k in raw["model"])
    )


def strip_wrappers(key: str) -> str:
    """Drop DDP's `module.` and torch.compile's `_orig_mod.` prefixes (the reference does too)."""
    return key.replace("module.", "").replace("_orig_mod.", "")


def parse_dune_checkpoint(raw: dict[str, Any], where: str = "checkpoint") -> DuneCheckpoint:
    """Split a loaded reference checkpoint into our model's parts (see `DuneCheckpoint`)."""
    args = raw["args"]
    args = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    state = {strip_wrappers(k): v for k, v in raw["model"].items()}
    encoder = encoder_from_reference(
        {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")},
        where,
    )
    projectors: dict[str, dict[str, Tensor]] = {}
    buffers: dict[tuple[str, str], dict[str, Tensor]] = {}  # (teacher, token type) -> mean, std
    for key, value in state.items():
        if key.startswith("projectors."):
            teacher, rest = key.removeprefix("projectors.").split(".", 1)
            projectors.setdefault(teacher, {})[rest] = value
        elif key.startswith("teacher_norms."):
            teacher, _, tok, buffer = key.removeprefix("teacher_norms.").split(".")
            buffers.setdefault((teacher, tok), {})[buffer] = value
    for teacher, part in projectors.items():
        projectors[teacher] = _fold_scale(part)
    norm_pairs: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for (teacher, tok), pair in buffers.items():
        norm_pairs.setdefault(teacher, {})[tok] = (pair["mean"], pair["std"])
    extras = raw.get(EXTRAS_KEY) or {}
    if "student" in extras:
        student = from_dict(StudentConfig, extras["student"], where=f"{where}: {EXTRAS_KEY}")
    else:
        student = _student_from_args(args, encoder, where)
    heads = {
        t: TeacherHead(dim=int(part["linear.weight"].shape[0]),
                       has_cls="cls" in norm_pairs.get(t, {}))
        for t, part in projectors.items()
    }
    return DuneCheckpoint(
        student=student, heads=heads, encoder=encoder, projectors=projectors, norms=norm_pairs,
        n_blocks=int(args.get("proj_args", {}).get("num_blocks", 1)),
        step=int(raw.get("iter", 0)), args=args,
    )


def encoder_from_reference(src: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The reference encoder's keys (`encoder.` removed) -> a timm DINOv2-style ViT's
    (`no_embed_class`): chunked blocks renamed, `register_tokens` -> `reg_token`, `mask_token`
    dropped, and the position table's cls slot, when it holds one, folded into the cls token.
    The one copy of the rule: `heads.dune_checkpoint` reads released checkpoints through it."""
    out: dict[str, Tensor] = {}
    for key, value in src.items():
        new = timm_key(key)
        if new is not None:  # mask_token: masked-image training only
            out[new] = value
    pos, cls = out.get("pos_embed"), out.get("cls_token")
    if pos is None or cls is None:
        raise CheckpointError(
            f"{where}: no encoder.pos_embed / encoder.cls_token in the checkpoint's model",
            hint=DUNE_FILE_HINT,
        )
    if holds_cls_slot(pos):
        out["cls_token"], out["pos_embed"] = fold_cls_slot(cls, pos)
    return out


def _fold_scale(part: dict[str, Tensor]) -> dict[str, Tensor]:
    """A learned output `scale` (reference option) multiplied into the final Linear."""
    scale = part.pop("scale", None)
    if scale is not None:
        part["linear.weight"] = part["linear.weight"] * scale
        part["linear.bias"] = part["linear.bias"] * scale
    return part


def _student_from_args(
    args: dict[str, Any], encoder: dict[str, Tensor], where: str
) -> StudentConfig:
    """Our StudentConfig for a reference checkpoint without our extras (a released one)."""
    enc = dict(args.get("enc_args") or {})
    arch = enc.get("arch", "vit_base")
    if arch not in REFERENCE_ARCHS:
        raise CheckpointError(
            f"{where}: args.enc_args.arch = {arch!r} is not one of {sorted(REFERENCE_ARCHS)}",
            hint="only the reference's ViT sizes have a timm counterpart here",
        )
    patch = int(enc.get("patch_size", 14))
    regs = int(enc.get("num_register_tokens", 4))
    # timm has no DINOv2 ViT-Ti: build it as a ViT-S with ViT-Ti's sizes (given below).
    size = "small" if arch == "vit_tiny" else arch.removeprefix("vit_")
    timm_name = f"vit_{size}_patch14_reg{regs}_dinov2" if regs else f"vit_{size}_patch14_dinov2"
    if patch != 14:
        raise CheckpointError(
            f"{where}: args.enc_args.patch_size = {patch}; the timm DINOv2 students have 14",
            hint="only patch-14 DUNE students can be loaded",
        )
    embed_dim, depth, heads = REFERENCE_ARCHS[arch]
    depth_found = len({k.split(".")[1] for k in encoder if k.startswith("blocks.")})
    return StudentConfig(
        arch=timm_name,
        img_size=int(args.get("image_size", 336)),
        layerscale_init=float(enc.get("layerscale_init", 1e-4) or 0.0),
        embed_dim=int(enc.get("embed_dim", embed_dim)),
        depth=int(enc.get("depth", depth_found or depth)),
        num_heads=int(enc.get("num_heads", heads)),
    )


def load_dune_checkpoint(path: str | Path) -> DuneCheckpoint:
    """Read and split a `.pth` in the reference's layout (weights_only=True)."""
    return parse_dune_checkpoint(read_dune_file(path), where=str(path))


def fill_model(model: DistillModel, ckpt: DuneCheckpoint, norms: bool = True) -> list[str]:
    """Load a DUNE checkpoint's parts into `model`; returns the teachers whose projectors loaded.

    The encoder always loads (position embeddings resampled to the model's grid); a projector
    loads when the teacher's name and every shape match; norms (when `norms`) likewise.
    """
    model.student.load_encoder_state(ckpt.encoder)
    loaded = []
    for name, projector in model.projectors.items():
        part = ckpt.projectors.get(name, {})
        own = projector.state_dict()
        if part.keys() == own.keys() and all(part[k].shape == own[k].shape for k in own):
            projector.load_state_dict(part)
            loaded.append(name)
            if norms:
                for tok, norm in model.norms[name].items():
                    if tok in ckpt.norms.get(name, {}):
                        norm.set_stats(*ckpt.norms[name][tok])
    return loaded


def model_from_dune(path: str | Path) -> DistillModel:
    """Our DistillModel rebuilt from a DUNE-layout `.pth` (weights and norms), in eval mode."""
    ckpt = load_dune_checkpoint(path)
    cfg = TrainConfig(
        student=ckpt.student, projector=ProjectorConfig(kind="tp", n_blocks=ckpt.n_blocks)
    )
    model = DistillModel(cfg, ckpt.heads)
    loaded = fill_model(model, ckpt)
    if sorted(loaded) != sorted(ckpt.heads):
        raise CheckpointError(
            f"{path}: projectors of {sorted(set(ckpt.heads) - set(loaded))} do not fit "
            f"Transformer Projectors of {ckpt.n_blocks} block(s) at the student's width",
            hint="the checkpoint's proj_args do not describe its projector weights",
        )
    return model.eval()
