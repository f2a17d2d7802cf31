"""A released DUNE checkpoint (naver/dune `.pth`) as a frozen encoder.

Layout of the file: a dict with `model`, the state dict of the whole model (`encoder.*`,
`projectors.<teacher>.*`, `teacher_norms.<teacher>.*`), and `args`, the training's
`argparse.Namespace` (`image_size`, `enc_args`, `proj_args`, `teachers`, ...). It is read with
`torch.load(weights_only=True)`, allowing `argparse.Namespace` and nothing else
(`precompute.teachers.checkpoints.read_checkpoint`): the Namespace is rebuilt from plain values,
no code runs.

What it computes, as the reference's `get_encoder_output` / `get_projector_output` do:
- encoder: a DINOv2-style ViT (cls, registers, LayerScale); the patch position embeddings
  (stored with a cls entry, at `image_size / patch` per side) are interpolated the DINOv2 way
  (bicubic, scale factor (g + 0.1) / M, no antialias) to the input's grid; the output is the last
  block's tokens *without* the final norm (the reference builds DUNE with
  `apply_last_enc_norm=False`), registers dropped: cls + patches;
- projector `<teacher>`: its transformer blocks and linear layer on [cls; patches], times its
  `scale`, split back into cls and patch. `teacher_norms.*` are training-only and unused.

The encoder is a timm `VisionTransformer` (same block layout; its keys renamed by
`train.dune_format.encoder_from_reference`, the one copy of that rule: chunked `blocks.C.N.*`
-> `blocks.N.*`, `register_tokens` -> `reg_token`, the cls position entry folded into
`cls_token`, `mask_token` ignored); the projector is `train.projectors.TransformerProjector`.
Widths and depth come from the weights; the head count from `enc_args.arch` (or
`enc_args.num_heads`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cache_format.errors import CheckpointError, ConfigError
from cache_format.manifest import TOKEN_TYPES
from heads.encoders import FrozenEncoder, frozen, safe_name
from precompute.teachers.checkpoints import read_checkpoint, sha256_file
from precompute.teachers.specs import IMAGENET_MEAN, IMAGENET_STD
from precompute.teachers.vit_dinov2 import interpolate_pos_dinov2
from train.dune_format import encoder_from_reference, strip_wrappers
from train.projectors import TransformerProjector

# The reference's encoder defaults (model/options.py EncoderOptions, ProjectorOptions): what an
# `args` without the field means.
ENC_DEFAULTS = {"arch": "vit_base", "patch_size": 14, "num_register_tokens": 4,
                "layerscale_init": 1e-4, "qkv_bias": True, "ln_affine": True}
PROJ_DEFAULTS = {"num_blocks": 1, "mlp_ratio": 4.0, "layerscale_init": 1e-4, "scale": 1.0}
HEADS_BY_ARCH = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16,
                 "vit_giant2": 24}


class DuneTokens(nn.Module):
    """DUNE encoder (+ one projector): `forward_tokens` as get_encoder/projector_output."""

    def __init__(self, vit: VisionTransformer, projector: nn.Module | None,
                 scale: Tensor | float = 1.0) -> None:
        super().__init__()
        self.vit, self.projector = vit, projector
        self.scale = scale if isinstance(scale, Tensor) else float(scale)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = projector.linear.out_features if projector is not None else vit.embed_dim

    def encoder_output(self, x: Tensor) -> Tensor:
        """[cls; patches] of the last block, before the final norm, registers dropped."""
        vit, batch = self.vit, x.shape[0]
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        patches = vit.patch_embed(x).reshape(batch, grid[0] * grid[1], -1)
        patches = patches + interpolate_pos_dinov2(vit.pos_embed, grid).to(patches.dtype)
        prefix = [vit.cls_token.expand(batch, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(batch, -1, -1))
        tokens = vit.blocks(torch.cat([*prefix, patches], dim=1))
        return torch.cat([tokens[:, :1], tokens[:, vit.num_prefix_tokens:]], dim=1)

    def forward_tokens(self, x: Tensor) -> dict[str, Tensor]:
        tokens = self.encoder_output(x)
        if self.projector is not None:
            tokens = self.projector(tokens) * self.scale
        return {"cls": tokens[:, 0], "patch": tokens[:, 1:]}


def _args(raw: dict[str, Any], path: str) -> tuple[int, dict[str, Any], dict[str, Any], list]:
    args = raw.get("args")
    if args is None:
        raise CheckpointError(f"dune:{path}: no 'args' entry; expected naver/dune's checkpoint "
                              f"layout (model + args), found keys {sorted(raw)[:10]}")
    get = (lambda k, d=None: args.get(k, d)) if isinstance(args, dict) else \
        (lambda k, d=None: getattr(args, k, d))
    enc = {**ENC_DEFAULTS, **dict(get("enc_args") or {})}
    proj = {**PROJ_DEFAULTS, **dict(get("proj_args") or {})}
    if enc.get("ffn_layer", "mlp") != "mlp" or enc.get("qk_norm", False):
        raise ConfigError(f"dune:{path}: enc_args ffn_layer={enc.get('ffn_layer')!r} "
                          f"qk_norm={enc.get('qk_norm')!r} are not supported (DUNE's released "
                          "models use the plain MLP without qk norm)")
    return int(get("image_size", 448)), enc, proj, list(get("teachers", []) or [])


def _fill_affine(state: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """LayerNorms without affine parameters (ln_affine=False) equal weight 1, bias 0."""
    full = dict(state)
    for name, tensor in module.state_dict().items():
        if name not in full and re.search(r"norm\d*\.(weight|bias)$", name):
            full[name] = torch.ones_like(tensor) if name.endswith("weight") else \
                torch.zeros_like(tensor)
    return full


def _load(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(_fill_affine(state, module), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{what}: keys do not fit: missing {sorted(missing)[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}",
                              hint="is this a naver/dune checkpoint with a standard ViT encoder?")


def _pick_teacher(teacher: str, names: list[str], path: str) -> str:
    if teacher in names:
        return teacher
    close = [n for n in names if n.startswith(teacher)]
    if len(close) == 1:
        return close[0]
    raise ConfigError(f"dune:{path}@{teacher}: no projector {teacher!r}; the checkpoint has "
                      f"{names}")


def load_dune_encoder(path: str, teacher: str | None = None) -> FrozenEncoder:
    """The encoder of a DUNE checkpoint, or its projector for `teacher` (a name or a prefix)."""
    raw = read_checkpoint(path, where=f"dune:{path}")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"dune:{path}: expected a dict with a 'model' state dict")
    image_size, enc, proj, teachers = _args(raw, path)
    model = {strip_wrappers(k): v for k, v in raw["model"].items()}
    state = encoder_from_reference(
        {k.removeprefix("encoder."): v for k, v in model.items() if k.startswith("encoder.")},
        f"dune:{path}")
    dim = int(state["cls_token"].shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    heads = int(enc.get("num_heads") or HEADS_BY_ARCH.get(enc["arch"], 0))
    if heads <= 0 or dim % heads:
        raise ConfigError(f"dune:{path}: cannot tell the head count of arch {enc['arch']!r} "
                          f"(width {dim}); known archs: {sorted(HEADS_BY_ARCH)}")
    patch = int(enc["patch_size"])
    vit = VisionTransformer(
        img_size=image_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        qkv_bias=bool(enc["qkv_bias"]), init_values=enc["layerscale_init"] or None,
        class_token=True, no_embed_class=True, reg_tokens=int(enc["num_register_tokens"]),
        num_classes=0, dynamic_img_size=True)
    vit.pos_embed = nn.Parameter(torch.zeros_like(state["pos_embed"]))  # the stored grid
    _load(vit, state, f"dune:{path} encoder")
    projector, scale, name = None, 1.0, "dune"
    names = sorted({k.split(".")[1] for k in model if k.startswith("projectors.")})
    if teacher is not None:
        teacher = _pick_teacher(teacher, names or teachers, path)
        prefix = f"projectors.{teacher}."
        pstate = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
        n_blocks = len({k.split(".")[1] for k in pstate if k.startswith("blocks.")})
        projector = TransformerProjector(
            dim, int(pstate["linear.weight"].shape[0]), n_blocks=n_blocks,
            mlp_ratio=float(proj["mlp_ratio"]), layerscale_init=float(proj["layerscale_init"]),
            num_heads=heads)
        scale = pstate.pop("scale", float(proj["scale"]) or 1.0)
        _load(projector, pstate, f"dune:{path} projector {teacher}")
        name = f"dune@{teacher}"
    module = frozen(DuneTokens(vit, projector, scale))
    return FrozenEncoder(
        module=module, name=safe_name(name), spec=f"dune:{path}" + (f"@{teacher}" if teacher
                                                                     else ""),
        arch=f"dune {enc['arch']}/{patch} dim={dim} depth={depth} reg="
             f"{enc['num_register_tokens']} pos={image_size // patch} prenorm"
             + (f" + projector {teacher}" if teacher else ""),
        weights=sha256_file(path), patch_size=patch, dim=int(module.embed_dim),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, token_types=TOKEN_TYPES)
