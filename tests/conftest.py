"""Fixtures shared by the cache-build test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.build_fixtures import make_images
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


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The tiny two-dataset mix of tests/build_fixtures.py, written once per test module."""
    return make_images(tmp_path_factory.mktemp("images"))


# The S3 server fixture (`s3_server`): one moto server per session, for tests/test_remote_*.py.
pytest_plugins = ["tests.s3_server"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--fuzz-count N`: trials of the reliability suite's fuzz test (default: its small count,
    or the DUNE_FUZZ_COUNT environment variable)."""
    parser.addoption("--fuzz-count", type=int, default=None,
                     help="trials of tests/reliability/test_fuzz.py (default 100)")
