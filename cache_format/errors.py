"""The project's error hierarchy.

Every error we raise on purpose derives from `DuneError` and also from the builtin it
resembles, so callers can catch either. Messages name the path, the field, what was expected
and what was found, and say how to fix it. Both CLIs map `DuneError` to one readable line
through `run_cli` (set DUNE_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

#: The documented repair of damaged shards (docs/building.md, "Checking a cache"): the hint of
#: every error about a damaged shard ends with it.
REPAIR_DAMAGED = ("`dune-cache verify CACHE` lists the damage; `dune-cache build CONFIG.toml "
                  "--redo-damaged` recomputes the damaged shards")


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
    """Teacher tokens are unusable: a teacher's `forward_tokens` gave other keys or shapes than
    it promised, or tokens handed to the writer hold NaN/Inf or have a wrong shape or dtype."""


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


class BatchMismatchError(DuneError, ValueError):
    """What a batch hands the student, a projector, a norm, the loss or teacher dropping does
    not fit what it expects (shapes, token types, presence mask, the images' domains); the
    message names both sides."""


def run_cli(app: Callable[[], object], *, interrupted: str) -> None:
    """Run a CLI app as a console script's `main()`; both `dune-cache` and `dune-train` use it.

    A `DuneError` becomes two lines on stderr, `error: <message>` and `hint: <hint>`, and exit
    code 1; with DUNE_DEBUG=1 it is re-raised, so Python prints the full traceback. Ctrl-C
    prints `interrupted` and exits with 130. Usage errors, --help and their exit codes stay
    the app's (typer lets only exceptions of the commands through).
    """
    try:
        app()
    except DuneError as exc:
        if os.environ.get("DUNE_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        print(f"hint: {exc.hint or 'set DUNE_DEBUG=1 for the traceback'}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


class InsufficientSpaceError(DuneError, OSError):
    """The storage cannot hold what is about to be written (checked before anything runs)."""


class ClusterError(DuneError, RuntimeError):
    """The dask cluster cannot run the build: unreachable, too few workers, workers dying."""
