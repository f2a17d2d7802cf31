"""`init_from`: start a run from another run's weights (e.g. the 336 -> 448 px stage)."""

from __future__ import annotations

from safetensors.torch import load_file

from cache_format.errors import CheckpointError
from train.checkpoint import load_checkpoint
from train.dune_format import fill_model, is_dune_file, load_dune_checkpoint
from train.model import DistillModel


def init_model_from(model: DistillModel, path: str) -> None:
    """Initialise from a run checkpoint (.pt), an exported full model or a student (.safetensors),
    or a checkpoint in naver/dune's layout (.pth: a released DUNE model or our DUNE export).

    The student's position embeddings are interpolated to its grid (the 336 -> 448 stage);
    projectors are taken for the teachers whose names and widths match, the others stay new.
    """
    if is_dune_file(path):
        # A released DUNE student or `export --format dune`: encoder and matching projectors.
        # Norms are not taken: the run's own statistics apply (exact mode), and in batch mode
        # the EMA restarts at momentum 1, so the first batch replaces any loaded value anyway.
        fill_model(model, load_dune_checkpoint(path), norms=False)
        return
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
