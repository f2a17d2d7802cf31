"""Repair and skipped images on a real (tiny) build: `dune-cache build --redo-damaged`
recomputes exactly the damaged shards, bit for bit; `ls --skipped` lists skipped images."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache_format.errors import CacheCorruptionError
from precompute.cli import app
from tests.build_fixtures import build_quiet, file_hashes, write_config
from tests.reliability.cachekit import flip_byte


@pytest.fixture(scope="module")
def built(images: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("repair")
    config = write_config(root / "cache.toml", root / "cache", images)
    build_quiet(config)
    return config, root / "cache", file_hashes(root / "cache")


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_redo_damaged_recomputes_exactly_the_damaged_shards(built: tuple[Path, Path, dict]
                                                            ) -> None:
    """Deleted token shard file plus flipped byte in another shard and in an index shard:
    verify fails and prints the repair command; `build --redo-damaged` recomputes those shards
    and the cache is bit-identical to the original."""
    config, cache, original = built
    (cache / "datasets/web/teachers/dino/tokens/c/4/0").unlink()
    flip_byte(cache / "datasets/rooms/teachers/mast3r/tokens/c/1/0", 40)
    flip_byte(cache / "datasets/web/index_rows/c/1/0", 5)
    code, output = _run("verify", str(cache))
    assert code == 1 and "--redo-damaged" in output
    code, output = _run("build", str(config), "--redo-damaged")
    assert code == 0, output
    assert "3 damaged shard(s)" in output and "nothing to do" not in output
    assert _run("verify", str(cache))[0] == 0
    assert file_hashes(cache) == original


def test_a_lost_shard_file_is_never_nothing_to_do(built: tuple[Path, Path, dict]) -> None:
    """Deleted token shard file, then a plain rerun of the build: not "nothing to do"; the
    shard is recomputed and the cache is bit-identical to the original."""
    config, cache, original = built
    (cache / "datasets/rooms/teachers/dino/tokens/c/0/0").unlink()
    code, output = _run("build", str(config))
    assert code == 0, output
    assert "nothing to do" not in output
    assert file_hashes(cache) == original
    code, output = _run("build", str(config))
    assert "nothing to do" in output


def test_unrepairable_damage_is_refused_before_anything_changes(built: tuple[Path, Path, dict]
                                                                ) -> None:
    """Flipped byte in a calibration chunk: `build --redo-damaged` refuses in one line naming
    the array, and changes nothing."""
    config, cache, original = built
    target = cache / "datasets/web/teachers/dino/patch_calib_mean/c/0"
    flip_byte(target, 3)
    damaged = file_hashes(cache)
    result = CliRunner().invoke(app, ["build", str(config), "--redo-damaged"])
    assert isinstance(result.exception, CacheCorruptionError)  # main() prints it in one line
    assert "patch_calib_mean" in str(result.exception) and "\n" not in str(result.exception)
    assert file_hashes(cache) == damaged
    flip_byte(target, 3)  # undo, for the next tests
    assert file_hashes(cache) == original


def test_ls_skipped_lists_skipped_images_with_reasons(built: tuple[Path, Path, dict]) -> None:
    """`dune-cache ls --skipped CACHE` lists every skipped image with its reason."""
    _, cache, _ = built
    code, output = _run("ls", str(cache), "--skipped")
    assert code == 0
    lines = [line.split("\t") for line in output.splitlines() if "\t" in line]
    assert lines and all(row[0] == "web" for row in lines)
    reasons = {row[3] for row in lines}
    assert {"zero_bytes", "truncated", "not_an_image"} <= reasons


def test_redo_damaged_repairs_damaged_summaries(built: tuple[Path, Path, dict]) -> None:
    """Flipped byte in a pair's statistics summary and in a dataset's consolidated statuses:
    `build --redo-damaged` merges and consolidates them again, bit-identical."""
    config, cache, original = built
    flip_byte(cache / "datasets/web/teachers/mast3r/summary/c/0", 11)
    flip_byte(cache / "datasets/rooms/statuses/c/0", 2)
    assert _run("verify", str(cache))[0] == 1
    code, output = _run("build", str(config), "--redo-damaged")
    assert code == 0, output
    assert "web/mast3r summary" in output and "rooms summary" in output
    assert file_hashes(cache) == original
