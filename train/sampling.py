"""Epoch samplers over a cache: one cached view per image per epoch, sharded across ranks.

A cache holds `views_per_image` views of every image. An epoch draws, for every image, one of
its usable views (deterministic from the seed and the epoch), then orders the images:

- `uniform`: one random permutation of all images of the mix;
- `teacher_balanced`: the reference's scheme: each domain (the teacher a dataset belongs to)
  gets an equal share. Positions cycle through the domains round-robin (d0, d1, d2, d0, ...),
  each domain reading its own shuffled stream of images; a smaller domain's stream starts a
  fresh permutation when it runs out ("cycled"), so the default epoch is
  `n_domains x largest domain` samples and every image of the largest domain is seen once.

How a stream (the whole mix's, or one domain's) orders its images is the sampler's `order`:
`ImageOrder` (the default) draws a permutation of the images for every pass;
`train.shard_sampling.ShardWindowOrder` draws a permutation of the cache's shards and shuffles
the images within windows of W consecutive shards, so that the loader reads each shard in a few
large requests (`data.shard_window`). Everything below (domains, blocks, padding, resume) is the
same for both.

The global sequence of an epoch is cut into blocks of `batch_size` consecutive positions and
the blocks are dealt to the ranks in turn, so that at every step the ranks' batches, put side by
side in rank order, are exactly the batch one process would draw with `batch_size x world_size`
(the DDP-equivalence guarantee). Without `batch_size` the block is 1 (`uniform`) or the number
of domains (`teacher_balanced`: every rank still sees the domains in equal share). The epoch is
padded at its end, by continuing the sequence, to a whole number of blocks per rank so that all
ranks take the same number of steps.

Resuming: `state_dict(consumed)` records the epoch and how far into its *global* sequence the
run has read (`global_start`: consumed steps x the global batch), beside this rank's own count.
After `load_state_dict`, iteration restarts at exactly the next sample of the same sequence. The
global sequence depends on the seed, the mode, the epoch size and the global batch
(`block x world_size`), not on how it is dealt, so a run may resume on another number of
processes with the same global batch: each new rank starts at `global_start / world_size` of its
own share, and no sample of the epoch is repeated or skipped. (Bit-exact losses are promised
only at the same world size: per-rank RNG streams and reduction orders differ.)

Memory: iteration holds, as uint32 dataset indices (uint64 past 2**32 items), the smaller of
(a) this rank's share of the current epoch: 4 bytes per epoch position, divided by the world
size, and (b) the current pass of each stream: 4 bytes per image (`by_pass`: chosen when the
share is longer than one pass over the images, as with `teacher_balanced` over unequal domains,
whose epoch is `n_domains x largest domain`; every pass has a generator of its own, so any pass
can be drawn alone, and `rank_positions` reads positions from them). At most 4 bytes per image
whatever the mode: 2 per sample at 2 views per image, 0.67 at 6. The shard order adds 4 bytes
per shard. The previous epoch's order is dropped before the next is drawn; how the draws avoid
transients the size of the epoch is in `train.image_order`. The groups (`ViewGroups`) are
asked a chunk of images at a time, so no per-image table is needed; iteration hands out
indices in chunks, never as one Python list of the epoch. `rank_sequence` materializes the
whole share (and keeps it for that epoch): for tests and tools.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from torch.utils.data import Sampler

from cache_format.errors import ConfigError
from cache_format.serde import check_choice
from train.image_order import (
    EpochOrder,
    ImageOrder,
    ViewGroups,
    index_dtype,
    scratch_array,
    view_groups,
)

SamplingMode = Literal["uniform", "teacher_balanced"]
SAMPLING_MODES: tuple[str, ...] = ("uniform", "teacher_balanced")
#: Indices handed to the DataLoader per Python list (bounds what iteration holds as objects).
_YIELD_CHUNK = 4096
class ViewEpochSampler(Sampler[int]):
    """Yields this rank's dataset indices for one epoch (see the module docstring).

    `epoch_size` counts samples over all ranks; None means one pass over the mix (`uniform`:
    every image once; `teacher_balanced`: number of domains x largest domain).
    `len(sampler)` is the number of indices the next iteration yields (less than a full
    epoch right after resuming mid-epoch); `samples_per_rank` is a full epoch's share.
    `order` orders each stream's images (default `ImageOrder`: a permutation per pass).
    """

    def __init__(
        self,
        data: ViewGroups,
        seed: int,
        mode: SamplingMode = "uniform",
        epoch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        order: EpochOrder | None = None,
    ) -> None:
        check_choice(mode, SAMPLING_MODES, "sampling mode")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank/world_size: expected 0 <= rank < world_size, found rank={rank}, "
                f"world_size={world_size}"
            )
        if epoch_size is not None and epoch_size < 1:
            raise ConfigError(f"epoch_size: expected a positive count or None, found {epoch_size}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive count or None, found {batch_size}")
        if seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, found {seed}")
        self.groups = view_groups(data)
        self.order: EpochOrder = ImageOrder(self.groups) if order is None else order
        self.seed = int(seed)
        self.mode: SamplingMode = mode
        self.rank = rank
        self.world_size = world_size
        num_images = self.groups.num_images
        if num_images == 0:
            raise ConfigError("sampler: the dataset has no usable image (every sample skipped?)")
        # Domains with at least one image, in id order; empty domains take no share. Their
        # images are found from the groups' runs when an epoch's order is drawn.
        spans = self.groups.domain_spans()
        self._domains = np.unique(spans[:, 0])
        sizes = np.array([(spans[spans[:, 0] == d, 2] - spans[spans[:, 0] == d, 1]).sum()
                          for d in self._domains], dtype=np.int64)
        if mode == "uniform":
            default_size = num_images
            default_block = 1
        else:
            default_size = len(self._domains) * int(sizes.max())
            default_block = len(self._domains)
        self.epoch_size = int(epoch_size) if epoch_size is not None else default_size
        self.batch_size = batch_size
        self.block = int(batch_size) if batch_size is not None else default_block
        per_round = self.block * world_size
        self.padded_size = -(-self.epoch_size // per_round) * per_round
        self.samples_per_rank = self.padded_size // world_size
        # The dtype of dataset indices: what the epoch order is kept as.
        last = np.array([num_images - 1])
        items = int(self.groups.first_of(last)[0] + self.groups.count_of(last)[0])
        self._dtype = index_dtype(items)
        # The streams: (domain or None, images, tag) of each slot of the round-robin.
        self._slots = ([(None, num_images, 0)] if mode == "uniform" else
                       [(int(d), int(n), 1 + k) for k, (d, n) in
                        enumerate(zip(self._domains, sizes, strict=True))])
        # What iteration holds: this rank's share of the epoch (4 bytes per position, divided
        # by the world size) or, when that is more than one pass over the images
        # (teacher_balanced cycles its small domains; a large epoch_size), the current pass of
        # each stream (4 bytes per image), drawn when the positions reach it.
        self.by_pass = self.samples_per_rank > num_images
        self._passes: dict[int, tuple[tuple[int, int], np.ndarray]] = {}
        self.epoch = 0
        self.start_index = 0
        self._yielded = 0
        self._resume_base = 0
        self._cached: tuple[int, np.ndarray] | None = None

    # -- the sequence -------------------------------------------------------------------------
    def global_sequence(self, epoch: int, scratch: bool = False) -> np.ndarray:
        """All ranks' dataset indices of `epoch`, in the order one process would read them.
        With `scratch`, in a mapping of its own (`scratch_array`): for a transient sequence."""
        length = self.padded_size
        empty = scratch_array if scratch else np.empty
        if self.mode == "uniform":
            sequence = empty(length, self._dtype)
            self.order.stream(None, sequence, self.seed, epoch, 0)
            return sequence
        n_domains = len(self._domains)
        per_domain = -(-length // n_domains)
        sequence = empty((per_domain, n_domains), self._dtype)
        for slot, domain in enumerate(self._domains):
            # Each domain's stream is written straight into its column (no copy of it).
            self.order.stream(int(domain), sequence[:, slot], self.seed, epoch, 1 + slot)
        # Round-robin: position k reads domain k % n_domains, element k // n_domains of it.
        return sequence.reshape(-1)[:length]

    def rank_sequence(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for `epoch`: its blocks of the global sequence."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        self._cached = None  # the previous epoch's order goes before this one is drawn
        if self.world_size == 1:
            mine = self.global_sequence(epoch)
            self._cached = (epoch, mine)
            return mine
        # Several ranks: the global sequence is a transient, this rank's share is kept.
        blocks = self.global_sequence(epoch, scratch=True).reshape(-1, self.world_size,
                                                                   self.block)
        mine = blocks[:, self.rank, :].reshape(-1).copy()
        self._cached = (epoch, mine)
        return mine

    # -- the Sampler protocol -----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields; a new epoch starts at its beginning.

        Setting the epoch that `load_state_dict` restored keeps the restored position, so
        the usual `load_state_dict(...)` then `for e in ...: set_epoch(e)` resumes exactly.
        """
        if epoch != self.epoch:
            self.start_index = 0
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, start, end = self.epoch, self.start_index, self.samples_per_rank
        self._yielded = 0
        self._resume_base = start
        # A later iteration of the same epoch starts from its beginning again.
        self.start_index = 0
        if self.by_pass:
            self._cached = None
            self._passes = {k: v for k, v in self._passes.items() if v[0][0] == epoch}
        else:
            self._passes = {}
            sequence = self.rank_sequence(epoch)
        for chunk in range(start, end, _YIELD_CHUNK):
            stop = min(end, chunk + _YIELD_CHUNK)
            values = (self.rank_positions(epoch, chunk, stop) if self.by_pass
                      else sequence[chunk:stop])
            for index in values.tolist():
                self._yielded += 1
                yield index

    def rank_positions(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """This rank's dataset indices at its positions [lo, hi) of `epoch` (the same as
        `rank_sequence(epoch)[lo:hi]`), drawn a pass at a time: each stream keeps only the pass
        the positions are in."""
        j = np.arange(lo, hi, dtype=np.int64)
        span = self.block * self.world_size
        g = j // self.block * span + self.rank * self.block + j % self.block
        n_slots = len(self._slots)
        slot, element = g % n_slots, g // n_slots
        out = np.empty(len(j), dtype=self._dtype)
        for k in np.unique(slot).tolist():
            at = np.flatnonzero(slot == k)
            size = self._slots[k][1]
            passes = element[at] // size
            for p in np.unique(passes).tolist():
                here = at[passes == p]
                out[here] = self._pass(epoch, k, p)[element[here] - p * size]
        return out

    def _pass(self, epoch: int, slot: int, index: int) -> np.ndarray:
        """Pass `index` of stream `slot` in `epoch`; a stream keeps one pass at a time, in a
        mapping of its own (`scratch_array`) that goes back to the system when replaced."""
        held = self._passes.get(slot)
        if held is not None and held[0] == (epoch, index):
            return held[1]
        self._passes.pop(slot, None)
        domain, size, tag = self._slots[slot]
        values = scratch_array(size, self._dtype)
        self.order.stream(domain, values, self.seed, epoch, tag, first_pass=index)
        self._passes[slot] = ((epoch, index), values)
        return values

    @property
    def held_nbytes(self) -> int:
        """Bytes of the epoch's order the sampler holds now (its share, or its streams' passes)."""
        share = self._cached[1].nbytes if self._cached is not None else 0
        return share + sum(values.nbytes for _, values in self._passes.values())

    def __len__(self) -> int:
        return self.samples_per_rank - self.start_index

    # -- resume -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """What fixes the global sequence (not how it is dealt to the ranks)."""
        return {
            "seed": self.seed,
            "mode": self.mode,
            "epoch_size": self.epoch_size,
            "global_block": self.block * self.world_size,
            "num_images": int(self.groups.num_images),
            **self.order.fingerprint(),
        }

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position to resume from: the epoch and the samples this rank consumed in it.

        With a DataLoader, the sampler runs ahead of the training step (prefetching), so
        pass `consumed` = samples this rank has actually trained on since the epoch began
        (steps x batch size); without it, the count of indices yielded so far is used.
        """
        if consumed is None:
            consumed = self._resume_base + self._yielded
        if not 0 <= consumed <= self.samples_per_rank:
            raise ConfigError(
                f"sampler state: consumed must be in [0, {self.samples_per_rank}], found {consumed}"
            )
        # Whole blocks map to a prefix of the global sequence; a partial block (a sampler
        # iterated without a batch size) only resumes on the same ranks.
        whole = consumed % self.block == 0
        return {
            "epoch": self.epoch,
            "start_index": int(consumed),
            "global_start": int(consumed * self.world_size) if whole else None,
            "rank": self.rank,
            "world_size": self.world_size,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict`, on any world size with the same global
        batch; the sampler's other settings must be the same."""
        expected = self._fingerprint()
        # States saved before shard windows existed were drawn in image order (window 0).
        state = {"shard_window": 0, **state}
        for field, value in expected.items():
            if state.get(field) != value:
                what = " (the global batch: block x world_size)" if field == "global_block" else ""
                raise ConfigError(
                    f"sampler state.{field}{what}: the saved run used {state.get(field)!r}, "
                    f"this run has {value!r}",
                    hint="resume with the same data, seed, sampling mode, shard window, epoch size "
                    "and global batch (set batch_size_global when the number of processes "
                    "changes)",
                )
        same_ranks = state.get("world_size") == self.world_size
        if same_ranks and state.get("rank") in (None, self.rank):
            start = int(state["start_index"])
        elif state.get("global_start") is not None:
            start = int(state["global_start"]) // self.world_size
        else:
            raise ConfigError(
                f"sampler state: saved by rank {state.get('rank')} of "
                f"{state.get('world_size')} in the middle of a block; it resumes only on the "
                f"same rank of the same world size (this is rank {self.rank} of "
                f"{self.world_size})",
                hint="resume with the number of processes the run was saved with",
            )
        if not 0 <= start <= self.samples_per_rank:
            raise ConfigError(
                f"sampler state.start_index: expected in [0, {self.samples_per_rank}], "
                f"found {start}"
            )
        self.epoch = int(state["epoch"])
        self.start_index = start
        self._yielded = 0
        self._resume_base = start
