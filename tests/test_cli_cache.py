"""`dune-cache` commands: build (and --dry-run), info, verify, ls, and the error line of main()."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import zarr
from rich.console import Console
from typer.testing import CliRunner

from cache_format import layout
from cache_format.errors import DuneError
from cache_format.files import tree_sizes
from cache_format.reader import open_cache
from precompute.build import build_cache
from precompute.cli import app, main
from precompute.config import load_build_config
from precompute.synthetic import BAD_KINDS
from tests.build_fixtures import ROOMS, WEB_GOOD, file_hashes, write_config

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, images: dict) -> tuple[Path, str]:
    """(config path, build command output) of a cache built through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    cfg = write_config(root / "cache.toml", root / "in-config", images)
    result = runner.invoke(app, ["build", str(cfg), "--cache", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_build_overrides_the_cache_path_and_prints_a_summary(built: tuple[Path, str]) -> None:
    root, output = built
    assert not (root / "in-config").exists() and (root / "cache" / "zarr.json").exists()
    for expected in ("written this run", "images per dataset", "unsupported_mode",
                     f"cache: {root / 'cache'}", "on disk"):
        assert expected in output, output


def test_dry_run_prints_the_plan_and_touches_nothing(built: tuple[Path, str], images: dict,
                                                     tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cache.toml", tmp_path / "new" / "cache", images)
    result = runner.invoke(app, ["build", str(cfg), "--dry-run"])
    assert result.exit_code == 0, result.output
    for expected in ("build plan", "dino", "mast3r", "rooms", "web", "(new)",
                     "estimated cache size", "free space", "nothing was written"):
        assert expected in result.output, result.output
    assert not (tmp_path / "new").exists()
    root, _ = built
    before = file_hashes(root / "cache")
    result = runner.invoke(app, ["build", str(root / "cache.toml"), "--cache",
                                 str(root / "cache"), "--dry-run"])
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output
    assert file_hashes(root / "cache") == before


def test_a_second_build_says_once_that_the_cache_is_complete(built: tuple[Path, str],
                                                            images: dict) -> None:
    root, _ = built
    before = file_hashes(root / "cache")
    result = runner.invoke(app, ["build", str(root / "cache.toml"), "--cache",
                                 str(root / "cache")])
    assert result.exit_code == 0, result.output
    assert result.output.count("nothing to do") == 1, result.output
    # Shards of 4 samples (2 images): rooms has 4 images, web 6 good ones and one of each bad kind.
    shards = -(-ROOMS // 2) + -(-(WEB_GOOD + len(BAD_KINDS)) // 2)
    line = next(line for line in result.output.splitlines() if "nothing to do" in line)
    assert (f"complete for this config: 2 dataset(s) x 2 teacher(s) in 4 pair(s), {shards} index "
            f"and {2 * shards} token shard(s) written, statistics final") in line, line
    assert file_hashes(root / "cache") == before
    # The library call, which makes (and so prints) its own plan, says it once too.
    console = Console(file=io.StringIO(), width=200)
    build_cache(load_build_config(root / "cache.toml", {"cache": str(root / "cache")}),
                console=console)
    assert console.file.getvalue().count("nothing to do") == 1  # type: ignore[attr-defined]


def test_info_as_tables_and_as_json(built: tuple[Path, str]) -> None:
    root, _ = built
    facts = json.loads(runner.invoke(app, ["info", str(root / "cache"), "--json"]).output)
    assert facts["complete"] and facts["grid"] == [2, 2] and facts["encoding"]["name"] == "int8"
    assert {(p["teacher"], p["dataset"]) for p in facts["pairs"]} == {
        (t, d) for t in ("dino", "mast3r") for d in ("rooms", "web")}
    assert all(p["shards_done"] == p["shards"] and p["bytes"] > 0 for p in facts["pairs"])
    web = next(d for d in facts["datasets"] if d["name"] == "web")
    assert web["statuses"]["truncated"] == 2 and web["statuses"]["ok"] == 12
    tables = runner.invoke(app, ["info", str(root / "cache")])
    assert tables.exit_code == 0
    for expected in ("dino", "mast3r", "rooms", "web", "int8", "complete"):
        assert expected in tables.output


def test_verify_passes_with_recompute_and_fails_on_damage(built: tuple[Path, str],
                                                          tmp_path: Path) -> None:
    root, _ = built
    result = runner.invoke(app, ["verify", str(root / "cache"), "--recompute", "4"])
    assert result.exit_code == 0, result.output
    assert "recompute dino" in result.output and "recompute mast3r" in result.output
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "cache", damaged)
    # Flip one byte of a token shard file (shard 6 of web: two good images).
    tokens = zarr.open_group(str(damaged), mode="r")[
        f"{layout.teacher_path('web', 'dino')}/{layout.TOKENS}"]
    key = tokens.metadata.encode_chunk_key((6,) + (0,) * (tokens.ndim - 1))
    shard = damaged / tokens.path / key
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    mast3r = damaged / "datasets" / "rooms" / "teachers" / "mast3r"
    (mast3r / "shard_meta" / "c" / "1" / "0").unlink()
    result = runner.invoke(app, ["verify", str(damaged)])
    assert result.exit_code == 1, result.output
    assert "problem" in result.output and "rooms/mast3r shard 1" in result.output


def test_ls_lists_each_cache_once(built: tuple[Path, str]) -> None:
    root, _ = built
    result = runner.invoke(app, ["ls", str(root.parent)])
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if str(root / "cache") in line]
    assert len(lines) == 1 and "int8" in lines[0] and "dino,mast3r" in lines[0]


def test_main_turns_errors_into_one_red_line_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["dune-cache", "build", str(tmp_path / "missing.toml")])
    monkeypatch.delenv("DUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "error:" in err and "missing.toml: no such config file" in err and "hint:" in err
    assert "Traceback" not in err
    # DUNE_DEBUG=1 re-raises the error itself (tests/test_errors.py checks the traceback that
    # Python then prints, for both CLIs).
    monkeypatch.setenv("DUNE_DEBUG", "1")
    with pytest.raises(DuneError, match="missing.toml: no such config file"):
        main()
    monkeypatch.setattr(sys, "argv", ["dune-cache", "verify"])  # a usage error
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "Missing argument" in capsys.readouterr().err


def test_info_sizes_come_from_one_walk_and_equal_each_folder_size(built: tuple[Path, str],
                                                                  tmp_path: Path) -> None:
    """`info` sums the cache's and every pair's bytes in one walk (tree_sizes): the same
    numbers as one walk per folder, and a lost shard file is still found (one stat each)."""
    root, _ = built
    with open_cache(root / "cache") as reader:
        total, pairs = reader.nbytes_by_pair()
        assert total == reader.nbytes() and total > sum(pairs.values()) > 0
        assert pairs == {(d, t): reader.nbytes(d, t) for d, t in pairs}
    assert tree_sizes(str(tmp_path / "nothing"), ["", "a"]) == {"": 0, "a": 0}
    copy = tmp_path / "copy"
    shutil.copytree(root / "cache", copy)
    tokens = zarr.open_group(str(copy), mode="r")[
        f"{layout.teacher_path('web', 'dino')}/{layout.TOKENS}"]
    (copy / tokens.path / tokens.metadata.encode_chunk_key((6,) + (0,) * (tokens.ndim - 1))
     ).unlink()
    with open_cache(copy) as reader:
        assert reader.lost_shard_files("web", "dino") == [6]  # two good images
        assert reader.lost_shard_files("rooms", "dino") == []
