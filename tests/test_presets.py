"""The shipped DUNE recipe against the numbers docs/training.md gives for it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cache_format.errors import ConfigError
from precompute.config import load_build_config
from precompute.teachers.mast3r import MAST3R_CHECKPOINT
from precompute.teachers.multihmr import MULTIHMR_CHECKPOINT
from precompute.teachers.vit_dinov2 import DINOV2_CHECKPOINT
from tests.test_train_cli import run_main
from train.config import load_train_config
from train.presets import preset_files, write_preset

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def doc_table(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table after `heading` in docs/training.md."""
    text = DOC.read_text()
    after = text[text.index(heading):]
    rows = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and its rule


def doc_value(cell: str) -> Any:
    """A table cell as a value: `text` is a string, the rest is read as TOML."""
    if cell.startswith("`") and cell.endswith("`"):
        return cell.strip("`")
    return tomllib.loads(f"v = {cell}")["v"]


def lookup(data: Any, dotted: str) -> Any:
    """`a.b[1].c` or `teachers[name].checkpoint` inside nested dicts and lists."""
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        data = data[name] if name else data
        if index:
            key = index.rstrip("]")
            data = data[int(key)] if key.isdigit() else next(t for t in data if t["name"] == key)
    return data


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("recipe")
    write_preset("dune_vitb14", folder)
    return folder


def test_the_preset_matches_the_paper_to_config_table(recipe: Path) -> None:
    train = load_train_config(recipe / "train.toml").to_dict()
    caches = {name: load_build_config(recipe / f"{name}.toml").to_dict()
              for name in ("cache_336", "cache_448")}
    rows = doc_table("### Paper setting -> config key")
    assert len(rows) >= 30
    for setting, cell, key in rows:
        expected = doc_value(cell)
        key = key.strip("`")
        if ":" in key:
            which, dotted = (p.strip() for p in key.split(":"))
            targets = list(caches.values()) if which == "cache" else [caches[which]]
        else:
            dotted, targets = key, [train]
        for target in targets:
            found = lookup(target, dotted)
            if dotted.endswith("checkpoint"):
                found = Path(found).name
            if isinstance(found, list | tuple):
                found = list(found)
            assert found == expected, (setting, key, found, expected)


def test_the_preset_lists_the_papers_data_mix(recipe: Path) -> None:
    rows = doc_table("### The data mix")
    assert len(rows) == 19
    heading = re.search(r"### The data mix \((\d+) datasets, ([\d,]+) images\)", DOC.read_text())
    assert heading is not None
    counts = [int(r[4].replace(",", "")) for r in rows]
    assert int(heading[1]) == len(rows) and int(heading[2].replace(",", "")) == sum(counts)
    for name in ("cache_336", "cache_448"):
        cfg = load_build_config(recipe / f"{name}.toml")
        owner = {t.domain: t.name for t in cfg.teachers}
        found = [[d.domain, owner[d.domain], d.name, d.max_images] for d in cfg.datasets]
        assert found == [[r[0], r[1], r[3].strip("`"), c] for r, c in zip(rows, counts,
                                                                           strict=True)]
        assert {Path(str(t.checkpoint)).name for t in cfg.teachers} == {
            DINOV2_CHECKPOINT, MAST3R_CHECKPOINT, MULTIHMR_CHECKPOINT}
    # The two caches differ only in where they go and their grid.
    a, b = (load_build_config(recipe / f"{n}.toml").to_dict() for n in ("cache_336",
                                                                         "cache_448"))
    assert {k for k in a if a[k] != b[k]} == {"cache", "grid"}


def test_the_stages_resolve_to_the_papers_schedule(recipe: Path) -> None:
    cfg = load_train_config(recipe / "train.toml")
    first, second = cfg.stage_configs()
    assert (first.student.img_size, first.epochs, first.optim.lr) == (336, 100, 3e-4)
    assert (second.student.img_size, second.epochs, second.optim.lr) == (448, 50, 5e-5)
    assert first.epoch_samples() == 1_281_167 and cfg.global_batch(8) == 1024
    assert first.data.cache == str(recipe / "caches" / "dune-336")


def test_presets_are_written_once_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert set(preset_files("dune_vitb14")) == {"train.toml", "cache_336.toml", "cache_448.toml"}
    with pytest.raises(ConfigError, match="known presets are dune_vitb14"):
        preset_files("dune_vitl14")
    assert run_main(["preset", "dune_vitb14", str(tmp_path)], monkeypatch) == 0
    assert (tmp_path / "train.toml").is_file()
    assert run_main(["preset", "dune_vitb14", str(tmp_path)], monkeypatch) == 1
    assert "exists already" in capsys.readouterr().err
    assert run_main(["preset", "dune_vitb14", str(tmp_path), "--overwrite"], monkeypatch) == 0
