"""Config files of both stages: every field type-checked from its annotation, named on error.

One mechanism (`cache_format.serde.from_dict`, `cache_format.configfile`) reads the build
config (`CacheBuildConfig`) and the run config (`TrainConfig`); these tests hold both to it.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format.configfile import load_config, with_overrides
from cache_format.errors import ConfigError
from cache_format.locations import absolute_path, is_url, local_path
from cache_format.manifest import NAME_RULE
from cache_format.serde import from_dict
from cache_format.testing import tiny_teacher
from precompute.config import BuildSettings, CacheBuildConfig, RuntimeConfig, load_build_config
from precompute.dataset_keys import DatasetConfig
from precompute.teachers.config import TeacherConfig
from precompute.views import ViewConfig
from train.config import DataConfig, OptimConfig, TrainConfig, load_train_config

BUILD: dict[str, Any] = {
    "cache": "/caches/c",
    "grid": [2, 2],
    "views_per_image": 2,
    "samples_per_shard": 4,
    "teachers": [{"name": "dino", "kind": "test_vit_p14", "domain": "2d"}],
    "datasets": [{"name": "web", "kind": "folder", "root": "/data/web", "domain": "2d"}],
}


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of `data` with `a.b[0].c = value` set."""
    data = copy.deepcopy(data)
    node: Any = data
    parts = dotted.replace("[", ".").replace("]", "").split(".")
    keys = [int(p) if p.isdigit() else p for p in parts]
    for key in keys[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize(("field", "value"), [
    ("epochs", True),
    ("batch_size", 12.5),
    ("batch_size", "128"),
    ("seed", None),
    ("deterministic", 1),
    ("max_steps", [10]),
    ("out_dir", 3),
    ("optim.lr", "3e-4"),
    ("optim.betas", [0.9]),
    ("optim.betas[1]", "0.99"),
    ("optim.scale_lr_with_batch", "yes"),
    ("dropping.p", True),
    ("projector.n_blocks", 1.0),
    ("student.embed_dim", 32.5),
    ("data.teachers", "dino"),
    ("data.roots", ["web"]),
    ("data.roots.web", 7),
    ("data.heldout_images", "8"),
    ("optim", 1.0),
])
def test_train_config_type_errors_name_the_field(field: str, value: Any) -> None:
    data = _set({"data": {"cache": "/c"}, "optim": {"betas": [0.9, 0.99]}}, field, value)
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    message = str(info.value)
    assert message.startswith(f"{field}: expected "), message
    assert repr(value)[:20] in message  # what was found


@pytest.mark.parametrize(("field", "value"), [
    ("cache", 5),
    ("grid", [2, 2, 2]),
    ("seed", True),
    ("views_per_image", 2.0),
    ("build.batch_size", 1.5),
    ("build.max_pixels", "big"),
    ("runtime.processes", "yes"),
    ("runtime.loader_workers", False),
    ("views.flip_p", "half"),
    ("views.jitter", [0.4, 0.4, 0.2]),
    ("encoding.level", True),
    ("sharing.generic_domains", "2d"),
    ("teachers[0].init_seed", 1.0),
    ("teachers[0].pretrained", 0),
    ("teachers[0].checkpoint", 12),
    ("datasets[0].max_images", "10"),
    ("datasets[0].root", ["/data"]),
    ("teachers", {"name": "dino"}),
])
def test_build_config_type_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        CacheBuildConfig.from_dict(_set(BUILD, field, value))
    message = str(info.value)
    assert message.startswith(f"{field}"), message
    assert "expected" in message and repr(value)[:20] in message


def test_an_int_is_a_float_and_lists_become_tuples() -> None:
    cfg = TrainConfig.from_dict({"optim": {"lr": 1, "betas": [0, 0.5]}, "dropping": {"p": 0}})
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.0, 0.5) and all(type(b) is float for b in cfg.optim.betas)
    assert type(cfg.dropping.p) is float
    build = CacheBuildConfig.from_dict(BUILD)
    assert build.grid == (2, 2) and isinstance(build.teachers, tuple)
    # An element of a list is named by its index.
    with pytest.raises(ConfigError, match=r"^grid\[1\]: expected an integer, found a string '2'"):
        CacheBuildConfig.from_dict(_set(BUILD, "grid", [2, "2"]))
    with pytest.raises(ConfigError, match=r"^views\.scale\[1\]: expected a number, found a bool"):
        CacheBuildConfig.from_dict(_set(BUILD, "views.scale", [0.4, True]))


def test_missing_required_keys_are_named(tmp_path: Path) -> None:
    data = {k: v for k, v in BUILD.items() if k != "cache"}
    with pytest.raises(ConfigError, match=r"^cache: required, but missing"):
        CacheBuildConfig.from_dict(data)
    nested = _set(BUILD, "teachers", [{"name": "dino"}])
    with pytest.raises(ConfigError, match=r"^teachers\[0\]\.kind: required, but missing"):
        CacheBuildConfig.from_dict(nested)
    path = tmp_path / "cache.toml"
    path.write_text("grid = [2, 2]\nviews_per_image = 2\nsamples_per_shard = 4\n"
                    '[[teachers]]\nname = "dino"\nkind = "test_vit_p14"\n'
                    '[[datasets]]\nname = "web"\nkind = "folder"\nroot = "web"\ndomain = "2d"\n')
    with pytest.raises(ConfigError) as info:
        load_build_config(path)
    assert str(info.value) == f"{path}: cache: required, but missing"
    assert "'cache'" in info.value.hint
    # The command line's --cache fills the key in.
    assert load_build_config(path, {"cache": "/elsewhere"}).cache == "/elsewhere"


