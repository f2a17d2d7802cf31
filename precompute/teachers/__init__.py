"""Teachers of stage one: a registry of teacher kinds, their weights, and one token API.

`load_teacher(TeacherConfig(name=..., kind=...))` (`precompute.teachers.loaded`) returns a
frozen `LoadedTeacher` whose `forward_tokens(x)` gives `{"cls": [B, D], "patch": [B, T, D]}`
(float32, registers dropped, no "cls" for teachers without one) for images normalized with the
teacher's `mean` / `std`. Built-in kinds: `dino2reg_vitlarge_14`, `mast3r_vitlarge_16`,
`multihmr_vitlarge_14_672`, the tiny `test_vit_p14` / `test_vit_p16`, and the open-ended
`timm:<model>` and `factory:<module>:<function>`.

Modules: `specs` (what each kind is: `TeacherSpec`, `get_teacher_spec`, `list_teachers`),
`config` (`TeacherConfig`), `registry` (builders: `register_teacher`, `BuiltTeacher`),
`loaded` (`load_teacher`, `LoadedTeacher`), `checkpoints` (weights files, `sha256_file`), and
one module per family of kinds. Import each name from the module that defines it; this package
only makes sure every built-in kind is registered whichever of them is imported first.
"""

from precompute.teachers import generic, mast3r, multihmr, vit_dinov2  # noqa: F401 (register)
