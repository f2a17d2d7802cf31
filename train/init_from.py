"""`init_from`: start a run from another run's weights (e.g. the 336 -> 448 px stage)."""

from __future__ import annotations

from safetensors.torch import load_file

from cache_format.errors import CheckpointError
from train.checkpoint import load_checkpoint
from train.model import DistillModel


def init_model_from(model: DistillModel, path: str) -> None:
    """Initialise from a run checkpoint (.pt), an exported full model or a student (.safetensors).

    The student's position embeddings are interpolated to its grid (the 336 -> 448 stage);
    projectors are taken for the teachers whose names and widths match, the others stay new.
    """
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = load_checkpoint(path)["model"]
    student_state = {
        k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")
    }
    if not student_state and not any(k.startswith(("blocks.", "vit.blocks.")) for k in state):
        raise CheckpointError(
            f"{path}: holds no student weights (no 'student.*' or timm ViT keys)",
            hint="init_from takes a run's checkpoints/*.pt, or an exported *.safetensors",
        )
    model.student.load_encoder_state(student_state or state)
    for name, projector in model.projectors.items():
        prefix = f"projectors.{name}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        own = projector.state_dict()
        if part and part.keys() == own.keys() and all(part[k].shape == own[k].shape for k in own):
            projector.load_state_dict(part)
