"""The error hierarchy: builtin compatibility and crossing process boundaries."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from cache_format.errors import (
    BadImageError,
    BatchMismatchError,
    CacheNotFoundError,
    CheckpointError,
    DuneError,
)
from tests.build_fixtures import REPO, subprocess_env


def test_bad_image_error_survives_pickling_with_its_reason_and_path() -> None:
    err = BadImageError("a.jpg: truncated", reason="truncated", path="/data/a.jpg")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, BadImageError) and isinstance(back, ValueError)
    assert (str(back), back.reason, back.path) == ("a.jpg: truncated", "truncated", "/data/a.jpg")


@pytest.mark.parametrize(
    ("error", "builtin"),
    [(CacheNotFoundError("x"), FileNotFoundError), (CheckpointError("missing keys: a"), KeyError),
     (BatchMismatchError("token_loss: shapes differ"), ValueError)],
)
def test_errors_are_also_their_builtin(error: DuneError, builtin: type) -> None:
    assert isinstance(error, DuneError) and isinstance(error, builtin)
    assert "'" not in str(error)  # KeyError subclasses print the message, not its repr


def _run_together(runs: list[tuple[list[str], dict[str, str]]]
                  ) -> list[subprocess.CompletedProcess[str]]:
    """Run each (command, environment) in REPO concurrently; their results, in order."""
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for command, env in runs]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.parametrize(
    "argv",
    [["precompute.cli", "build"], ["train.cli", "fit"]],
    ids=["dune-cache", "dune-train"],
)
def test_both_clis_print_one_line_or_with_dune_debug_the_traceback(
    argv: list[str], tmp_path: Path
) -> None:
    """The same `run_cli` mapping in both console scripts, run as a user runs them."""
    command = [sys.executable, "-m", *argv, str(tmp_path / "missing.toml")]
    env = subprocess_env()
    env.pop("DUNE_DEBUG", None)
    # Both runs at once: each spends seconds importing torch, and the machine has a core free.
    plain, debug = _run_together([(command, env), (command, {**env, "DUNE_DEBUG": "1"})])
    lines = plain.stderr.strip().splitlines()
    assert plain.returncode == 1, plain.stderr
    assert len(lines) == 2 and "Traceback" not in plain.stderr
    assert lines[0].startswith("error: ") and "missing.toml: no such config file" in lines[0]
    assert lines[1].startswith("hint: ")
    assert debug.returncode == 1  # an uncaught exception
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert "ConfigError: " in debug.stderr and "missing.toml: no such config file" in debug.stderr
    assert "\nhint: " not in debug.stderr
