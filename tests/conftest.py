"""Fixtures shared by the cache-build test modules."""

from __future__ import annotations

import os
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


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--fuzz-count N`: trials of the reliability suite's fuzz test (default: its small count,
    or the DUNE_FUZZ_COUNT environment variable)."""
    parser.addoption("--fuzz-count", type=int, default=None,
                     help="trials of tests/reliability/test_fuzz.py (default 100)")
