"""Teachers: registry, config checks, token shapes, seeded init, timm and factory kinds."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cache_format.errors import CheckpointError, ConfigError, InvalidTokensError, RegistryError
from cache_format.serde import from_dict, to_dict
from precompute.teachers.checkpoints import sha256_file
from precompute.teachers.config import TeacherConfig
from precompute.teachers.loaded import LoadedTeacher, load_teacher
from precompute.teachers.specs import get_teacher_spec, list_teachers

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny(kind: str, **fields: object) -> TeacherConfig:
    """A tiny random-init stand-in of `kind`."""
    return TeacherConfig(**{"name": "t", "kind": kind, **TINY, **fields})


def state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- a user factory, imported by the tests as factory:tests.test_teachers:<function> -----------


class TinyFactoryTeacher(nn.Module):
    """A minimal module answering the teacher protocol (patch 8, cls = mean of patches)."""

    token_types = ("cls", "patch")
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, embed_dim: int = 16) -> None:
        super().__init__()
        self.patch_size = 8
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=8, stride=8)

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        patch = self.proj(x).flatten(2).transpose(1, 2)
        return {"cls": patch.mean(dim=1), "patch": patch}


def tiny_factory(embed_dim: int = 16) -> nn.Module:
    return TinyFactoryTeacher(embed_dim)


def broken_factory() -> nn.Module:
    return nn.Linear(2, 2)


def wrong_shape_factory() -> nn.Module:
    teacher = TinyFactoryTeacher()
    teacher.embed_dim = 99  # lies about its width: the load-time probe must catch it
    return teacher


def missing_cls_factory() -> nn.Module:
    teacher = TinyFactoryTeacher()
    teacher.forward_tokens = lambda x: {"patch": TinyFactoryTeacher.forward_tokens(teacher, x)[
        "patch"]}  # promises a cls token, returns none
    return teacher


# --- registry ----------------------------------------------------------------------------------


def test_registry_lists_the_built_in_kinds() -> None:
    names = list_teachers()
    for kind in ("dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"):
        assert kind in names
    assert names == sorted(names)
    spec = get_teacher_spec("mast3r_vitlarge_16")
    assert (spec.patch_size, spec.dim, spec.token_types) == (16, 1024, ("patch",))
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert get_teacher_spec("dino2reg_vitlarge_14").token_types == ("cls", "patch")
    assert get_teacher_spec("multihmr_vitlarge_14_672").checkpoint_file == "multiHMR_672_L.pt"


def test_unknown_kind_lists_the_valid_names() -> None:
    with pytest.raises(RegistryError) as err:
        TeacherConfig(name="t", kind="dinov3_huge")
    message = str(err.value)
    assert "dinov3_huge" in message
    for kind in list_teachers():
        assert kind in message
    assert "timm:<timm model name>" in message and "factory:<module>:<function>" in message
    with pytest.raises(RegistryError, match="dino2reg_vitlarge_14"):
        get_teacher_spec("nope")
    with pytest.raises(RegistryError, match="unknown timm model 'not_a_model'"):
        TeacherConfig(name="t", kind="timm:not_a_model")


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field_named"),
    [
        ({"name": "has space"}, "name"),
        ({"name": ""}, "name"),
        ({"checkpoint": "weights.ckpt"}, "checkpoint"),
        ({"checkpoint": "w.pth", "pretrained": True}, "pretrained"),
        ({"pretrained": True, "depth": 2}, "pretrained"),
        ({"depth": 0}, "depth"),
        ({"num_heads": True}, "num_heads"),
        ({"embed_dim": 30, "num_heads": 4}, "embed_dim"),
        ({"init_seed": -1}, "init_seed"),
        ({"kind": "timm:"}, "kind"),
        ({"kind": "factory:no_function"}, "kind"),
        ({"kind": "factory:pkg.mod:not an identifier"}, "kind"),
    ],
)
def test_config_rejects_bad_fields_naming_them(fields: dict, field_named: str) -> None:
    base = {"name": "t", "kind": "test_vit_p14"}
    with pytest.raises(ConfigError, match=rf"\.{field_named}:"):
        TeacherConfig(**{**base, **fields})


def test_config_round_trips_through_plain_data() -> None:
    cfg = TeacherConfig(name="mast3r", kind="mast3r_vitlarge_16", embed_dim=48, num_heads=2)
    data = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(TeacherConfig, data) == cfg
    assert cfg.effective_domain() == "3d"
    indoor = TeacherConfig(name="m", kind="mast3r_vitlarge_16", domain="indoor")
    assert indoor.effective_domain() == "indoor"


def test_kind_specific_checks_happen_at_load() -> None:
    with pytest.raises(ConfigError, match="multiple of 4"):  # 2D RoPE splits heads in quarters
        load_teacher(tiny("mast3r_vitlarge_16", embed_dim=36, num_heads=2))
    with pytest.raises(ConfigError, match="pretrained"):
        load_teacher(TeacherConfig(name="m", kind="mast3r_vitlarge_16", pretrained=True))
    with pytest.raises(ConfigError, match="pretrained"):
        load_teacher(TeacherConfig(name="m", kind="multihmr_vitlarge_14_672", pretrained=True))


# --- every built-in kind, tiny ------------------------------------------------------------------


@pytest.fixture(scope="module", params=list_teachers())
def tiny_teacher(request: pytest.FixtureRequest) -> LoadedTeacher:
    return load_teacher(tiny(request.param))


@pytest.mark.parametrize("grid", [(2, 3), (4, 4)])
def test_every_kind_gives_grid_matched_tokens(tiny_teacher: LoadedTeacher, grid: tuple) -> None:
    teacher = tiny_teacher
    spec = get_teacher_spec(teacher.kind)
    assert teacher.token_types == spec.token_types
    assert (teacher.patch_size, teacher.dim) == (spec.patch_size, 32)
    x = torch.randn(2, 3, *teacher.input_size(grid), generator=torch.Generator().manual_seed(0))
    out = teacher.forward_tokens(x)
    assert set(out) == set(spec.token_types)
    assert out["patch"].shape == (2, grid[0] * grid[1], 32)
    assert out["patch"].dtype == torch.float32 and torch.isfinite(out["patch"]).all()
    if "cls" in spec.token_types:
        assert out["cls"].shape == (2, 32) and out["cls"].dtype == torch.float32
    # the two images of the batch are processed independently
    alone = teacher.forward_tokens(x[1:])
    torch.testing.assert_close(alone["patch"][0], out["patch"][1], atol=1e-5, rtol=1e-5)


def test_teachers_are_frozen_and_do_not_track_gradients(tiny_teacher: LoadedTeacher) -> None:
    assert not tiny_teacher.module.training
    assert not any(p.requires_grad for p in tiny_teacher.module.parameters())
    x = torch.randn(1, 3, *tiny_teacher.input_size((2, 2)), requires_grad=True)
    assert not tiny_teacher.forward_tokens(x)["patch"].requires_grad


def test_bf16_autocast_still_returns_float32_close_to_fp32(tiny_teacher: LoadedTeacher) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *tiny_teacher.input_size((3, 3)), generator=generator)
    exact = tiny_teacher.forward_tokens(x)["patch"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tiny_teacher.forward_tokens(x)["patch"]
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, exact, dim=-1).min() > 0.99


def test_inputs_that_do_not_fit_the_patch_grid_are_refused() -> None:
    teacher = load_teacher(tiny("test_vit_p16"))
    with pytest.raises(ValueError, match="not a multiple of its patch size 16"):
        teacher.forward_tokens(torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        teacher.forward_tokens(torch.zeros(3, 32, 32))


# --- seeded random init -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list_teachers())
def test_random_init_is_a_pure_function_of_the_seed(kind: str) -> None:
    before = torch.random.get_rng_state()
    first, second = load_teacher(tiny(kind, init_seed=3)), load_teacher(tiny(kind, init_seed=3))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    assert state_digest(first.module) == state_digest(second.module)
    assert first.checkpoint_sha256 == "random-init:seed=3"
    assert state_digest(load_teacher(tiny(kind, init_seed=4)).module) != state_digest(first.module)


def test_random_init_is_identical_in_another_process() -> None:
    kinds = list_teachers()
    script = (
        "import json, sys\n"
        "from tests.test_teachers import load_teacher, state_digest, tiny\n"
        "kinds = json.loads(sys.argv[1])\n"
        "digests = {k: state_digest(load_teacher(tiny(k, init_seed=5)).module) for k in kinds}\n"
        "print(json.dumps(digests))\n"
    )
    # The other process starts first and computes while this one does (a core is free).
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(kinds)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        here = {k: state_digest(load_teacher(tiny(k, init_seed=5)).module) for k in kinds}
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    there = json.loads(out.strip().splitlines()[-1])
    assert there == here


# --- timm kinds ---------------------------------------------------------------------------------


def test_timm_kind_drops_prefix_tokens_and_takes_cls_first() -> None:
    teacher = load_teacher(tiny("timm:vit_small_patch14_dinov2"))
    assert teacher.token_types == ("cls", "patch") and teacher.patch_size == 14
    x = torch.randn(1, 3, 28, 42)
    out = teacher.forward_tokens(x)
    with torch.no_grad():
        raw = teacher.module.model.forward_features(x)
    assert torch.equal(out["cls"], raw[:, 0]) and torch.equal(out["patch"], raw[:, 1:])
    no_cls = load_teacher(tiny("timm:vit_base_patch16_gap_224"))
    assert no_cls.token_types == ("patch",)
    assert set(no_cls.forward_tokens(torch.randn(1, 3, 32, 48))) == {"patch"}


def test_timm_spec_is_read_without_building_weights() -> None:
    spec = get_teacher_spec("timm:vit_large_patch14_reg4_dinov2")
    assert (spec.patch_size, spec.dim, spec.token_types) == (14, 1024, ("cls", "patch"))
    assert spec.mean == (0.485, 0.456, 0.406)


def test_timm_kind_loads_a_local_checkpoint(tmp_path: Path) -> None:
    source = load_teacher(tiny("timm:vit_small_patch14_dinov2", init_seed=1))
    path = tmp_path / "vit_small.pth"
    torch.save(source.module.model.state_dict(), path)
    loaded = load_teacher(tiny("timm:vit_small_patch14_dinov2", checkpoint=str(path)))
    assert loaded.checkpoint_sha256 == sha256_file(path)
    assert state_digest(loaded.module) == state_digest(source.module)


# --- factory kinds ------------------------------------------------------------------------------


def test_factory_kind_builds_the_users_module(tmp_path: Path) -> None:
    kind = "factory:tests.test_teachers:tiny_factory"
    teacher = load_teacher(TeacherConfig(name="mine", kind=kind, embed_dim=24))
    assert (teacher.patch_size, teacher.dim, teacher.mean) == (8, 24, (0.5, 0.5, 0.5))
    out = teacher.forward_tokens(torch.randn(2, 3, 16, 24))
    assert out["patch"].shape == (2, 6, 24) and out["cls"].shape == (2, 24)
    spec = get_teacher_spec(kind)
    assert (spec.patch_size, spec.dim, spec.std) == (8, 16, (0.25, 0.25, 0.25))
    path = tmp_path / "mine.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in teacher.module.state_dict().items()}, str(path))
    again = load_teacher(TeacherConfig(name="mine", kind=kind, embed_dim=24, checkpoint=str(path)))
    assert state_digest(again.module) == state_digest(teacher.module)
    assert again.checkpoint_sha256 == sha256_file(path)


@pytest.mark.parametrize(
    ("kind", "message", "error"),
    [
        ("factory:tests.test_teachers:broken_factory", "no forward_tokens", ConfigError),
        ("factory:tests.test_teachers:missing_function", "has no function 'missing_function'",
         ConfigError),
        ("factory:tests.no_such_module:f", "cannot import module 'tests.no_such_module'",
         ConfigError),
        # A teacher whose outputs break its promise is not a config mistake: bad tokens.
        ("factory:tests.test_teachers:wrong_shape_factory", r"shape \(1, 16\), expected \(1, 99\)",
         InvalidTokensError),
        ("factory:tests.test_teachers:missing_cls_factory",
         r"'mine'.*returned keys \['patch'\], expected \['cls', 'patch'\]", InvalidTokensError),
    ],
)
def test_factory_kind_refuses_what_does_not_answer_the_protocol(
    kind: str, message: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=message):
        load_teacher(TeacherConfig(name="mine", kind=kind))


# --- checksums ----------------------------------------------------------------------------------


def test_sha256_is_streamed_and_exact(tmp_path: Path) -> None:
    payload = torch.randint(0, 256, (3 * 2**20 + 17,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()


def test_a_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="no file at .*nowhere.pth"):
        load_teacher(tiny("test_vit_p14", checkpoint=str(missing)))


# --- hub weights (online users): the call is checked without the network -----------------------


def test_pretrained_without_checkpoint_asks_timm_for_hub_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import timm

    calls: list[tuple[str, bool]] = []
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs: object) -> nn.Module:
        calls.append((name, pretrained))
        kwargs.update(embed_dim=32, depth=1, num_heads=2)  # a tiny stand-in, no download
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    dinov2 = load_teacher(TeacherConfig(name="d", kind="dino2reg_vitlarge_14", pretrained=True))
    assert calls[-1] == ("vit_large_patch14_reg4_dinov2.lvd142m", True)
    assert dinov2.checkpoint_sha256 == "hub:timm/vit_large_patch14_reg4_dinov2.lvd142m"
    generic = load_teacher(
        TeacherConfig(name="s", kind="timm:vit_small_patch14_dinov2.lvd142m", pretrained=True)
    )
    assert calls[-1] == ("vit_small_patch14_dinov2.lvd142m", True)
    assert generic.checkpoint_sha256 == "hub:timm/vit_small_patch14_dinov2.lvd142m"
