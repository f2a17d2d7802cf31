"""Object-store failures: failed and timed-out requests are retried with backoff; after the last
retry the error names the object; a missing object is an answer, never retried."""

from __future__ import annotations

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cache_format.encodings import EncodingSpec
from cache_format.errors import RemoteReadError
from cache_format.files import FsspecFiles, RetryPolicy
from cache_format.reader import open_cache
from cache_format.testing import build_tiny_cache

NO_WAIT = RetryPolicy(attempts=3, first_delay_s=0.0, max_delay_s=0.0)


class FlakyFileSystem(MemoryFileSystem):
    """A memory filesystem whose next reads of paths containing `only` raise the queued
    errors."""

    protocol = "dunetestflaky"
    failures: list[OSError] = []
    only = ""
    calls = 0

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: object) -> bytes:
        type(self).calls += 1
        if self.failures and self.only in path:
            raise self.failures.pop(0)
        return super().cat_file(path, start=start, end=end, **kwargs)


@pytest.fixture
def flaky() -> FlakyFileSystem:
    fs = FlakyFileSystem()
    fs.pipe_file("/bucket/obj", bytes(range(100)))
    FlakyFileSystem.failures = []
    FlakyFileSystem.only = ""
    FlakyFileSystem.calls = 0
    return fs


def test_failed_and_timed_out_requests_are_retried(flaky: FlakyFileSystem) -> None:
    files = FsspecFiles(flaky, "/bucket", NO_WAIT)
    FlakyFileSystem.failures = [TimeoutError("read timed out"), ConnectionResetError("reset")]
    assert files.read("obj", 10, 5) == bytes(range(10, 15))
    assert FlakyFileSystem.calls == 3


def test_the_error_names_the_object_after_the_last_retry(flaky: FlakyFileSystem) -> None:
    files = FsspecFiles(flaky, "/bucket", NO_WAIT)
    FlakyFileSystem.failures = [ConnectionError("refused")] * 3
    with pytest.raises(RemoteReadError, match=r"/bucket/obj: the request failed 3 time") as exc:
        files.read_all("obj")
    assert isinstance(exc.value, OSError) and "ConnectionError: refused" in str(exc.value)
    assert FlakyFileSystem.calls == 3


def test_a_missing_object_is_not_retried(flaky: FlakyFileSystem) -> None:
    files = FsspecFiles(flaky, "/bucket", NO_WAIT)
    assert files.read("missing", 0, 4) is None and files.tail("missing", 4) is None
    assert FlakyFileSystem.calls == 1  # tail stops at its size request


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, first_delay_s=0.1, max_delay_s=0.5)
    assert [policy.delay(k) for k in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_a_reader_rides_out_failing_requests(flaky: FlakyFileSystem) -> None:
    """Through open_cache (default policy): token shard reads (our byte reader's requests)
    that fail twice still give the data."""
    import fsspec

    fsspec.register_implementation("dunetestflaky", FlakyFileSystem, clobber=True)
    url = "dunetestflaky://retry-cache"
    build_tiny_cache(url, EncodingSpec("int8"))
    with open_cache(url) as reader:
        want = reader.read_encoded("ds", [1, 8])["t1"]["patch"].values.numpy().copy()
    with open_cache(url) as reader:
        FlakyFileSystem.only = "/tokens/c/"
        FlakyFileSystem.failures = [TimeoutError("slow"), ConnectionResetError("reset")]
        got = reader.read_encoded("ds", [1, 8])["t1"]["patch"].values.numpy()
        assert not FlakyFileSystem.failures  # the failures were met, and retried
    np.testing.assert_array_equal(got, want)
