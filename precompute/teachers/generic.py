"""Open-ended teacher kinds: any timm ViT by name, and a user's own factory function.

`timm:<model>` builds the timm model (overrides as timm keyword arguments, `dynamic_img_size`
where the model supports it) and reads `forward_features`: the prefix tokens (cls, registers) are
dropped by timm's `num_prefix_tokens`, the cls token is the first one when the model has one.
Positions are interpolated the timm way. A local checkpoint goes through the model's own timm
`checkpoint_filter_fn` (which converts the upstream formats timm knows), `pretrained=True` without
a checkpoint downloads timm's hub weights.

`factory:<module>:<function>` imports the module and calls the function with the overrides that
are set (`embed_dim=`, `depth=`, `num_heads=`) inside `seeded_init(init_seed)`. The returned
`nn.Module` must have `forward_tokens(x) -> {"cls"?: [B, D], "patch": [B, T, D]}` and the
attributes `patch_size` (int), `embed_dim` (int) and `token_types` (`TOKEN_TYPES` or
("patch",)); `mean` / `std` are optional (ImageNet's by default). A factory that loads its own
weights may set `checkpoint_sha256`, which the manifest then records.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from cache_format.errors import ConfigError, RegistryError
from cache_format.manifest import TOKEN_TYPES
from precompute.teachers.checkpoints import (
    MappedState,
    initial_weights,
    load_checkpoint_into,
    random_init_id,
    seeded_init,
    teacher_weights,
)
from precompute.teachers.config import TeacherConfig
from precompute.teachers.registry import BuiltTeacher, register_teacher_prefix
from precompute.teachers.specs import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec

_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")


class TimmTokens(nn.Module):
    """Adapter from a timm ViT's `forward_features` to `forward_tokens`."""

    def __init__(self, model: nn.Module, where: str) -> None:
        super().__init__()
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is None or len(set(patch)) != 1:
            raise ConfigError(
                f"{where}.kind: expected a timm ViT with a square patch_embed.patch_size, "
                f"found {type(model).__name__} with patch_size {patch!r}"
            )
        self.model = model
        self.patch_size = int(patch[0])
        self.embed_dim = int(getattr(model, "embed_dim", model.num_features))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        has_cls = getattr(model, "cls_token", None) is not None and self.num_prefix_tokens > 0
        self.token_types = TOKEN_TYPES if has_cls else ("patch",)

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """timm's final-norm tokens, prefix tokens dropped; cls from the first token if any."""
        tokens = self.model.forward_features(x)
        out = {"patch": tokens[:, self.num_prefix_tokens :]}
        if "cls" in self.token_types:
            out["cls"] = tokens[:, 0]
        return out


def _timm_name(rest: str) -> str:
    """`rest` when timm knows the model (tags like `.lvd142m` allowed), else RegistryError."""
    if not timm.is_model(rest):
        raise RegistryError(
            f"unknown timm model {rest!r} in teacher kind 'timm:{rest}'",
            hint="list candidates with python -c \"import timm; print(timm.list_models('*vit*'))\"",
        )
    return rest


def _create_timm(name: str, *, pretrained: bool, overrides: dict[str, int]) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": pretrained, "num_classes": 0, **overrides}
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError:  # not every timm model takes dynamic_img_size; fixed-size ones still work
        return timm.create_model(name, **kwargs)


def _overrides(cfg: TeacherConfig) -> dict[str, int]:
    pairs = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads}
    return {k: v for k, v in pairs.items() if v is not None}


