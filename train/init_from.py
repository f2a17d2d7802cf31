"""`init_from`: start a run from another run's weights (e.g. the 336 -> 448 px stage)."""

from __future__ import annotations

from safetensors.torch import load_file

from cache_format.errors import CheckpointError
from train.checkpoint import load_checkpoint
from train.dune_format import fill_model, is_dune_file, load_dune_checkpoint
from train.model import DistillModel

#: TeacherNorm buffers that carry over with `norms=True`: the running statistics. The step
#: count (`steps_seen`) does not: the new run's momentum schedule starts again, as the
#: reference's does when a run starts from `--pretrained` weights.
_NORM_BUFFERS = ("mean", "std", "has_stats")


def init_model_from(model: DistillModel, path: str, *, norms: bool = False) -> None:
    """Initialise from a run checkpoint (.pt), an exported full model or a student (.safetensors),
    or a checkpoint in naver/dune's layout (.pth: a released DUNE model or our DUNE export).

    The student's position embeddings are interpolated to its grid (the 336 -> 448 stage);
    projectors are taken for the teachers whose names and widths match, the others stay new.
    `norms`: also take the TeacherNorm running statistics of the matching teachers and token
    types (batch mode; exact mode installs the new cache's own statistics instead).
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
    if norms:
        for name, per_token in model.norms.items():
            for tok, norm in per_token.items():
                prefix = f"norms.{name}.{tok}."
                own = norm.state_dict()
                part = {b: state[prefix + b] for b in _NORM_BUFFERS
                        if prefix + b in state and state[prefix + b].shape == own[b].shape}
                if len(part) == len(_NORM_BUFFERS):
                    norm.load_state_dict(part, strict=False)  # steps_seen stays at 0
