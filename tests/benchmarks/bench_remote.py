"""Loader throughput from a cache on S3 against the same cache on local disk (issue 13).

    .venv/bin/python tests/benchmarks/bench_remote.py [--quick] [--shard-window W]

The demo mix (train/demo.py), made larger (2,816 images, shards of 256 samples, so that a pass
is many shards and the start of a pass does not dominate it), is built on local disk, uploaded
to moto's S3 server on 127.0.0.1 (tests/s3_server.py) and read back through a TCP proxy on
127.0.0.1 that holds every HTTP request 20 ms (`--latency-ms`) before passing it on: an object
store's first-byte latency. The proxy counts the requests and the bytes it returns, so
"requests per sample" and "bytes fetched per byte used" are what crossed the wire (headers
included) during the measure.

Measured, each as the training DataLoader (`Trainer.make_loader`: view replay from the local
source images, token reads, collate; `--workers` worker processes), images/s over one pass of
the mix after its first batch (the start of the pass, worker start-up, is reported apart: the
prefetcher starts with the pass, so a cold shard cache is partly filled by the first batch):
- the cache on local disk;
- from S3, uniform sampler, every sample a ranged GET (no shard cache; 24 batches);
- from S3, uniform sampler, through the local shard cache with prefetch, cold then warm;
- from S3, shard-aware sampler (`data.shard_window = W`, `--shard-window W` > 0), cold and
  warm shard cache: the issue's goal is >= 0.8x local disk with <= 1/16 request per sample.
  Through the shard cache a shard costs one request per token object and one for its chunk of
  view rows, and a pass draws one view of each of its images: (3 + 1) x 2 / 256 = 1/32.
  `data.shard_window` comes with the shard-aware sampler; without it the bench refuses W > 0.

Writes the section `bench_remote` of docs/benchmarks.md, with a projection to DUNE's full mix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine_description, markdown_table, write_section  # noqa: E402
from bench_train import trainer_for  # noqa: E402
from rich.console import Console  # noqa: E402

from cache_format.reader import open_cache  # noqa: E402
from precompute.build import build_cache  # noqa: E402
from precompute.config import load_build_config  # noqa: E402
from tests.s3_server import client_options, running_s3_server  # noqa: E402
from train.config import DataConfig  # noqa: E402
from train.demo import DemoSizes, write_demo_configs  # noqa: E402
from train.shard_prefetch import FILL_THREADS  # noqa: E402

SIZES = {
    # 2,816 images, 22 shards of 256 samples (128 images): an epoch draws 128 samples of a
    # shard, so its 3 token objects and 1 view-row chunk are 1/32 request per sample.
    "full": DemoSizes(images=(1280, 768, 768), image_size_range=(48, 96), grid=8,
                      views_per_image=2, samples_per_shard=256, teacher_dims=(64, 48, 32),
                      teacher_depth=1, batch_size=16, heldout_images=0, num_workers=2),
    "quick": DemoSizes(images=(192, 128, 128), image_size_range=(48, 96), grid=8,
                       views_per_image=2, samples_per_shard=64, teacher_dims=(32, 32, 32),
                       teacher_depth=1, batch_size=16, heldout_images=0, num_workers=2),
}
_METHODS = (b"GET ", b"PUT ", b"HEAD", b"POST", b"DELE")
#: Batches measured for the loader without a shard cache (every sample a few requests).
_DIRECT_BATCHES = 24


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 that delays each HTTP request by `delay_s` and counts requests
    and response bytes (one thread per direction and connection)."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream, self.delay_s = upstream, delay_s
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self.requests = self.bytes_down = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes_down = 0

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.upstream)
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if up and data[:4] in _METHODS:  # a new request on this connection
                    with self._lock:
                        self.requests += 1
                    time.sleep(self.delay_s)
                elif not up:
                    with self._lock:
                        self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (dst, src):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _pairs(cache: Path) -> dict[str, tuple[str, ...]]:
    """The teachers stored for each dataset of the cache."""
    with open_cache(cache) as reader:
        return {d: reader.teachers_for(d) for d in reader.datasets}


def token_bytes_per_sample(cache: Path) -> float:
    """Stored token bytes per sample of the mix (every teacher of a sample's dataset)."""
    with open_cache(cache) as reader:
        used = sum(reader.nbytes(d, t) for d in reader.datasets for t in reader.teachers_for(d))
        return used / sum(reader.num_samples(d) for d in reader.datasets)


def measure(train_toml: Path, out: Path, proxy: DelayingProxy, batches: int,
            **overrides: Any) -> dict[str, float]:
    """The run's set-up (opening the cache, the training data, the model: seconds and
    requests), the start of a pass (worker start-up, the first batch), then the steady state:
    images/s over the next `batches` batches and the proxy's counts for them."""
    proxy.reset()
    began = time.perf_counter()
    trainer = trainer_for(train_toml, out, **{"data.sampling": "uniform", **overrides})
    open_s, open_requests = time.perf_counter() - began, proxy.requests
    loader = trainer.make_loader()
    proxy.reset()
    began = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    startup_s, startup_requests = time.perf_counter() - began, proxy.requests
    proxy.reset()
    began = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - began
    samples = batches * trainer.local_batch
    del iterator
    return {"rate": samples / seconds, "samples": samples, "requests": proxy.requests,
            "bytes": proxy.bytes_down, "startup_s": startup_s,
            "startup_requests": startup_requests, "first_batch": trainer.local_batch,
            "open_s": open_s, "open_requests": open_requests}


def projection(open_requests: float, pairs: int, teachers: int) -> str:
    """DUNE's full mix on N nodes, on paper (docs/benchmarks.md). `open_requests`: what opening
    the run asked of the store in this run, over the mix's `pairs` (dataset, teacher) pairs."""
    images, views, total_tb, mix_pairs = 20.7e6, 4, 147.0, 19 * teachers
    per_sample = total_tb * 1e12 / (images * views)
    rate, disk_tb, nic_gbit, per_shard = 3200.0, 15.0, 100.0, 256
    objects = teachers + 1  # a token object per teacher and the chunk of view rows
    per_used = objects * views / per_shard  # an epoch draws one view per image
    start = open_requests * mix_pairs / pairs
    lines = [
        f"Projection on paper to DUNE's full mix: {images / 1e6:.1f} M images x {views} views "
        f"= {images * views / 1e6:.1f} M samples, {total_tb:.0f} TB int8, so "
        f"{per_sample / 1e6:.2f} MB of tokens per sample ({teachers} teachers). A pass over "
        "the mix draws one view per image (DUNE's epochs are 1.28 M images; a pass is about "
        "16 of them). Assumed per node (not measured here): 8 GPUs at 400 images/s each "
        f"({rate:,.0f} images/s), {disk_tb:.0f} TB of local NVMe for the shard cache, a "
        f"{nic_gbit:.0f} Gb/s NIC. Requests per sample used are ({teachers} token objects + 1 "
        f"view-row chunk) x {views} views / samples per shard: {objects * views / 64:.2f} at "
        f"64 samples per shard, {per_used:.4f} = 1/{1 / per_used:.0f} at {per_shard} (the "
        f"goal's bound), so the mix should be built with samples_per_shard >= {per_shard} "
        f"({per_shard // views} images, {per_shard * per_sample / teachers / 1e6:.0f} MB per "
        "token object: the size object stores serve best).",
        "",
    ]
    rows = []
    for nodes in (1, 8, 32, 64):
        used = nodes * rate * per_sample  # bytes/s the loaders use
        # A shard fetched whole brings all views of its images; a pass uses one of them. The
        # other views are used in later passes only if the shard cache keeps the shard.
        cold = used * views
        share_tb = total_tb / nodes  # a node's share when the shards are dealt to the nodes
        pass_h = images / (nodes * rate) / 3600
        rows.append([nodes, f"{pass_h:.2f}", f"{used / 1e9:.1f}",
                     f"{used * 8 / 1e9 / nodes:.0f}", f"{cold * 8 / 1e9 / nodes:.0f}",
                     f"{share_tb:.1f}", "yes" if share_tb <= disk_tb else "no",
                     f"{nodes * rate * per_used:,.0f}"])
    lines.append(markdown_table(
        ["nodes", "hours per pass", "GB/s used (all nodes)",
         "Gb/s per node, cached views kept", "Gb/s per node, nothing kept",
         "TB share per node", f"share fits {disk_tb:.0f} TB",
         f"requests/s to the store ({per_shard} per shard)"],
        rows))
    lines += ["", f"A node uses {rate * per_sample * 8 / 1e9:.0f} Gb/s of tokens, half its "
              "NIC, at any N. Fetching whole shards multiplies what crosses the NIC by the "
              f"views per image ({views}) unless the views not drawn in this pass are still in "
              "the shard cache when a later pass draws them: with the shards dealt to the "
              f"nodes the same way every pass, a node's share fits its {disk_tb:.0f} TB from "
              "10 nodes on, and after the first pass only the share's evicted part is fetched "
              "again; below that, or with shards dealt anew every pass, the store and the NICs "
              f"must carry up to {views}x the tokens used, which one {nic_gbit:.0f} Gb/s NIC "
              "per node does not (the loader would run at ~1/2 of the GPUs' rate). Requests are "
              "not the bound: hundreds per second per node.",
              "",
              f"Opening a run scales with the (dataset, teacher) pairs, not the samples: here "
              f"it asked {open_requests:.0f} requests of the store for {pairs} pairs (zarr "
              f"metadata, calibration, done marks, statuses), so about {start:,.0f} for DUNE's "
              f"{mix_pairs} pairs, {start * 0.02:.0f}-{start * 0.05:.0f} s at 20-50 ms each, "
              "once per rank and run (forked workers inherit it), plus the statuses, 1 byte per "
              "sample (83 MB). It is not in the rate or the requests per sample above."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller mix (a few minutes)")
    parser.add_argument("--shard-window", type=int, default=0,
                        help="data.shard_window for the shard-aware rows (0: not measured)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--prefetch-shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measure")
    parser.add_argument("--root", type=Path, default=None,
                        help="where the cache is built (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true", help="print, leave the docs alone")
    args = parser.parse_args()
    if args.shard_window and "shard_window" not in {f.name for f in
                                                    dataclasses.fields(DataConfig)}:
        parser.error("--shard-window needs data.shard_window (the shard-aware sampler)")
    sizes = SIZES["quick" if args.quick else "full"]
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-remote-"))
    cache_toml, train_toml = write_demo_configs(root, sizes)
    build_cache(load_build_config(cache_toml), console=Console(stderr=True))
    cache = root / "cache"
    num_images = sum(sizes.images)
    batches = num_images // sizes.batch_size - 1  # one pass of the mix after the first batch
    used = token_bytes_per_sample(cache)
    common = {"data.num_workers": args.workers, "epoch_size": num_images, "epochs": 2}
    with running_s3_server() as server:
        url = server.upload(cache, server.url("bench-cache"))
        host, port = server.endpoint.removeprefix("http://").split(":")
        proxy = DelayingProxy((host, int(port)), args.latency_ms / 1000)
        import fsspec.config  # every s3 client of this process and its forks: via the proxy

        fsspec.config.conf["s3"] = client_options(proxy.endpoint)
        shard_cache = {"data.shard_cache_bytes": 10**10,
                       "data.prefetch_shards": args.prefetch_shards}
        plans: list[tuple[str, dict[str, Any]]] = [
            ("local disk, uniform sampler", {"data.cache": str(cache)}),
            ("S3, uniform sampler, no shard cache", {"data.cache": url}),
            ("S3, uniform, shard cache cold", {"data.cache": url, **shard_cache,
                                               "data.shard_cache_dir": str(root / "sc-u")}),
            ("S3, uniform, shard cache warm", {"data.cache": url, **shard_cache,
                                               "data.shard_cache_dir": str(root / "sc-u")}),
        ]
        if args.shard_window:
            window = {"data.cache": url, "data.shard_window": args.shard_window, **shard_cache,
                      "data.shard_cache_dir": str(root / "sc-w")}
            plans += [(f"S3, shard-aware W={args.shard_window}, shard cache cold", window),
                      (f"S3, shard-aware W={args.shard_window}, shard cache warm", window)]
        # Rounds of every measure in turn, so that other load slows them alike; each round
        # starts its shard caches empty (a folder of its own), the warm row reuses the cold's.
        rounds: dict[str, list[dict[str, float]]] = {label: [] for label, _ in plans}
        for r in range(args.rounds):
            for k, (label, overrides) in enumerate(plans):
                if "data.shard_cache_dir" in overrides:
                    overrides = {**overrides, "data.shard_cache_dir":
                                 f"{overrides['data.shard_cache_dir']}-{r}"}
                # Without the shard cache a sample costs ~0.1 s of requests: a part of the
                # pass is enough for its rate.
                count = batches if "shard_cache_dir" in str(overrides) or k == 0 else \
                    min(batches, _DIRECT_BATCHES)
                rounds[label].append(measure(train_toml, root / f"run{r}-{k}", proxy, count,
                                             **common, **overrides))
                print(label, rounds[label][-1], flush=True)
    # The median rate over rounds (of two: their mean); the other figures of the last round.
    results = {label: {**runs[-1], "rate": statistics.median(m["rate"] for m in runs)}
               for label, runs in rounds.items()}
    spread = {label: (min(m["rate"] for m in runs), max(m["rate"] for m in runs))
              for label, runs in rounds.items()}
    local = results[plans[0][0]]["rate"]
    rows = []
    for label, r in results.items():
        remote = label.startswith("S3")
        whole = (r["requests"] + r["startup_requests"]) / (r["samples"] + r["first_batch"])
        rows.append([label, f"{r['rate']:.0f}", "{:.0f} - {:.0f}".format(*spread[label]),
                     f"{r['rate'] / local:.2f}x",
                     f"{r['requests'] / r['samples']:.4f}" if remote else "-",
                     f"{r['bytes'] / (r['samples'] * used):.2f}" if remote else "-",
                     f"{r['open_s']:.1f} s, {r['open_requests']:.0f}",
                     f"{r['startup_s']:.1f} s, {r['startup_requests']:.0f}",
                     f"{whole:.3f}" if remote else "-"])
    aware = [label for label in results if "shard-aware" in label]
    judged = aware or [label for label in results if "shard cache" in label]
    worst_ratio = min(results[label]["rate"] / local for label in judged)
    worst_requests = max(results[label]["requests"] / results[label]["samples"]
                         for label in judged)
    met = worst_ratio >= 0.8 and worst_requests <= 1 / 16
    noise = max((hi - lo) / results[label]["rate"] for label, (lo, hi) in spread.items())
    warm = results[judged[-1]]
    pairs = sum(len(t) for t in _pairs(cache).values())
    body = "\n".join([
        "## bench_remote: training loader from S3 vs local disk",
        "",
        f"`bench_remote.py{' --quick' if args.quick else ''} --shard-window "
        f"{args.shard_window}`: the demo mix made larger ({num_images:,} images x "
        f"{sizes.views_per_image} views, {sizes.samples_per_shard} samples per shard, grid "
        f"{sizes.grid}, 3 teachers on 3 datasets, {used / 1e3:.1f} KB of tokens per sample) in "
        f"moto's S3 server on 127.0.0.1 behind a proxy adding {args.latency_ms:.0f} ms per "
        f"request; DataLoader with {args.workers} workers, batch {sizes.batch_size}; the run's "
        "opening and the start of a pass (worker start-up, the first batch) are timed "
        f"apart from the rest of the pass ({batches} batches: images/s and the counts); shard "
        f"cache prefetching {args.prefetch_shards} shards ahead on {FILL_THREADS} threads; "
        f"{args.rounds} round(s) of every measure in turn. Machine: {machine_description()}; "
        f"load average at the end {os.getloadavg()[0]:.1f}. The server, the proxy and the "
        "loader's main process share this machine's cores.",
        "",
        markdown_table(["loader", "images/s (median)", "slowest - fastest round",
                        "vs local disk", "requests per sample", "bytes fetched per byte used",
                        "opening the run: time, requests",
                        "start of the pass: time, requests",
                        "requests per sample, start included"],
                       rows),
        "",
        "Reading the table: without the shard cache every sample costs a ranged GET per "
        "teacher and the view-row chunks, each paying the added latency. Through the shard "
        "cache a shard's token objects and its chunk of view rows are fetched once, whole "
        "(one request each), by the prefetcher in the main process, and read locally by the "
        "workers; the cold rows fetch during the measure, the warm rows find everything local. "
        "A shard holds 2 views of its images and a pass draws one, so bytes fetched per byte "
        "used are about 2 cold (the other views stay for the next pass). Opening the run "
        "reads the cache's metadata once per rank (zarr metadata, statuses, calibration, done "
        "marks; small requests at the added latency); forked workers go on with it, so the "
        "start of a pass asks the store only for the first batches' shards (cold) or nothing "
        "(warm). Both are paid once per run, not per pass (persistent workers); the last "
        "column counts the start in, for this mix's short pass.",
        "",
        (f"**Goal {'met' if met else 'not met'}** (shard-aware from S3 >= 0.8x local disk with "
         f"<= 1/16 = 0.0625 request per sample, judged on the "
         f"{'shard-aware' if aware else 'shard cache'} rows): worst {worst_ratio:.2f}x local "
         f"disk, at most {worst_requests:.4f} requests per sample in the pass after its start."
         + ("" if aware else " The shard-aware rows were not measured (`--shard-window 0`).")
         + f" The rounds of one row differ by up to {noise:.0%} of its median on this shared "
         "machine: ratios that close to 1.00x are ties, and a remote row above 1.00x is noise, "
         "not a store faster than the disk."),
        "",
        projection(warm["open_requests"], pairs, 3),
    ])
    if args.no_write:
        print(body)
    else:
        write_section("bench_remote", body)
        print(body)


if __name__ == "__main__":
    main()
