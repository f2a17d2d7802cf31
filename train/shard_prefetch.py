"""Background prefetch of the epoch's next token shards into the local shard cache.

The epoch's order is known in the main process: the sampler makes it. `ShardPrefetchSampler`
wraps the sampler the DataLoader iterates: it reads the order ahead of what it hands out, and a
thread of the main process fetches each upcoming shard (whole shard files, one request per
teacher) into the node's local shard cache (cache_format/shard_cache.py). The DataLoader
workers, which read the same folder, then find those shards local.

At most `shards_ahead` shards are fetched ahead of the item that first needs them (counted from
the items already handed to the DataLoader), so that prefetching cannot evict the shards the
workers still need as long as the shard cache holds more than that. `fill_threads` threads
fetch at once, in the order of the epoch: an object store's first-byte latency (tens of
milliseconds per request) would otherwise bound one thread to a few dozen objects a second,
fewer than the workers use. A failed prefetch is only logged: the worker that needs the shard
fetches it itself, and reports a failure properly.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Protocol

from torch.utils.data import Sampler

from cache_format.errors import ConfigError

#: Items read ahead of the DataLoader at most (bounds the look-ahead of a sampler that keeps
#: returning to shards already fetched).
_MAX_ITEMS_AHEAD = 1 << 16
_STOP = object()
#: Shards fetched at once: enough to hide a 20-50 ms first-byte latency at a few hundred
#: samples a second per node (docs/benchmarks.md, bench_remote).
FILL_THREADS = 4

log = logging.getLogger("dune.train")


class ShardedItems(Protocol):
    """What the prefetcher needs of a dataset: the shard of an item, and a way to fetch it."""

    def shard_of(self, item: int) -> tuple[int, int]: ...

    def fill_shard_cache(self, dataset: int, shard: int) -> None: ...


class ShardPrefetchSampler(Sampler[int]):
    """Yields `sampler`'s items unchanged, fetching their shards `shards_ahead` shards early."""

    def __init__(self, sampler: Sampler[int], data: ShardedItems, shards_ahead: int,
                 fill_threads: int = FILL_THREADS) -> None:
        if shards_ahead < 1:
            raise ConfigError(f"data.prefetch_shards: expected >= 1, found {shards_ahead}")
        self.sampler = sampler
        self.data = data
        self.shards_ahead = int(shards_ahead)
        self.fill_threads = max(1, min(int(fill_threads), self.shards_ahead))
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._count = threading.Lock()
        self.fetched = 0  # shards the threads have filled (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def _start(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self.fill_threads:
            thread = threading.Thread(target=self._fill_loop, name="dune-shard-prefetch",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _fill_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            dataset, shard = job  # type: ignore[misc]
            try:
                self.data.fill_shard_cache(dataset, shard)
                with self._count:
                    self.fetched += 1
            except Exception as exc:  # the worker that needs the shard reports it properly
                log.warning("shard prefetch of dataset %d shard %d failed: %s: %s",
                            dataset, shard, type(exc).__name__, exc)

    def __iter__(self) -> Iterator[int]:
        self._start()
        base = iter(self.sampler)
        ahead: deque[int] = deque()  # items read from the sampler, not yet handed out
        pending: deque[tuple[int, tuple[int, int]]] = deque()  # (first position, shard) queued
        recent: OrderedDict[tuple[int, int], None] = OrderedDict()  # shards queued lately
        read = handed = 0
        exhausted = False
        while True:
            # Read ahead while fewer than `shards_ahead` queued shards are still to be reached.
            while (not exhausted and len(pending) < self.shards_ahead
                   and len(ahead) < _MAX_ITEMS_AHEAD):
                try:
                    item = next(base)
                except StopIteration:
                    exhausted = True
                    break
                ahead.append(item)
                shard = self.data.shard_of(item)
                if shard in recent:
                    recent.move_to_end(shard)
                else:
                    recent[shard] = None
                    if len(recent) > 4 * self.shards_ahead:
                        recent.popitem(last=False)
                    pending.append((read, shard))
                    self._queue.put(shard)
                read += 1
            if not ahead:
                return
            while pending and pending[0][0] <= handed:
                pending.popleft()
            handed += 1
            yield ahead.popleft()

    def close(self) -> None:
        """Stop the fill threads (each finishes the shard it is fetching)."""
        alive = [t for t in self._threads if t.is_alive()]
        for _ in alive:
            self._queue.put(_STOP)
        for thread in alive:
            thread.join(timeout=60)
        self._threads = []