def _spec_from(kind: str, module: nn.Module, description: str) -> TeacherSpec:
    return TeacherSpec(
        name=kind,
        patch_size=int(module.patch_size),
        dim=int(module.embed_dim),
        mean=tuple(float(v) for v in getattr(module, "mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in getattr(module, "std", IMAGENET_STD)),
        token_types=tuple(module.token_types),
        domain="",
        description=description,
    )


def timm_spec(rest: str) -> TeacherSpec:
    """Facts of a timm model, read from an instance built on the meta device (no memory, fast)."""
    name = _timm_name(rest)
    with torch.device("meta"):
        tokens = TimmTokens(_create_timm(name, pretrained=False, overrides={}), f"timm:{name}")
    cfg = tokens.model.pretrained_cfg or {}
    tokens.mean = cfg.get("mean", IMAGENET_MEAN)
    tokens.std = cfg.get("std", IMAGENET_STD)
    return _spec_from(f"timm:{name}", tokens, f"timm model {name}")


def _map_with_timm_filter(state: dict[str, torch.Tensor], target: nn.Module) -> MappedState:
    """Run the model's own timm `checkpoint_filter_fn` (upstream formats, pos-embed resampling)."""
    filter_fn = getattr(sys.modules.get(type(target).__module__), "checkpoint_filter_fn", None)
    tensors = dict(filter_fn(dict(state), target)) if callable(filter_fn) else dict(state)
    return MappedState(tensors={k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)})


@register_teacher_prefix("timm", timm_spec, check=_timm_name)
def build_timm(cfg: TeacherConfig) -> BuiltTeacher:
    """Any timm ViT: random init (seeded), a local checkpoint, or timm's hub weights."""
    _, _, rest = cfg.kind.partition(":")
    name = _timm_name(rest)
    hub = cfg.pretrained and cfg.checkpoint is None
    with initial_weights(cfg.init_seed, from_checkpoint=cfg.checkpoint is not None):
        model = _create_timm(name, pretrained=hub, overrides=_overrides(cfg))
    tokens = TimmTokens(model, cfg.where)
    pretrained_cfg = model.pretrained_cfg or {}
    tokens.mean = pretrained_cfg.get("mean", IMAGENET_MEAN)
    tokens.std = pretrained_cfg.get("std", IMAGENET_STD)
    overrides = " ".join(f"{k}={v}" for k, v in _overrides(cfg).items())
    arch = (
        f"timm {name} dim={tokens.embed_dim} patch={tokens.patch_size} "
        f"prefix={tokens.num_prefix_tokens} {overrides}"
    ).strip()
    spec = _spec_from(cfg.kind, tokens, f"timm model {name}")
    if hub:
        sha = f"hub:{pretrained_cfg.get('hf_hub_id') or 'timm/' + name}"
    else:
        sha = teacher_weights(model, cfg, _map_with_timm_filter, container_keys=_CONTAINER_KEYS,
                              arch=arch)
    return BuiltTeacher(tokens, arch, sha, spec=spec)


def _import_factory(rest: str) -> Callable[..., nn.Module]:
    module_name, _, function_name = rest.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"teacher kind 'factory:{rest}': cannot import module {module_name!r}: {exc}",
            hint="make the module importable (installed, or on PYTHONPATH)",
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(
            f"teacher kind 'factory:{rest}': module {module_name!r} has no function "
            f"{function_name!r}"
        )
    return function


def _check_factory_module(module: Any, kind: str) -> nn.Module:
    """Refuse a factory result that does not answer the teacher protocol, naming what is wrong."""
    problems = []
    if not isinstance(module, nn.Module):
        problems.append(f"returned {type(module).__name__}, not an nn.Module")
    else:
        if not callable(getattr(module, "forward_tokens", None)):
            problems.append("has no forward_tokens(x) method")
        for attr in ("patch_size", "embed_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"attribute {attr} should be a positive int, found {value!r}")
        types = tuple(getattr(module, "token_types", ()))
        if types not in (TOKEN_TYPES, ("patch",)):
            problems.append(
                f"attribute token_types should be {TOKEN_TYPES} or ('patch',), found {types!r}"
            )
    if problems:
        raise ConfigError(f"teacher kind {kind!r}: the factory's module " + "; ".join(problems))
    return module


def factory_spec(rest: str) -> TeacherSpec:
    """Facts of a factory's module, read from an instance built on the meta device.

    A factory that cannot build there (it reads a file in its constructor, say) is built once
    on the CPU instead.
    """
    function = _import_factory(rest)
    try:
        with torch.device("meta"):
            module = function()
    except Exception:  # user code: any failure on meta tensors means "build it for real"
        with seeded_init(0):
            module = function()
    module = _check_factory_module(module, f"factory:{rest}")
    return _spec_from(f"factory:{rest}", module, f"user factory {rest}")


@register_teacher_prefix("factory", factory_spec)
def build_factory(cfg: TeacherConfig) -> BuiltTeacher:
    """A user's module from `module:function`, optionally filled from a local checkpoint."""
    _, _, rest = cfg.kind.partition(":")
    function = _import_factory(rest)
    if cfg.pretrained:
        raise ConfigError(
            f"{cfg.where}.pretrained: a factory loads its own weights; set checkpoint, or load "
            f"inside the factory and expose checkpoint_sha256 on the module"
        )
    with seeded_init(cfg.init_seed):
        module = _check_factory_module(function(**_overrides(cfg)), cfg.kind)
    arch = (
        f"factory {rest} -> {type(module).__qualname__} dim={module.embed_dim} "
        f"patch={module.patch_size} {' '.join(f'{k}={v}' for k, v in _overrides(cfg).items())}"
    ).strip()
    spec = _spec_from(cfg.kind, module, f"user factory {rest}")
    if cfg.checkpoint is not None:
        sha = load_checkpoint_into(
            module,
            cfg.checkpoint,
            lambda state, _: MappedState(tensors=dict(state)),
            container_keys=_CONTAINER_KEYS,
            where=cfg.where,
            arch=arch,
        )
    else:
        sha = str(getattr(module, "checkpoint_sha256", "") or random_init_id(cfg.init_seed))
    return BuiltTeacher(module, arch, sha, spec=spec)
