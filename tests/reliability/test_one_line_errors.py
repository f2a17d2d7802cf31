"""Errors that must be one line (issue 10): two builds on one cache, disk full mid-build, errors
raised inside dask and DataLoader workers; and a no-op rerun that reports no fake rates.

Each test checks which command refuses, what its one line names, and that nothing else was lost.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

import precompute.build as build_module
from cache_format.errors import CacheCorruptionError, InsufficientSpaceError, run_cli
from precompute.build_lock import LEASE_S, CacheLockedError, lock_path
from precompute.cache_tools import verify_cache
from precompute.cli import app
from tests.build_fixtures import REPO, build_quiet, file_hashes, write_config

runner = CliRunner()


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory, images: dict) -> Path:
    """A folder with cache.toml and its complete cache/ (one teacher, one dataset)."""
    root = tmp_path_factory.mktemp("one-line")
    build_quiet(write_config(root / "cache.toml", root / "cache", images, teachers=("dino",),
                             dataset_names=("rooms",)))
    return root


def _hold(cache: Path, *, host: str, pid: int, age_s: float = 0.0) -> Path:
    """Write a lock record for `cache` as another build would, `age_s` seconds old."""
    path = Path(lock_path(str(cache)))  # type: ignore[arg-type]
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age_s,
                                "command": "dune-cache build other.toml"}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def _build(root: Path) -> object:
    return runner.invoke(app, ["build", str(root / "cache.toml"), "--cache", str(root / "cache")])


def test_a_second_build_is_refused_naming_the_live_holder(complete: Path) -> None:
    """A live build holds the lock: a second build refuses, naming its pid, host and command."""
    before = file_hashes(complete / "cache")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _hold(complete / "cache", host=socket.gethostname(), pid=holder.pid)
        result = _build(complete)
        assert result.exit_code != 0 and isinstance(result.exception, CacheLockedError)
        message = str(result.exception)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "dune-cache build other.toml" in message and str(complete / "cache") in message
        assert str(lock) in result.exception.hint
        assert lock.exists(), "the live holder's lock was taken away"
        # Another machine's fresh lock is respected the same way.
        _hold(complete / "cache", host="elsewhere", pid=1)
        assert isinstance(_build(complete).exception, CacheLockedError)
    finally:
        holder.kill()
        holder.wait()
    lock.unlink()
    assert file_hashes(complete / "cache") == before
    assert verify_cache(str(complete / "cache")).ok


def test_a_killed_holders_lock_is_taken_over(complete: Path) -> None:
    """A lock whose pid is dead (this host) or whose lease ran out (any host) is taken over."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for host, pid, age in ((socket.gethostname(), dead.pid, 0.0),
                           ("elsewhere", 1, 2 * LEASE_S)):
        lock = _hold(complete / "cache", host=host, pid=pid, age_s=age)
        result = _build(complete)
        assert result.exit_code == 0, result.output
        assert not lock.exists(), "the build left its lock behind"
    assert verify_cache(str(complete / "cache")).ok


