"""`load_teacher`: a frozen teacher ready to run, with the facts the cache manifest records."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cache_format.errors import InvalidTokensError
from precompute.teachers.config import TeacherConfig
from precompute.teachers.registry import get_builder
from precompute.teachers.specs import TeacherSpec, get_teacher_spec

_PROBE_GRID = (2, 3)  # a tiny non-square grid: one cheap forward checks every teacher's shapes


@dataclass(frozen=True, eq=False)
class LoadedTeacher:
    """A teacher in eval mode with frozen weights, and its fingerprint facts.

    `arch` describes the architecture including overrides; `checkpoint_sha256` is the weights
    file's hex digest, `random-init:seed=N` or `hub:<name>`. `dim` and `patch_size` are those of
    the built module (overrides included); `mean` / `std` are what inputs must be normalized
    with before `forward_tokens`.
    """

    module: nn.Module
    name: str
    kind: str
    arch: str
    patch_size: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token_types: tuple[str, ...]
    checkpoint_sha256: str
    domain: str
    spec: TeacherSpec

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Image (H, W) at which this teacher's token grid equals `grid` (grid x patch size)."""
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    @property
    def device(self) -> torch.device:
        """Where the module's weights live."""
        first = next(iter(self.module.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens of normalized images [B, 3, H, W]: {"cls": [B, D], "patch": [B, T, D]}, fp32.

        H and W must be multiples of the patch size; T = (H/p) * (W/p), row-major. There is no
        "cls" key when the teacher has no cls token. Runs under `torch.inference_mode`; the
        caller chooses autocast (bf16 on CUDA), the output is always float32.
        """
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"teacher {self.name!r}: expected a float tensor [B, 3, H, W], "
                f"found {x.dtype} {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size or height == 0 or width == 0:
            raise ValueError(
                f"teacher {self.name!r}: input {height}x{width} is not a multiple of its patch "
                f"size {self.patch_size}; resize to grid x {self.patch_size}"
            )
        with torch.inference_mode():
            raw = self.module.forward_tokens(x)
        return self._checked(
            raw, x.shape[0], (height // self.patch_size) * (width // self.patch_size)
        )

    def _checked(
        self, raw: dict[str, torch.Tensor], batch: int, count: int
    ) -> dict[str, torch.Tensor]:
        if set(raw) != set(self.token_types):
            raise InvalidTokensError(
                f"teacher {self.name!r} ({self.kind}): forward_tokens returned keys "
                f"{sorted(raw)}, expected {sorted(self.token_types)}"
            )
        expected = {"patch": (batch, count, self.dim), "cls": (batch, self.dim)}
        out = {}
        for token_type in self.token_types:
            tensor = raw[token_type]
            if tuple(tensor.shape) != expected[token_type]:
                raise InvalidTokensError(
                    f"teacher {self.name!r} ({self.kind}): {token_type!r} tokens have shape "
                    f"{tuple(tensor.shape)}, expected {expected[token_type]}"
                )
            out[token_type] = tensor.float().contiguous()
        return out


def load_teacher(cfg: TeacherConfig, device: str | torch.device = "cpu") -> LoadedTeacher:
    """Build `cfg`'s teacher, fill its weights, freeze it, move it to `device`, check its shapes.

    Weights: `cfg.checkpoint` (a local file, keys mapped and checked), else the hub when
    `cfg.pretrained`, else a random init seeded with `cfg.init_seed` (bit-identical across
    processes). One tiny forward at load time checks that the outputs have the promised keys and
    shapes, so a wrong factory or override fails here rather than inside a build.
    """
    built = get_builder(cfg.kind)(cfg)
    spec = built.spec or get_teacher_spec(cfg.kind)
    module = built.module
    module.eval()
    module.requires_grad_(False)
    module.to(device)
    teacher = LoadedTeacher(
        module=module,
        name=cfg.name,
        kind=cfg.kind,
        arch=built.arch,
        patch_size=int(module.patch_size),
        dim=int(module.embed_dim),
        mean=tuple(float(v) for v in spec.mean),
        std=tuple(float(v) for v in spec.std),
        token_types=tuple(getattr(module, "token_types", spec.token_types)),
        checkpoint_sha256=built.checkpoint_sha256,
        domain=cfg.domain or spec.domain,
        spec=spec,
    )
    probe = torch.zeros(1, 3, *teacher.input_size(_PROBE_GRID), device=device)
    teacher.forward_tokens(probe)
    return teacher