@pytest.mark.parametrize("text", ["nan", "inf", "-nan"])
def test_a_non_finite_lr_names_optim_lr(tmp_path: Path, text: str) -> None:
    path = tmp_path / "train.toml"
    path.write_text(f'[data]\ncache = "c"\n[optim]\nlr = {text}\n')
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert f"{path}: optim.lr: expected a finite number" in str(info.value)
    assert "min_lr" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^optim\.lr: "):
        OptimConfig(lr=float(text))  # built in Python, the cross-field check names lr too


def test_overrides_are_checked_and_named(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict({"data": {"cache": "/c"}})
    with pytest.raises(ConfigError, match=r"override 'optim\.learning_rate': 'learning_rate' is "
                                          r"not a field of optim"):
        with_overrides(cfg, {"optim.learning_rate": 1.0})
    with pytest.raises(ConfigError, match=r"^max_steps: expected an integer"):
        with_overrides(cfg, {"max_steps": "7"})
    with pytest.raises(ConfigError, match="optim.lr is a single value"):
        with_overrides(cfg, {"optim.lr.x": 1})
    assert with_overrides(cfg, {"max_steps": 7, "data.roots.web": "/w"}).data.roots == {
        "web": "/w"}
    with pytest.raises(ConfigError, match=r"override 'runtime\.gpu'"):
        load_build_config(_toml_build(tmp_path), {"runtime.gpu": 1})
    with pytest.raises(ConfigError, match=r"runtime\.processes: expected true or false"):
        load_build_config(_toml_build(tmp_path), {"runtime.processes": "no"})


def _toml_build(folder: Path) -> Path:
    path = folder / "sub" / "cache.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text('cache = "out/cache"\ngrid = [2, 2]\nviews_per_image = 2\n'
                    "samples_per_shard = 4\n"
                    '[[teachers]]\nname = "dino"\nkind = "test_vit_p14"\n'
                    'checkpoint = "~/w/dino.pth"\n'
                    '[[datasets]]\nname = "web"\nkind = "list"\nroot = "../images"\n'
                    'list_file = "lists/web.txt"\ndomain = "2d"\n')
    return path


def test_relative_paths_come_from_the_file_overrides_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _toml_build(tmp_path)
    cfg = load_build_config(path)
    assert cfg.cache == str(tmp_path / "sub" / "out" / "cache")
    assert cfg.datasets[0].root == str(tmp_path / "images")
    assert cfg.datasets[0].list_file == str(tmp_path / "sub" / "lists" / "web.txt")
    assert cfg.teachers[0].checkpoint == str(Path("~/w/dino.pth").expanduser())
    assert load_build_config(path, {"cache": "mine"}).cache == str(tmp_path / "mine")
    assert load_build_config(path, {"cache": "s3://b/c"}).cache == "s3://b/c"
    train = tmp_path / "sub" / "train.toml"
    train.write_text('init_from = "runs/a/last.pt"\n[data]\ncache = "out/cache"\n'
                     '[data.roots]\nweb = "../images"\n')
    run = load_train_config(train, {"out_dir": "here"})
    assert run.data.cache == cfg.cache and run.data.roots == {"web": str(tmp_path / "images")}
    assert run.init_from == str(tmp_path / "sub" / "runs" / "a" / "last.pt")
    assert run.out_dir == str(tmp_path / "here")
    assert load_config(TrainConfig, train) == load_train_config(train)  # one mechanism


