"""A `dune-cache build` into the S3 server (tests/s3_server.py) SIGKILLed mid-upload resumes
like a local one (tests/test_build_dask.py kills a local build the same way).

An object store has no partial objects: a PUT (or a multipart upload) becomes visible whole when
it completes, or never. What must hold on top of that is the build's own order: a shard's done
mark is written only after its data object, so the cache the kill leaves behind verifies clean
(every shard marked done is whole; the others are merely missing), and the rerun of the same
command finishes it into the very bytes of a clean build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

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
from tests.s3_server import S3Server

DATASETS = ("rooms", "web")
PART = {"teachers": ("dino",), "dataset_names": DATASETS}


def _done_marks(fs: object, root: str) -> int:
    """Token shards of the teacher with their done mark (a `shard_meta` chunk object exists:
    it is written last, only for a finished shard)."""
    return sum(len(fs.find(f"{root}/datasets/{d}/teachers/dino/shard_meta/c"))  # type: ignore[attr-defined]
               for d in DATASETS)


def test_sigkill_mid_upload_then_rerun_gives_the_clean_build(
        s3_server: S3Server, images: dict, tmp_path: Path) -> None:
    url = s3_server.url("killed")
    cfg = write_config(tmp_path / "remote.toml", url, images, **PART)
    fs = s3_server.filesystem()
    log = (tmp_path / "build.log").open("w")
    # A session of its own, so that the kill takes every process of the build.
    proc = subprocess.Popen(cli_command("build", str(cfg)), env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while _done_marks(fs, url.removeprefix("s3://")) == 0:
            assert proc.poll() is None, (tmp_path / "build.log").read_text()
            assert time.monotonic() < deadline, "the build never finished a token shard"
            # Each poll lists the bucket twice, served by the server thread of this process:
            # polling faster starves the build it waits for (10 token shards, well over 0.1 s
            # apart, stay between the first done mark and the last).
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    # Verified on a local copy of the objects (the same bytes; verify reads every chunk, which
    # costs a request each on the bucket).
    with open_cache(s3_server.download(url, tmp_path / "killed")) as reader:
        marks = [reader.pair_done(d, "dino") for d in DATASETS]
        killed = reader.verify()
    assert 0 < sum(int(m.sum()) for m in marks) < sum(m.size for m in marks), "not mid-way"
    # No object the kill cut short is taken as a done shard: the shards marked done are whole.
    assert killed.ok, killed.problems
    assert killed.missing, "the shards not done are reported missing"

    # The same command again resumes and finishes the cache: every byte of a clean build.
    build_quiet(cfg)
    clean = tmp_path / "clean"
    build_quiet(write_config(tmp_path / "clean.toml", clean, images, **PART))
    copy = s3_server.download(url, tmp_path / "copy")
    assert cache_digest(copy) == cache_digest(clean)
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 0, result.output