def test_disk_full_mid_build_is_one_line_with_path_space_and_resume(
    images: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ENOSPC in a teacher unit: one error line naming path, space needed and the resume command."""
    cfg = write_config(tmp_path / "cache.toml", tmp_path / "cache", images, teachers=("dino",),
                       dataset_names=("rooms",))
    full = str(tmp_path / "cache" / "dino" / "rooms" / "shard")
    real_unit = build_module.run_teacher_unit

    def no_space(*args: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device", full)

    monkeypatch.setattr(build_module, "run_teacher_unit", no_space)
    monkeypatch.setattr(sys, "argv", ["dune-cache", "build", str(cfg)])
    monkeypatch.delenv("DUNE_DEBUG", raising=False)
    from precompute.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    error = next(line for line in err.splitlines() if line.startswith("error:"))
    hint = next(line for line in err.splitlines() if line.startswith("hint:"))
    assert full in error and "disk full" in error and " GB" in error
    assert f"dune-cache build {cfg} --cache {tmp_path / 'cache'}" in hint
    assert not Path(lock_path(str(tmp_path / "cache"))).exists()  # type: ignore[arg-type]
    # Nothing else lost: the printed resume finishes the cache, which then verifies.
    monkeypatch.setattr(build_module, "run_teacher_unit", real_unit)
    assert _build(tmp_path).exit_code == 0
    assert verify_cache(str(tmp_path / "cache")).ok
    with pytest.raises(InsufficientSpaceError):  # the library raises the same typed error
        monkeypatch.setattr(build_module, "run_teacher_unit", no_space)
        build_quiet(write_config(tmp_path / "more.toml", tmp_path / "more", images,
                                 teachers=("dino",), dataset_names=("rooms",)))


def test_a_strict_stop_in_a_dask_worker_is_one_line(images: dict, tmp_path: Path) -> None:
    """`build --strict` on a bad image (dask worker processes, loader processes): one error line."""
    cfg = write_config(tmp_path / "cache.toml", tmp_path / "cache", images, teachers=("dino",),
                       dataset_names=("web",),
                       runtime={"processes": True, "loader_workers": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DUNE_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "precompute.cli", "build", str(cfg), "--strict"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--strict: dataset web:" in errors[0], done.stderr
    for noise in ("Traceback", "Compute Failed", "DataLoader worker"):
        assert noise not in done.stderr, done.stderr
    assert not Path(lock_path(str(tmp_path / "cache"))).exists()  # type: ignore[arg-type]


class _Damaged(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        raise CacheCorruptionError("cache/web/statuses: chunk 0 is damaged (checksum)",
                                   hint="run dune-cache verify cache")


def test_an_error_in_a_dataloader_worker_is_one_line(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A CacheCorruptionError raised in a DataLoader worker prints as our error line and hint."""
    monkeypatch.delenv("DUNE_DEBUG", raising=False)

    def read_all() -> None:
        for _ in DataLoader(_Damaged(), num_workers=1):
            pass

    with pytest.raises(SystemExit) as exit_info:
        run_cli(read_all, interrupted="")
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 1
    assert err == ["error: cache/web/statuses: chunk 0 is damaged (checksum)",
                   "hint: run dune-cache verify cache"]


def test_a_no_op_rebuild_reports_no_rate_or_time(complete: Path) -> None:
    """Rerunning a complete build prints 'nothing was computed' and no rate or duration."""
    before = file_hashes(complete / "cache")
    result = _build(complete)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert "nothing was computed" in last and "img/s" not in result.output
    assert " s)" not in last and "written this run" not in result.output
    assert file_hashes(complete / "cache") == before


def test_a_no_op_demo_rerun_reports_no_fake_rates_and_runnable_commands(complete: Path) -> None:
    """Demo rerun with nothing to do: no build or training rate; rerun commands run as printed."""
    import io
    import shlex

    from rich.console import Console

    from train.demo import summarize

    run = complete / "train"
    run.mkdir(exist_ok=True)
    rows = [{"kind": "train", "step": s, "loss": 1.0, "images_per_s": 99.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    console = Console(file=io.StringIO(), width=300)
    summarize(complete, build_s=0.4, train_s=0.3, console=console, build_state="complete",
              steps_before=3)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "this rerun computed nothing" in text and "this rerun trained nothing" in text
    assert "images/s" not in text and "built in" not in text
    commands = [line.split("#")[0].strip() for line in text.splitlines()
                if line.startswith("  ") and ("build" in line or "fit" in line)]
    assert len(commands) == 2
    for command in commands:
        program = shlex.split(command)[0]
        assert os.access(program, os.X_OK) and Path(program).is_file(), command
    # A resumed build shows its time but no rate; a fresh one its rate.
    for state, expected in (("partial", "no rate"), ("none", "teacher-images/s")):
        console = Console(file=io.StringIO(), width=300)
        summarize(complete, build_s=2.0, train_s=1.0, console=console, build_state=state,
                  steps_before=1)
        text = console.file.getvalue()  # type: ignore[attr-defined]
        assert expected in text and "2 steps in 1 s, 99.0 images/s" in text


def test_heldout_images_above_half_a_dataset_is_warned_not_capped_silently(
    complete: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """data.heldout_images larger than half a dataset: a warning names the field, dataset, cap."""
    from cache_format.reader import open_cache
    from train.data import heldout_image_indices
    from train.run_data import _warn_heldout_capped

    with open_cache(complete / "cache") as reader:
        manifest = reader.manifest
    images = manifest.datasets["rooms"].num_images
    with caplog.at_level("WARNING", logger="dune.train"):
        _warn_heldout_capped(images // 2, manifest, ["rooms"])
        assert not caplog.records  # within the limit: quiet
        _warn_heldout_capped(images, manifest, ["rooms"])
    (record,) = caplog.records
    message = record.getMessage()
    assert f"data.heldout_images = {images}" in message and "dataset rooms" in message
    assert f"only {images // 2} (half)" in message
    # The split itself is what the warning says: half the images, no more.
    assert len(heldout_image_indices(images, images, 0, "rooms")) == images // 2
