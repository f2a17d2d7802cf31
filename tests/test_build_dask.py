"""The build on real dask worker processes: the cache never depends on how it was run.

Each test builds the tiny mix of tests/build_fixtures.py in another way and compares every file
with a reference build (one worker, threads mode, no loader processes): two worker processes
with DataLoader processes, a build SIGKILLed mid-way then resumed, and a build sent to an
external `dask scheduler` with two `dask worker` processes on 127.0.0.1. These are the slow
tests of the builder (process start-up): each runs one build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache_format.reader import open_cache
from precompute.cli import app
from tests.build_fixtures import (
    build_quiet,
    cache_digest,
    cli_command,
    subprocess_env,
    write_config,
)
from tests.processes import sigkill_when


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, images: dict) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reference")
    build_quiet(write_config(root / "cache.toml", root / "cache", images))
    return cache_digest(root / "cache")


def test_two_worker_processes_with_loader_processes_match_one_worker(
    reference: dict[str, str], images: dict, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cache.toml", tmp_path / "cache", images,
                       runtime={"processes": True, "loader_workers": 1})
    build_quiet(cfg, workers=2)
    assert cache_digest(tmp_path / "cache") == reference


def _any_done_mark(cache: Path, teacher: str) -> bool:
    """Whether some token shard of `teacher` has its done mark (a chunk file of the
    `shard_meta` array exists: it is written last, and only for a finished shard)."""
    return any(
        (cache / "datasets" / d / "teachers" / teacher / "shard_meta" / "c").is_dir()
        and any((cache / "datasets" / d / "teachers" / teacher / "shard_meta" / "c").iterdir())
        for d in ("rooms", "web")
    )


def test_sigkill_mid_build_then_rerun_gives_the_same_cache(
    reference: dict[str, str], images: dict, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cache.toml", cache, images)
    log = (tmp_path / "build.log").open("w")
    # A session of its own, so that the kill would take dask worker processes too.
    proc = subprocess.Popen(cli_command("build", str(cfg)), env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill as soon as the second teacher has written its first shard: mid-way.
        reached = sigkill_when(proc, lambda: _any_done_mark(cache, "mast3r"), timeout=120,
                               session=True, poll_s=0.01)
    finally:
        log.close()
    assert reached, (f"the build never reached the second teacher (exit code "
                     f"{proc.returncode}): {(tmp_path / 'build.log').read_text()}")
    with open_cache(cache) as reader:
        marks = [reader.pair_done(d, "mast3r") for d in ("rooms", "web")]
    assert 0 < sum(int(m.sum()) for m in marks) < sum(m.size for m in marks), "not mid-way"
    # The same command again resumes and finishes the cache.
    build_quiet(cfg)
    assert cache_digest(cache) == reference


def _wait_for(predicate: object, what: str, procs: list[subprocess.Popen],
              timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        for p in procs:
            assert p.poll() is None, f"{p.args[:2]} exited with {p.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_build_through_an_external_scheduler_with_two_workers(
    reference: dict[str, str], images: dict, tmp_path: Path
) -> None:
    dask = str(Path(sys.executable).parent / "dask")
    env = subprocess_env()
    scheduler_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []
    logs = (tmp_path / "dask.log").open("w")
    try:
        procs.append(subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for(scheduler_file.exists, "the scheduler file", procs)
        address = json.loads(scheduler_file.read_text())["address"]
        for name in ("w0", "w1"):
            procs.append(subprocess.Popen(
                # --no-nanny as docs/building.md advises: the worker may fork loaders.
                [dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--no-nanny", "--no-dashboard", "--name", name],
                env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True))
        cfg = write_config(tmp_path / "cache.toml", tmp_path / "cache", images,
                           runtime={"loader_workers": 1})
        result = CliRunner().invoke(
            app, ["build", str(cfg), "--scheduler", address, "--workers", "2"])
        assert result.exit_code == 0, result.output
        assert "2 worker(s)" in result.output
        assert cache_digest(tmp_path / "cache") == reference
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        logs.close()
