"""Source image scenarios of issue 10, item 7: the images stage two replays views from are the
ones the cache was built from, or training says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cache_format.errors import CacheMismatchError
from tests.build_fixtures import file_hashes
from tests.test_source_fingerprints import replace_with_other_content
from tests.test_trainer import tiny_cache, tiny_config
from train.trainer import Trainer


@pytest.fixture(scope="module")
def cache_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("source-images")


def test_source_images_replaced_by_same_size_images_make_fit_refuse(
        cache_base: Path, tmp_path: Path) -> None:
    """Source images replaced by same-size images with other content: fit refuses naming the
    image, dataset, cache and the fix; with data.check_source_fingerprints = false it trains.

    The folder and list datasets are copied and every image of the copies is rewritten with
    inverted pixels (same size and format, so every view replays as stored)."""
    root = tiny_cache(cache_base)
    before = file_hashes(root / "cache")
    roots = {}
    for name, folder in (("web2d", "2d"), ("scenes3d", "3d")):
        shutil.copytree(root / "data" / folder, tmp_path / folder)
        for image in (tmp_path / folder).rglob("*"):
            if image.suffix.lower() in (".png", ".jpg", ".jpeg"):
                replace_with_other_content(image)
        roots[f"data.roots.{name}"] = str(tmp_path / folder)
    settings = {"max_steps": 1, "data.num_workers": 0, **roots}
    with pytest.raises(CacheMismatchError) as err:
        Trainer(tiny_config(root, tmp_path / "run", **settings), progress="off").fit()
    text = f"{err.value} {err.value.hint}"
    assert str(tmp_path) in str(err.value) and "content fingerprint" in text
    assert str(root / "cache") in text and ("dataset web2d" in text or "dataset scenes3d" in text)
    assert "restore the original images" in text and "data.check_source_fingerprints" in text
    summary = Trainer(tiny_config(root, tmp_path / "run-off", **settings,
                                  **{"data.check_source_fingerprints": False}),
                      progress="off").fit()
    assert summary["step"] == 1
    assert file_hashes(root / "cache") == before  # the cache itself was never touched
