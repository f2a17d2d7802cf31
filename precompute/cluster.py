"""The dask cluster of a build: start or connect, size the units' resources, run units, stop.

Without `--scheduler`, an in-process `LocalCluster` (nothing to start). Its workers are
processes by default: each holds its own teacher and its own torch threads, the GIL does not
serialize decoding and encoding across workers, a worker that dies (out of memory) does not take
the build with it, and on a multi-GPU machine each worker owns one GPU. Worker processes are
started non-daemonic so that they may fork DataLoader processes. With `--scheduler ADDR` the
units go to an existing cluster whose workers see the cache path and the images (shared file
system or object store); workers that advertise a `GPU` resource get the units one GPU's share
at a time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from cache_format.errors import ClusterError, ConfigError
from precompute.config import CacheBuildConfig
from precompute.worker_state import release_teachers


class _UnitErrorsOnce(logging.Filter):
    """Drop dask's "Compute Failed" dump of a unit's exception: `run_units` re-raises that very
    exception on the driver, where the CLI shows it as the project's one line and hint."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def quiet_unit_failures() -> None:
    """Install `_UnitErrorsOnce` on this process's dask worker logger (once)."""
    worker_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _UnitErrorsOnce) for f in worker_log.filters):
        worker_log.addFilter(_UnitErrorsOnce())


@dataclass(frozen=True)
class Cluster:
    """A connected dask client and what the units run on."""

    client: Any  # distributed.Client
    device: str
    workers: int
    unit_resources: dict[str, float] | None


def _units_per_worker(config: CacheBuildConfig, device: str) -> int:
    return config.runtime.units_per_worker or (4 if device == "cuda" else 1)


def _local_device(config: CacheBuildConfig) -> str:
    wanted = config.runtime.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for but torch sees no CUDA device",
                        hint="set runtime.device = 'auto' or 'cpu'")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


@contextmanager
def open_cluster(config: CacheBuildConfig, scheduler: str | None,
             workers: int | None) -> Iterator[Cluster]:
    """A dask client: connected to `scheduler`, or to a fresh local cluster."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"--scheduler {scheduler}: cannot connect ({exc})",
                hint="start one with `dask scheduler` and `dask worker ADDR`, or leave "
                     "--scheduler out to use a local cluster") from None
        try:
            try:
                client.wait_for_workers(workers or 1, timeout=120)
            except TimeoutError:
                found = len(client.scheduler_info()["workers"])
                raise ClusterError(
                    f"--scheduler {scheduler}: {found} worker(s) connected after 120 s, "
                    f"{workers or 1} wanted",
                    hint="start more `dask worker` processes, or lower --workers") from None
            client.run(quiet_unit_failures)
            cuda = client.run(torch.cuda.is_available)
            device = config.runtime.device
            if device == "auto":
                device = "cuda" if cuda and all(cuda.values()) else "cpu"
            infos = client.scheduler_info()["workers"].values()
            has_gpu = all("GPU" in (w.get("resources") or {}) for w in infos)
            share = 1.0 / _units_per_worker(config, device)
            yield Cluster(client, device, len(cuda),
                           {"GPU": share} if device == "cuda" and has_gpu else None)
        finally:
            try:
                client.run(release_teachers)
            finally:
                client.close()
        return
    device = _local_device(config)
    n = workers or (torch.cuda.device_count() if device == "cuda" else 1)
    slots = _units_per_worker(config, device)
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"),
               # dask's default trims malloc eagerly; that fixes glibc's mmap threshold, so each
               # of torch's large activation buffers is mapped and page-faulted anew on every
               # forward (a third slower on CPU here). Unset it.
               "MALLOC_TRIM_THRESHOLD_": None}
    with dask.config.set({"distributed.worker.daemon": False,
                          "distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=slots, processes=config.runtime.processes,
            dashboard_address=":0", silence_logs=logging.ERROR,
            resources={"GPU": 1} if device == "cuda" else None,
        )
    threads = torch.get_num_threads()  # units in this process (threads mode) change it
    try:
        client = Client(cluster)
        quiet_unit_failures()  # in-process (threads) workers log here
        if config.runtime.processes:
            client.run(quiet_unit_failures)
        try:
            yield Cluster(client, device, n, {"GPU": 1.0 / slots} if device == "cuda" else None)
        finally:
            if not config.runtime.processes:
                release_teachers()
            client.close()
    finally:
        cluster.close()
        torch.set_num_threads(threads)


def run_units(cluster: Cluster, fn: Callable[..., Any], arguments: Sequence[tuple[Any, ...]],
               on_result: Callable[[Any], None], *, gpu: bool) -> None:
    """Submit `fn(*args)` for every args (earlier ones first) and handle results as they come.

    An exception in a unit, or raised by `on_result`, cancels the units still pending and
    propagates; shards already written keep their done marks.
    """
    from distributed import KilledWorker, as_completed

    run_id = uuid.uuid4().hex[:8]
    resources = cluster.unit_resources if gpu else None
    futures = [
        cluster.client.submit(fn, *args, key=f"dune-{fn.__name__}-{k}-{run_id}", pure=False,
                              priority=len(arguments) - k, resources=resources)
        for k, args in enumerate(arguments)
    ]
    try:
        for future in as_completed(futures):
            on_result(future.result())
    except KilledWorker as exc:
        cluster.client.cancel(futures)
        raise ClusterError(
            f"dask workers died running {exc.args[0] if exc.args else 'a unit'} too many times "
            "(out of memory?); finished shards are kept",
            hint="lower build.batch_size or runtime.units_per_worker, then rerun to resume",
        ) from exc
    except BaseException:
        cluster.client.cancel(futures)
        raise
