"""The project's error hierarchy.

Every error we raise on purpose derives from `DuneError` and also from the builtin it
resembles, so callers can catch either. Messages name the path, the field, what was expected
and what was found, and say how to fix it. The CLIs map `DuneError` to one readable line
(set DUNE_DEBUG=1 for the traceback).
"""

from __future__ import annotations


class DuneError(Exception):
    """Base class of every error this project raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


class ConfigError(DuneError, ValueError):
    """A config file or a config field is invalid (the message names the field)."""


class CacheNotFoundError(DuneError, FileNotFoundError):
    """No cache (or no array / group of a cache) exists where one was expected."""


class CacheVersionError(DuneError, ValueError):
    """The cache was written by a newer (or unknown) format version."""


class CacheMismatchError(DuneError, ValueError):
    """The cache does not match what the caller expects (fingerprint, grid, config)."""


class CacheCorruptionError(DuneError, OSError):
    """A chunk failed its checksum or could not be decoded (names the sample and the file)."""


class InvalidTokensError(DuneError, ValueError):
    """Teacher tokens handed to the writer are unusable (NaN/Inf, wrong shape or dtype)."""


class CheckpointError(DuneError, KeyError):
    """A checkpoint file is missing or its keys do not fit the model (lists them)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class BadImageError(DuneError, ValueError):
    """A source image cannot be used; `reason` is one of the cache's skip reasons."""

    def __init__(self, message: str, *, reason: str, path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path

    def __reduce__(self) -> tuple:
        # `reason` is keyword-only, so the default Exception pickling (args only) cannot rebuild
        # it; dask and DataLoader workers must be able to send this error across processes.
        return (_rebuild_bad_image_error, (str(self), self.reason, self.path))


def _rebuild_bad_image_error(message: str, reason: str, path: str) -> BadImageError:
    return BadImageError(message, reason=reason, path=path)


class RegistryError(DuneError, KeyError):
    """An unknown name was asked of a registry (the message lists the valid names)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TrainingError(DuneError, RuntimeError):
    """Training cannot go on (non-finite loss: names the step and each teacher's loss)."""


class InsufficientSpaceError(DuneError, OSError):
    """The storage cannot hold what is about to be written (checked before anything runs)."""


class ClusterError(DuneError, RuntimeError):
    """The dask cluster cannot run the build: unreachable, too few workers, workers dying."""
