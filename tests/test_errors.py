"""The error hierarchy: builtin compatibility and crossing process boundaries."""

import pickle

import pytest

from cache_format.errors import BadImageError, CacheNotFoundError, CheckpointError, DuneError


def test_bad_image_error_survives_pickling_with_its_reason_and_path() -> None:
    err = BadImageError("a.jpg: truncated", reason="truncated", path="/data/a.jpg")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, BadImageError) and isinstance(back, ValueError)
    assert (str(back), back.reason, back.path) == ("a.jpg: truncated", "truncated", "/data/a.jpg")


@pytest.mark.parametrize(
    ("error", "builtin"),
    [(CacheNotFoundError("x"), FileNotFoundError), (CheckpointError("missing keys: a"), KeyError)],
)
def test_errors_are_also_their_builtin(error: DuneError, builtin: type) -> None:
    assert isinstance(error, DuneError) and isinstance(error, builtin)
    assert "'" not in str(error)  # KeyError subclasses print the message, not its repr
