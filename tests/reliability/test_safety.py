"""Safety scenarios of issue 10 (items 8-10): untrusted cache code, list paths leaving the root,
random weights nobody asked for, and a checkpoint path that does not exist.

Each test does the damage, checks which command refuses and what its message names, and that
nothing else was lost (the cache reads and verifies as before).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import precompute.cache_tools as cache_tools
from cache_format.errors import ConfigError
from cache_format.reader import open_cache
from precompute.cli import app
from precompute.config import load_build_config
from precompute.dataset_keys import DatasetConfig
from precompute.sources import open_source
from precompute.synthetic import make_image_folder
from precompute.teachers.config import TeacherConfig
from precompute.teachers.trust import TRUST_ENV, UntrustedCodeError, check_cache_teachers
from tests.build_fixtures import TEACHERS, build_quiet, file_hashes, write_config
from train.demo import DemoSizes, cache_config

runner = CliRunner()

MARKER_MODULE = "dune_untrusted_probe"  # a module that records being imported


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory, images: dict) -> Path:
    """A tiny complete cache (one teacher, one dataset) built through the library."""
    root = tmp_path_factory.mktemp("safety")
    cfg = write_config(root / "cache.toml", root / "cache", images, teachers=("dino",),
                       dataset_names=("rooms",))
    build_quiet(cfg)
    return root


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module on sys.path whose import writes a marker file: proof that code ran."""
    marker = tmp_path / "imported"
    (tmp_path / f"{MARKER_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef make(**kw):\n    raise SystemExit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MARKER_MODULE, raising=False)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    return marker


def _with_factory_teacher(reader: object, kind: str) -> None:
    """Make `reader`'s manifest (in memory) say its teacher was built by `kind`."""
    manifest = reader.manifest  # type: ignore[attr-defined]
    build = dict(manifest.build_config)
    build["teachers"] = [{**t, "kind": kind} for t in build["teachers"]]
    edited = dataclasses.replace(manifest, build_config=build)
    reader.manifest = edited  # type: ignore[attr-defined]


def test_verify_recompute_refuses_a_factory_teacher_named_in_the_cache(
    small_cache: Path, probe_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest naming `factory:<module>:<fn>`: `verify --recompute` refuses, imports nothing."""
    real_open = cache_tools.open_cache

    def edited(path: str) -> object:
        reader = real_open(path)
        _with_factory_teacher(reader, f"factory:{MARKER_MODULE}:make")
        return reader

    monkeypatch.setattr(cache_tools, "open_cache", edited)
    result = runner.invoke(app, ["verify", str(small_cache / "cache"), "--recompute", "2"])
    assert result.exit_code != 0
    assert isinstance(result.exception, UntrustedCodeError)
    message = str(result.exception)
    assert "'dino'" in message and f"factory:{MARKER_MODULE}:make" in message
    assert TRUST_ENV in result.exception.hint and "--config" in result.exception.hint
    assert not probe_module.exists(), "the cache's factory module was imported"
    # Nothing else lost: without the edit the same cache verifies, recompute included.
    monkeypatch.setattr(cache_tools, "open_cache", real_open)
    clean = runner.invoke(app, ["verify", str(small_cache / "cache"), "--recompute", "2"])
    assert clean.exit_code == 0, clean.output


def test_online_targets_refuse_a_factory_teacher_named_in_the_cache(
    small_cache: Path, probe_module: Path
) -> None:
    """`fit --online` on a cache naming a factory teacher refuses before importing it."""
    from train.targets import OnlineTargets

    with open_cache(small_cache / "cache") as reader:
        _with_factory_teacher(reader, f"factory:{MARKER_MODULE}:make")
        with pytest.raises(UntrustedCodeError, match=f"factory:{MARKER_MODULE}:make"):
            OnlineTargets(reader.manifest)
    assert not probe_module.exists()


def test_dune_train_trust_flag_lets_online_targets_run_the_cache_code(
    small_cache: Path, probe_module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dune-train fit --trust-cache-code` is the explicit trust: after it, the same factory
    teacher that was refused above is imported and run."""
    from train.cli import app as train_app
    from train.targets import OnlineTargets

    monkeypatch.setenv(TRUST_ENV, "0")  # restored after the test, whatever the flag sets
    result = runner.invoke(train_app, ["fit", str(tmp_path / "missing.toml"),
                                       "--trust-cache-code"])
    assert result.exit_code != 0  # no such config: the flag acts before the config is read
    assert os.environ[TRUST_ENV] == "1"
    with open_cache(small_cache / "cache") as reader:
        _with_factory_teacher(reader, f"factory:{MARKER_MODULE}:make")
        with pytest.raises(SystemExit):  # the probe's make() ran
            OnlineTargets(reader.manifest)
    assert probe_module.exists(), "the trusted factory module was not imported"


def test_trust_comes_from_the_flag_or_the_users_own_config(
    probe_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A factory teacher runs with DUNE_TRUST_CACHE_CODE=1 or the same teacher in the own config."""
    kind = f"factory:{MARKER_MODULE}:make"
    cached = TeacherConfig(name="t", kind=kind)
    with pytest.raises(UntrustedCodeError):
        check_cache_teachers([cached], "here")
    check_cache_teachers([cached], "here", own={"t": TeacherConfig(name="t", kind=kind)})
    with pytest.raises(UntrustedCodeError):  # the user's own teacher of another kind
        check_cache_teachers([cached], "here",
                             own={"t": TeacherConfig(name="t", kind="test_vit_p14")})
    check_cache_teachers([cached], "here", trust=True)
    monkeypatch.setenv(TRUST_ENV, "1")
    check_cache_teachers([cached], "here")
    # Registered and timm kinds ship with the project: never refused.
    monkeypatch.delenv(TRUST_ENV)
    check_cache_teachers([TeacherConfig(name="d", kind="test_vit_p14")], "here")
    assert not probe_module.exists()


def test_parsing_a_caches_build_config_never_imports_its_factory(
    small_cache: Path, probe_module: Path
) -> None:
    """A stored config naming a domain-less factory teacher parses without importing its module."""
    from precompute.config import CacheBuildConfig

    with open_cache(small_cache / "cache") as reader:
        stored = dict(reader.manifest.build_config)
    stored["teachers"] = [{**t, "kind": f"factory:{MARKER_MODULE}:make", "domain": ""}
                          for t in stored["teachers"]]
    for strategy in ("all", "own"):
        try:
            CacheBuildConfig.from_dict({**stored, "sharing": {"strategy": strategy}})
        except ConfigError as exc:  # "own": the domain-less teacher gets no dataset
            assert "no dataset" in str(exc)
    assert not probe_module.exists()


def test_list_paths_with_dotdot_are_refused(tmp_path: Path) -> None:
    """A list file line with '..' (escaping the root or not) is refused naming line and path."""
    make_image_folder(tmp_path / "root" / "a", 2, seed=1)
    make_image_folder(tmp_path / "outside", 1, seed=2)
    a = tmp_path / "root" / "a"
    inside = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    secret = next(str(p.relative_to(tmp_path / "outside"))
                  for p in (tmp_path / "outside").rglob("*") if p.is_file())
    for line, number in ((f"../outside/{secret}", 2), (f"a/../../outside/{secret}", 2),
                         (f"a/../a/{inside[1]}", 2)):
        listing = tmp_path / "list.txt"
        listing.write_text(f"a/{inside[0]}\n{line}\n")
        cfg = DatasetConfig(name="d", kind="list", domain="2d",
                                       root=str(tmp_path / "root"),
                            list_file=str(listing))
        with pytest.raises(ConfigError) as info:
            open_source(cfg, 10**8, "convert")
        message = str(info.value)
        assert f"line {number}" in message and repr(line) in message and "'..'" in message
        assert "list.txt" in message
    # Nothing else lost: the same list without that line opens and reads.
    listing.write_text(f"a/{inside[0]}\na/{inside[1]}\n")
    source = open_source(DatasetConfig(name="d", kind="list", domain="2d",
                                       root=str(tmp_path / "root"),
                                       list_file=str(listing)), 10**8, "convert")
    assert source.keys() == [f"a/{inside[0]}", f"a/{inside[1]}"]
    assert source.load(1).shape[0] == 3


def test_symlinks_leaving_the_root_are_followed_as_documented(tmp_path: Path) -> None:
    """A symlink under the root pointing outside it is followed (list and folder kinds alike)."""
    make_image_folder(tmp_path / "outside", 1, seed=2)
    target = next(p for p in (tmp_path / "outside").rglob("*") if p.is_file())
    (tmp_path / "root").mkdir()
    os.symlink(target, tmp_path / "root" / f"link{target.suffix}")
    os.symlink(tmp_path / "outside", tmp_path / "root" / "linked-folder")
    listing = tmp_path / "list.txt"
    listing.write_text(f"link{target.suffix}\n")
    listed = open_source(DatasetConfig(name="d", kind="list", domain="2d",
                                       root=str(tmp_path / "root"),
                                       list_file=str(listing)), 10**8, "convert")
    assert listed.read_bytes(0) == target.read_bytes()
    folder = open_source(DatasetConfig(name="f", kind="folder", domain="2d",
                                       root=str(tmp_path / "root")),
                         10**8, "convert")
    inner = target.relative_to(tmp_path / "outside").as_posix()
    assert folder.keys() == sorted([f"link{target.suffix}", f"linked-folder/{inner}"])


def test_a_real_kind_without_weights_is_refused_unless_init_random(
    images: dict, tmp_path: Path
) -> None:
    """A ViT-L kind with no checkpoint: build and --dry-run refuse unless init = \"random\"."""
    text = write_config(tmp_path / "cache.toml", tmp_path / "cache", images, teachers=("dino",),
                        dataset_names=("rooms",)).read_text()
    no_init = tmp_path / "no-init.toml"
    no_init.write_text(text.replace('init = "random"\n', ""))
    for extra in (["--dry-run"], []):
        result = runner.invoke(app, ["build", str(no_init), *extra])
        assert result.exit_code != 0 and isinstance(result.exception, ConfigError)
        message = str(result.exception)
        assert "TeacherConfig('dino').checkpoint" in message
        assert "dino2reg_vitlarge_14" in message and "random weights" in message
        assert 'init = "random"' in result.exception.hint
        assert not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="contradicts"):
        TeacherConfig(name="t", kind="dino2reg_vitlarge_14", init="random",
                      checkpoint="w.pth")
    with pytest.raises(ConfigError, match="init"):
        TeacherConfig(name="t", kind="dino2reg_vitlarge_14", init="randm")
    # The demo's stand-ins say so themselves.
    demo = cache_config(DemoSizes(), {})
    assert all(t["init"] == "random" for t in demo["teachers"])
    # Test kinds are random by design and need no word.
    TeacherConfig(name="t", kind="test_vit_p14").check_weights_source()


def test_a_missing_checkpoint_is_caught_by_dry_run_and_the_build_start(
    images: dict, tmp_path: Path
) -> None:
    """A checkpoint path that does not exist: --dry-run and build refuse at once naming the path."""
    text = write_config(tmp_path / "cache.toml", tmp_path / "cache", images, teachers=("dino",),
                        dataset_names=("rooms",)).read_text()
    missing = tmp_path / "nowhere" / "dinov2.pth"
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('init = "random"', f'checkpoint = "{missing}"'))
    for extra in (["--dry-run"], []):
        result = runner.invoke(app, ["build", str(bad), *extra])
        assert result.exit_code != 0 and isinstance(result.exception, ConfigError)
        assert str(missing) in str(result.exception) and "found nothing" in str(result.exception)
        assert not (tmp_path / "cache").exists()
    assert TEACHERS["dino"]["init"] == "random"  # the fixture the rest of the suite builds with
    # Nothing else lost: the config without the bad path still loads and plans.
    assert load_build_config(tmp_path / "cache.toml").teachers[0].init == "random"


def test_a_checkpoint_folder_is_refused_too(small_cache: Path, tmp_path: Path) -> None:
    """A checkpoint that is a folder is refused naming it; the existing cache is untouched."""
    before = file_hashes(small_cache / "cache")
    folder = tmp_path / "weights.pth"
    folder.mkdir()
    text = (small_cache / "cache.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('init = "random"', f'checkpoint = "{folder}"'))
    result = runner.invoke(app, ["build", str(bad)])
    assert isinstance(result.exception, ConfigError) and "found a folder" in str(result.exception)
    assert file_hashes(small_cache / "cache") == before
