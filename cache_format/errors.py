"""The project's error hierarchy.

Every error we raise on purpose derives from `DuneError` and also from the builtin it
resembles, so callers can catch either. Messages name the path, the field, what was expected
and what was found, and say how to fix it. Both CLIs map `DuneError` to one readable line
through `run_cli` (set DUNE_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

#: The documented repair of damaged shards (docs/building.md, "Checking a cache"): the hint of
#: every error about a damaged shard ends with it.
REPAIR_DAMAGED = ("`dune-cache verify CACHE` lists the damage; `dune-cache build CONFIG.toml "
                  "--redo-damaged` recomputes the damaged shards")
#: The hint of an error about a store layout this code never writes (another tool's zarr).
FOREIGN_CACHE_HINT = "this cache was not written by this dune-distill"
#: The hint of an error about metadata that contradicts itself (a damaged cache).
VERIFY_HINT = "the cache is damaged: run `dune-cache verify`"


class DuneError(Exception):
    """Base class of every error this project raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint
        if self.hint and _in_loader_worker():  # the traceback text is all a worker sends back
            self.add_note(f"hint: {self.hint}")


def _in_loader_worker() -> bool:
    """True inside a torch DataLoader worker process (torch is never imported for this)."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


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


class RemoteReadError(DuneError, OSError):
    """A read from an object store kept failing (or timing out) after every retry; names the
    object, the attempts and the last error."""


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


_LOADER_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal ")


def _dune_error_names(cls: type = DuneError) -> set[str]:
    return {cls.__name__}.union(*(_dune_error_names(sub) for sub in cls.__subclasses__()))


def one_line(exc: BaseException) -> tuple[str, str] | None:
    """(message, hint) of one of our errors, also when it crossed a DataLoader worker; else None.

    torch re-raises a worker's exception as `Caught X in DataLoader worker process N. Original
    Traceback...` (or as a RuntimeError when X cannot be built from that text), which keeps only
    the traceback text: the message is its last `X: ...` entry and the hint its `hint:` note.
    Dask re-raises a unit's exception itself, so only DataLoader workers need this.
    """
    text = str(exc)
    found = _LOADER_WORKER.match(text)
    if found is None:
        return (text, exc.hint) if isinstance(exc, DuneError) else None
    name = found.group(1)
    if name not in _dune_error_names():
        return None
    last = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, re.M))
    if not last:
        return None
    message, _, hint = text[last[-1].end():].rstrip("\n").partition("\nhint: ")
    return message, hint.strip()


def run_cli(app: Callable[[], object], *, interrupted: str) -> None:
    """Run a CLI app as a console script's `main()`; both `dune-cache` and `dune-train` use it.

    A `DuneError` becomes two lines on stderr, `error: <message>` and `hint: <hint>`, and exit
    code 1, also one raised in a DataLoader worker (`one_line`); with DUNE_DEBUG=1 it is
    re-raised, so Python prints the full traceback. Ctrl-C
    prints `interrupted` and exits with 130. Usage errors, --help and their exit codes stay
    the app's (typer lets only exceptions of the commands through).
    """
    try:
        app()
    except Exception as exc:
        line = one_line(exc)
        if line is None or os.environ.get("DUNE_DEBUG") == "1":
            raise
        message, hint = line
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: {hint or 'set DUNE_DEBUG=1 for the traceback'}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


class InsufficientSpaceError(DuneError, OSError):
    """The storage cannot hold what is about to be written (checked before anything runs)."""


class ClusterError(DuneError, RuntimeError):
    """The dask cluster cannot run the build: unreachable, too few workers, workers dying."""
