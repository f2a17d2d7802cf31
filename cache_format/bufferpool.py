"""`BufferPool`: recycles the large output arrays of batch reads (and the reader's prepared
one-sample outputs) once nothing outside the pool references them."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def arrays_unreferenced(arrays: list[np.ndarray]) -> bool:
    """No reference to any of `arrays` outside the pool's set: a set of output arrays that
    `BufferPool.get` may hand out again."""
    for array in arrays:
        # References: the set, this loop variable and getrefcount's argument.
        if sys.getrefcount(array) != 3:
            return False
    return True


class BufferPool:
    """Recycles the output arrays of batch reads once nothing outside the pool references them.

    Fresh large arrays cost the kernel a page fault and a zero fill per page (about as much as
    copying the data in); a trainer reads batches of one shape over and over, so the pool hands
    back the arrays of a batch whose tensors the caller has dropped. An array still referenced
    anywhere (a tensor from torch.from_numpy or any view of it, a numpy view, a slice) has a
    higher refcount and keeps its whole set out of reuse. Each thread has its own sets, so a
    lookup takes no lock and two threads never get the same set. A set may also be any object
    with its own test of being free (`get`'s `free`): the reader's prepared one-sample outputs.
    """

    def __init__(self, per_key: int = 4, keys: int = 32) -> None:
        self._per_key = per_key
        self._keys = keys
        self._local = threading.local()

    def get(self, key: Any, make: Callable[[Any], T],
            free: Callable[[T], bool | None] = arrays_unreferenced  # type: ignore[assignment]
            ) -> T:
        """A set for `key`: a free one (`free(set)`) of those `make(key)` built earlier, else
        new. `free(set)` says True (hand it out), False (still in use) or None (never free
        again, e.g. a one-sample slot whose tensor the caller changed in place: the pool drops
        it, so that it takes no place a usable set could have).

        Equal keys must mean equal sets; the set returned belongs to the pool: do not change
        it. An array of a set may be a view of a buffer that only the set's arrays reference.
        """
        try:
            by_key: dict[Any, list[Any]] = self._local.sets
        except AttributeError:
            by_key = self._local.sets = {}
        sets = by_key.get(key)
        if sets is None:
            sets = by_key[key] = []
            while len(by_key) > self._keys:
                del by_key[next(iter(by_key))]
        for arrays in sets:
            usable = free(arrays)
            if usable:
                return arrays
            if usable is None:  # rare: drop every dead set, then look again
                sets[:] = [other for other in sets if free(other) is not None]
                return self.get(key, make, free)
        arrays = make(key)
        if len(sets) < self._per_key:
            sets.append(arrays)
        return arrays
