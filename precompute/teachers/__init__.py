"""Teachers of stage one: a registry of teacher kinds, their weights, and one token API.

`load_teacher(TeacherConfig(name=..., kind=...))` returns a frozen `LoadedTeacher` whose
`forward_tokens(x)` gives `{"cls": [B, D], "patch": [B, T, D]}` (float32, registers dropped, no
"cls" for teachers without one) for images normalized with the teacher's `mean` / `std`.
Built-in kinds: `dino2reg_vitlarge_14`, `mast3r_vitlarge_16`, `multihmr_vitlarge_14_672`, the
tiny `test_vit_p14` / `test_vit_p16`, and the open-ended `timm:<model>` and
`factory:<module>:<function>`.
"""

from precompute.teachers import generic, mast3r, multihmr, vit_dinov2  # noqa: F401 (register)
from precompute.teachers.checkpoints import KeyReport, sha256_file
from precompute.teachers.config import TeacherConfig
from precompute.teachers.loaded import LoadedTeacher, load_teacher
from precompute.teachers.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TOKEN_TYPES,
    BuiltTeacher,
    TeacherSpec,
    get_teacher_spec,
    list_teachers,
    register_teacher,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TOKEN_TYPES",
    "BuiltTeacher",
    "KeyReport",
    "LoadedTeacher",
    "TeacherConfig",
    "TeacherSpec",
    "get_teacher_spec",
    "list_teachers",
    "load_teacher",
    "register_teacher",
    "sha256_file",
]
