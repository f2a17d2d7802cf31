"""Fixtures shared by the cache-build test modules."""

from __future__ import annotations

import pytest

from tests.build_fixtures import make_images


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