def test_both_stages_report_a_bad_file_the_same_way(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [")
    for load in (load_build_config, load_train_config):
        with pytest.raises(ConfigError, match=rf"^{bad}: not valid TOML"):
            load(bad)
        with pytest.raises(ConfigError, match="no such config file"):
            load(tmp_path / "absent.toml")


def test_stored_manifests_and_run_folders_are_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match=r"^data\.num_workers: expected an integer"):
        from_dict(DataConfig, {"num_workers": 2.5}, where="data")


_floats = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
_names = st.from_regex(r"[a-z][a-z0-9_-]{0,7}", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(
    lr=_floats, frac=st.floats(0.0, 1.0), betas=st.tuples(st.floats(0, 0.99), st.floats(0, 0.99)),
    batch=st.integers(1, 4096), epochs=st.integers(1, 1000), flags=st.lists(st.booleans(),
    min_size=4, max_size=4), max_steps=st.none() | st.integers(0, 10**6),
    roots=st.dictionaries(_names, st.text(min_size=1, max_size=12).map(lambda s: "/" + s),
                          max_size=3),
    teachers=st.lists(_names, max_size=3, unique=True), p=st.floats(0.0, 1.0),
)
def test_train_config_round_trips_through_json(
    lr: float, frac: float, betas: tuple[float, float], batch: int, epochs: int,
    flags: list[bool], max_steps: int | None, roots: dict[str, str], teachers: list[str],
    p: float,
) -> None:
    cfg = TrainConfig.from_dict({
        "batch_size": batch, "epochs": epochs, "max_steps": max_steps,
        "deterministic": flags[0], "compile": flags[1], "amp": flags[2], "online": flags[3],
        "optim": {"lr": lr, "min_lr": lr * frac, "betas": list(betas)},
        "dropping": {"p": p}, "data": {"cache": "/c", "roots": roots, "teachers": teachers},
    })
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert with_overrides(cfg, {}) == cfg


@settings(max_examples=40, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 64), st.integers(1, 64)), views=st.integers(1, 8),
    shards=st.integers(1, 16), seed=st.integers(0, 2**32), names=st.lists(_names, min_size=1,
    max_size=3, unique=True), init_seed=st.integers(0, 2**62), flip=st.floats(0.0, 1.0),
    scale_low=st.floats(0.05, 1.0), batch=st.integers(1, 512),
)
def test_build_config_round_trips_through_json(
    grid: tuple[int, int], views: int, shards: int, seed: int, names: list[str],
    init_seed: int, flip: float, scale_low: float, batch: int,
) -> None:
    cfg = CacheBuildConfig.from_dict({
        **BUILD, "grid": list(grid), "views_per_image": views, "samples_per_shard": views * shards,
        "seed": seed, "views": {"flip_p": flip, "scale": [scale_low, 1.0]},
        "build": {"batch_size": batch},
        "teachers": [{"name": n, "kind": "test_vit_p14", "domain": "2d", "init_seed": init_seed}
                     for n in names],
    })
    again = CacheBuildConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and math.isclose(again.views.flip_p, flip)


@pytest.mark.parametrize("name", ["a.b", ".hidden", "", "x" * 65, "-lead", "sp ace", "é"])
def test_one_name_rule_for_datasets_teachers_and_the_manifest(name: str) -> None:
    """A name becomes a zarr node, a TOML key and part of a dotted override: one rule, no '.'."""
    makers = {
        "datasets[0].name": lambda: CacheBuildConfig.from_dict(_set(BUILD, "datasets[0].name",
                                                                    name)),
        "teachers[0].name": lambda: CacheBuildConfig.from_dict(_set(BUILD, "teachers[0].name",
                                                                    name)),
        "fingerprint": lambda: tiny_teacher(name=name),
    }
    if name in ("a.b", "x" * 65):
        # Caches written before the rule hold such names; their manifests stay readable.
        del makers["fingerprint"]
        assert tiny_teacher(name=name).name == name
    messages = []
    for make in makers.values():
        with pytest.raises(ConfigError) as info:
            make()
        messages.append(str(info.value))
    assert all(f"expected a name of {NAME_RULE}" in m and repr(name) in m for m in messages)
    for good in ("inet", "gldv2_2", "a-b", "X" * 64):
        tiny_teacher(name=good)
        CacheBuildConfig.from_dict(_set(BUILD, "datasets[0].name", good))


def test_one_url_rule() -> None:
    for url in ("s3://b/c", "memory://x", "file:///data/c", "gs+x://y"):
        assert is_url(url)
    for path in ("cache", "/data/c", "a/b://c", "", "./s3://x"):
        assert not is_url(path)
    assert local_path("file:///data/c") == "/data/c" and local_path("s3://b/c") is None
    assert local_path("/data/./c") == "/data/c"
    assert absolute_path("s3://b/c", "/base") == "s3://b/c" and absolute_path("", "/b") == ""
    assert absolute_path("../c", "/base/sub") == "/base/c"


def test_configs_built_in_python_meet_the_same_type_rule() -> None:
    """`check_types` in each `__post_init__`: no bare TypeError from a comparison later."""
    cases = [
        (lambda: TrainConfig(batch_size="128"), r"^batch_size: expected an integer"),  # type: ignore[arg-type]
        (lambda: OptimConfig(betas=(0.9, "x")), r"^optim\.betas\[1\]: expected a number"),  # type: ignore[arg-type]
        (lambda: DataConfig(num_workers=None), r"^data\.num_workers: expected an integer"),  # type: ignore[arg-type]
        (lambda: BuildSettings(batch_size=1.5), r"^build\.batch_size: expected an integer"),  # type: ignore[arg-type]
        (lambda: RuntimeConfig(processes=1), r"^runtime\.processes: expected true or false"),  # type: ignore[arg-type]
        (lambda: TeacherConfig(name="t", kind="test_vit_p14", init_seed=True),  # type: ignore[arg-type]
         r"^TeacherConfig\('t'\)\.init_seed: expected an integer"),
        (lambda: DatasetConfig(name="d", kind="folder", root=3, domain="2d"),  # type: ignore[arg-type]
         r"^DatasetConfig\.root: expected a string"),
        (lambda: ViewConfig(flip_p="0.5"), r"^ViewConfig\.flip_p: expected a number"),  # type: ignore[arg-type]
    ]
    for make, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            make()
