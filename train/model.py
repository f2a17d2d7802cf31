"""The model a run trains: the student, one projector per teacher and the teachers' norms.

`DistillModel` is what a run builds, checkpoints (its `state_dict`) and exports (see
`train.export`). The norms standardize the *targets* and are applied outside `forward` (see
`train.step`), so that DDP wraps only what has gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from cache_format.manifest import TOKEN_TYPES
from train.config import TrainConfig
from train.projectors import build_projector, split_tokens
from train.student import build_student
from train.teacher_norm import TeacherNorm


@dataclass(frozen=True)
class TeacherHead:
    """What the model needs to know of one teacher: its width and whether it has a cls token."""

    dim: int
    has_cls: bool

    @property
    def token_types(self) -> tuple[str, ...]:
        """The token types the teacher has, in the cache's order."""
        return TOKEN_TYPES if self.has_cls else ("patch",)


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
                        for tok in head.token_types
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
