"""A real S3 API for the tests: moto's server on 127.0.0.1, one per test session.

Why moto's server mode: it is a pip package (no binary to fetch, no container), starts in a
thread of the test process in about 0.5-1.3 s on the test machine, speaks the S3 REST API that
botocore / s3fs speak to AWS (ranged GETs, multipart uploads, listings), and keeps objects in
memory, so a test session leaves nothing behind. Measured on the 2-core test machine: a ranged
GET of 4 KB takes ~17 ms through s3fs and ~6 ms through obstore (the server dominates).

The endpoint and the dummy credentials reach every filesystem only through fsspec's own
configuration (docs/cache-format.md, "Remote caches"): `fsspec.config.conf["s3"]` for this
process and its forks, and the `FSSPEC_S3` variable for child processes. The AWS variables
are set too, so that no client ever falls back to a real AWS endpoint or a user's profile:
nothing here talks to an address other than 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "dune-test"
_KEY, _SECRET, _REGION = "testing", "testing", "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """The running server: its endpoint and a fresh-prefix maker."""

    endpoint: str

    def url(self, name: str) -> str:
        """A fresh `s3://` URL under the test bucket (unique per call: tests never collide)."""
        return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"

    def filesystem(self):  # noqa: ANN201 (s3fs is imported lazily)
        """A fresh s3fs filesystem on the server (no instance or listing cache)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def download(self, url: str, dest: Path) -> Path:
        """Copy every object under `url` into the local folder `dest`."""
        fs = self.filesystem()
        root = url.removeprefix("s3://").rstrip("/")
        for path in fs.find(root):
            target = dest / os.path.relpath(path, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fs.cat_file(path))
        return dest


    def upload(self, src: Path, url: str) -> str:
        """Copy the local file or folder `src` to `url`; returns `url`."""
        fs = self.filesystem()
        dest = url.removeprefix("s3://")
        if src.is_file():
            fs.pipe_file(dest, src.read_bytes())
            return url
        for path in sorted(src.rglob("*")):
            if path.is_file():
                fs.pipe_file(f"{dest}/{path.relative_to(src).as_posix()}", path.read_bytes())
        return url


def client_options(endpoint: str) -> dict[str, object]:
    """The s3fs options that point every client at the local server."""
    return {"endpoint_url": endpoint, "key": _KEY, "secret": _SECRET,
            "client_kwargs": {"region_name": _REGION}}


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1 (free port) with the test bucket, configure fsspec
    (and the environment of child processes) for it; stop it and restore the configuration on
    exit. Shared by the `s3_server` fixture and tests/benchmarks/bench_remote.py."""
    import boto3
    import fsspec.config
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = client_options(endpoint)
    env = {"FSSPEC_S3": json.dumps(options), "AWS_ACCESS_KEY_ID": _KEY,
           "AWS_SECRET_ACCESS_KEY": _SECRET, "AWS_DEFAULT_REGION": _REGION,
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved_env = {name: os.environ.get(name) for name in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = options
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=_KEY,
                     aws_secret_access_key=_SECRET, region_name=_REGION
                     ).create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint)
    finally:
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The S3 server for the whole test session (`running_s3_server`)."""
    pytest.importorskip("moto.server", reason="pip install -e '.[dev]' (moto[server])")
    pytest.importorskip("s3fs")
    with running_s3_server() as server:
        yield server
