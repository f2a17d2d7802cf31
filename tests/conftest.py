"""Fixtures shared by the cache-build test modules."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.build_fixtures import build_quiet, make_images, write_config
from train.source_checks import CHECKS_ENV


@pytest.fixture(scope="session", autouse=True)
def _source_checks_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Passed source checks (train.source_checks) are remembered in this session's own folder,
    not the user's ~/.cache, and subprocesses inherit it."""
    before = os.environ.get(CHECKS_ENV)
    os.environ[CHECKS_ENV] = str(tmp_path_factory.mktemp("source-checks"))
    yield
    if before is None:
        os.environ.pop(CHECKS_ENV, None)
    else:
        os.environ[CHECKS_ENV] = before


# Modules that draw a run's loss curves at the end of a fit (each imports draw_loss_curves).
_CURVE_DRAWERS = ("train.trainer", "train.stages")


def _no_loss_curves(*args: object, **kwargs: object) -> list[Path]:
    return []


@pytest.fixture(autouse=True)
def _loss_curves_only_where_read(request: pytest.FixtureRequest,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit in this process draws no loss curves unless the test is marked `loss_curves`.

    Every fit ends by drawing four matplotlib PNGs (1-2 s of CPU each time, over a minute in the
    whole suite), which most tests never look at. The tests that read them carry the mark;
    test_logging.py and test_trainer.py draw curves directly too. Fits in subprocesses and in
    module or session fixtures (set up before this function-scoped switch) still draw."""
    if request.node.get_closest_marker("loss_curves") is not None:
        return
    for name in _CURVE_DRAWERS:
        if name in sys.modules:  # not imported yet: imported by the test, it draws as before
            monkeypatch.setattr(sys.modules[name], "draw_loss_curves", _no_loss_curves)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The tiny two-dataset mix of tests/build_fixtures.py, written once per session (tests
    only read it)."""
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def reference_build(tmp_path_factory: pytest.TempPathFactory, images: dict) -> Path:
    """A folder with cache.toml and cache/: the default tiny build of `images` (int8, both
    teachers, both datasets; one worker, threads, no loader processes), built once per session
    for the builds that are compared with it (test_build.py, test_build_dask.py). Tests only
    read it; one that moves or rebuilds it puts back every byte."""
    root = tmp_path_factory.mktemp("reference-build")
    build_quiet(write_config(root / "cache.toml", root / "cache", images))
    return root


# The S3 server fixture (`s3_server`): one moto server per session, for tests/test_remote_*.py.
pytest_plugins = ["tests.s3_server"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "loss_curves: the test reads the loss curves that a fit draws "
                   "(without the mark, fits in the test's process draw none)")


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--fuzz-count N`: trials of the reliability suite's fuzz test (default: its small count,
    or the DUNE_FUZZ_COUNT environment variable)."""
    parser.addoption("--fuzz-count", type=int, default=None,
                     help="trials of tests/reliability/test_fuzz.py (default 100)")
