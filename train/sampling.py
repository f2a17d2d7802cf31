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

Memory: the sampler holds only this rank's order of the current epoch, as uint32 dataset indices
(uint64 past 2**32 items): 4 bytes per image and epoch position, divided by the world size (the
shard order adds 4 bytes per shard). The
global sequence, the permutations and each domain's image list exist only while an epoch's order
is drawn, and iteration hands out indices in chunks, never as one Python list of the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Protocol

import numpy as np
from torch.utils.data import Sampler

from cache_format.errors import ConfigError

SamplingMode = Literal["uniform", "teacher_balanced"]
SAMPLING_MODES: tuple[str, ...] = ("uniform", "teacher_balanced")
#: Indices handed to the DataLoader per Python list (bounds what iteration holds as objects).
_YIELD_CHUNK = 4096
#: Images whose views are drawn at once while an epoch's order is made.
PICK_CHUNK = 1 << 16


def index_dtype(count: int) -> np.dtype:
    """The unsigned dtype that holds indices in [0, count): uint32, or uint64 past 2**32."""
    return np.dtype(np.uint32 if count <= 2**32 else np.uint64)


class ViewGroups(Protocol):
    """What a sampler needs from a dataset: its items grouped by image.

    The items of one image (its usable views) are the contiguous range
    `image_first[i] : image_first[i] + image_count[i]` of dataset indices.
    """

    image_first: np.ndarray  # unsigned or int64 [num_images]
    image_count: np.ndarray  # unsigned or int64 [num_images], >= 1
    image_domain: np.ndarray  # unsigned or int64 [num_images], in [0, num_domains)


def pick_views(groups: ViewGroups, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dataset indices of one view chosen uniformly among the usable views of each image."""
    counts = groups.image_count[images].astype(np.int64)
    offsets = np.floor(rng.random(len(images)) * counts).astype(np.int64)
    return groups.image_first[images] + np.minimum(offsets, counts - 1)


def _stream(
    groups: ViewGroups, images: np.ndarray, length: int, seed: int, epoch: int, tag: int,
    dtype: np.dtype,
) -> np.ndarray:
    """`length` dataset indices (`dtype`): passes over `images`, each a fresh permutation and
    view draw. Views are drawn in chunks (the generator's uniforms come out the same as in one
    call), so that drawing an epoch holds little beyond the permutation and the result."""
    out = np.empty(length, dtype=dtype)
    have = 0
    pass_index = 0
    while have < length:
        rng = np.random.default_rng([seed, epoch, pass_index, tag])
        order = rng.permutation(len(images))
        for start in range(0, min(len(order), length - have), PICK_CHUNK):
            picked = pick_views(groups, images[order[start : start + PICK_CHUNK]], rng)
            take = min(len(picked), length - have)
            out[have : have + take] = picked[:take]
            have += take
        pass_index += 1
    return out


class EpochOrder(Protocol):
    """How a stream of an epoch orders its images: the part of the sequence a sampler mode
    leaves open. `stream` returns `length` dataset indices of `dtype` for the images of
    `domain` (None: of the whole mix), passes after passes, deterministic from `seed`, `epoch`
    and `tag` (the stream's slot). `fingerprint` is what else fixes the order (saved with the
    sampler's state and compared on resume)."""

    def stream(self, domain: int | None, length: int, seed: int, epoch: int, tag: int,
               dtype: np.dtype) -> np.ndarray: ...

    def fingerprint(self) -> dict[str, Any]: ...


class ImageOrder:
    """Every pass of a stream is a fresh permutation of its images (the default order)."""

    def __init__(self, groups: ViewGroups) -> None:
        self.groups = groups

    def stream(self, domain: int | None, length: int, seed: int, epoch: int, tag: int,
               dtype: np.dtype) -> np.ndarray:
        """See `EpochOrder.stream`."""
        num_images = len(self.groups.image_first)
        image_dtype = index_dtype(num_images)
        if domain is None:
            images = np.arange(num_images, dtype=image_dtype)
        else:
            images = np.flatnonzero(self.groups.image_domain == domain).astype(image_dtype)
        return _stream(self.groups, images, length, seed, epoch, tag, dtype)

    def fingerprint(self) -> dict[str, Any]:
        """No shard window (states saved before the field existed read as the same)."""
        return {"shard_window": 0}


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
        if mode not in SAMPLING_MODES:
            raise ConfigError(f"sampling mode: expected one of {SAMPLING_MODES}, found {mode!r}")
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
        self.groups = data
        self.order: EpochOrder = ImageOrder(data) if order is None else order
        self.seed = int(seed)
        self.mode: SamplingMode = mode
        self.rank = rank
        self.world_size = world_size
        num_images = len(data.image_first)
        if num_images == 0:
            raise ConfigError("sampler: the dataset has no usable image (every sample skipped?)")
        # Domains with at least one image, in id order; empty domains take no share. Their
        # image lists are made when an epoch's order is drawn, not kept.
        self._domains, sizes = np.unique(np.asarray(data.image_domain), return_counts=True)
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
        items = int(data.image_first[-1]) + int(data.image_count[-1])
        self._dtype = index_dtype(items)
        self.epoch = 0
        self.start_index = 0
        self._yielded = 0
        self._resume_base = 0
        self._cached: tuple[int, np.ndarray] | None = None

    # -- the sequence -------------------------------------------------------------------------
    def global_sequence(self, epoch: int) -> np.ndarray:
        """All ranks' dataset indices of `epoch`, in the order one process would read them."""
        length = self.padded_size
        if self.mode == "uniform":
            return self.order.stream(None, length, self.seed, epoch, 0, self._dtype)
        n_domains = len(self._domains)
        per_domain = -(-length // n_domains)
        sequence = np.empty((per_domain, n_domains), dtype=self._dtype)
        for slot, domain in enumerate(self._domains):
            sequence[:, slot] = self.order.stream(int(domain), per_domain, self.seed, epoch,
                                                  1 + slot, self._dtype)
        # Round-robin: position k reads domain k % n_domains, element k // n_domains of it.
        return sequence.reshape(-1)[:length]

    def rank_sequence(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for `epoch`: its blocks of the global sequence."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        blocks = self.global_sequence(epoch).reshape(-1, self.world_size, self.block)
        mine = np.ascontiguousarray(blocks[:, self.rank, :].reshape(-1))
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
        sequence = self.rank_sequence(self.epoch)
        start = self.start_index
        self._yielded = 0
        self._resume_base = start
        # A later iteration of the same epoch starts from its beginning again.
        self.start_index = 0
        for chunk in range(start, len(sequence), _YIELD_CHUNK):
            for index in sequence[chunk : chunk + _YIELD_CHUNK].tolist():
                self._yielded += 1
                yield index

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
            "num_images": int(len(self.groups.image_first)),
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
