"""The Trainer: distill a student from a cache (or, `online`, from teachers run in the loop).

Read `fit` top to bottom: one comment per phase. Everything a step depends on lives in
`state_dict()` (model, optimizer, norms, sampler position, every RNG), so a run killed and
restarted with the same command resumes from `checkpoints/last.pt` and, on CPU with
`deterministic = true`, reproduces the uninterrupted run's losses exactly.

Distributed: launched by `torchrun`, one process per device; gloo on CPU, nccl on CUDA. Each rank
reads its own blocks of the global sequence (see `train.sampling`), batch statistics and teacher
dropping's normalisation are reduced across ranks, so N ranks compute the gradient of one
process with the same global batch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from cache_format.errors import ConfigError
from cache_format.locations import is_url
from train.checkpoint import (
    BEST,
    LAST,
    checkpoint_dir,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from train.config import TrainConfig
from train.curves import draw_loss_curves
from train.distributed import setup_distributed
from train.evaluation import evaluate_heldout
from train.init_from import init_model_from
from train.losses import total_loss
from train.metrics import MetricsLog, read_metrics
from train.model import DistillModel
from train.progress import LiveProgress
from train.run_data import RunContext, open_run_data
from train.run_folder import check_resume, write_run_files
from train.shard_prefetch import ShardPrefetchSampler
from train.sinks import open_sinks
from train.step import check_finite
from train.teacher_dropping import TeacherDropping


def lr_at(step: int, total_steps: int, peak: float, min_lr: float, warmup_fraction: float) -> float:
    """Learning rate of `step` (0-based): linear warmup to `peak`, then cosine down to `min_lr`."""
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def describe_sizes(sizes: dict[str, int]) -> str:
    """One line saying the batch per device and global, and the images of an epoch and run."""
    return (
        f"batch {sizes['batch_size_per_device']} per device x {sizes['world_size']} "
        f"process(es) = {sizes['batch_size_global']} global; epoch {sizes['images_per_epoch']:,}"
        f" images ({sizes['steps_per_epoch']:,} steps); run {sizes['epochs']} epochs = "
        f"{sizes['images_total']:,} images ({sizes['steps_total']:,} steps)"
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms, LayerScale, tokens and pos embed are exempt."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Trainer:
    """One `dune-train fit` run. `Trainer(cfg).fit()`; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, progress: str = "bar") -> None:
        """`progress`: "bar" (rich), "lines" (plain text, for logs) or "off"."""
        self.cfg = cfg
        self.show_progress = progress
        # -- processes and devices: torchrun's env vars, else one process ----------------------
        self.dist = setup_distributed(cfg)
        self.device = self.dist.device
        self.global_batch = cfg.global_batch(self.dist.world_size)
        if self.global_batch % self.dist.world_size:
            raise ConfigError(
                f"batch_size_global: the global batch {self.global_batch} is not divisible by "
                f"the {self.dist.world_size} processes",
                hint="pick a multiple of the world size, or set batch_size_per_device",
            )
        self.local_batch = self.global_batch // self.dist.world_size
        # -- the cache, checked against the run before anything is built -----------------------
        self.ctx: RunContext = open_run_data(cfg, self.dist)
        self.teachers = list(self.ctx.heads)
        self.steps_per_epoch = self.ctx.sampler.samples_per_rank // self.local_batch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        # -- the model: same seed on every rank, so every rank starts from the same weights -----
        torch.manual_seed(cfg.seed)
        self.model = DistillModel(cfg, self.ctx.heads, total_steps=self.total_steps)
        for teacher, norms in self.model.norms.items():
            for tok, norm in norms.items():
                norm.set_stats(*self.ctx.stats[teacher][tok])
        if cfg.init_from:
            # As the reference's --pretrained: student, projectors and (batch mode) the norms'
            # running statistics carry over; the optimizer below starts afresh.
            init_model_from(self.model, cfg.init_from, norms=cfg.norm.mode == "batch")
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay),
            lr=cfg.base_lr(self.dist.world_size),
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
        )
        forward: torch.nn.Module = self.model
        if self.dist.world_size > 1:
            # Norm buffers are computed identically on every rank: no need to broadcast them.
            forward = DistributedDataParallel(
                self.model, device_ids=self.dist.device_ids, broadcast_buffers=False
            )
        self.forward = torch.compile(forward) if cfg.compile else forward
        # -- a batch's losses (shared with evaluation) and teacher dropping -----------------------
        self.batch_losses = self.ctx.distill_step(self.model, self.device, amp=cfg.amp)
        # Draws for the *global* batch on every rank (each rank keeps its slice), so the drops
        # do not depend on the number of processes.
        self.dropping = TeacherDropping(
            cfg.dropping.strategy,
            cfg.dropping.p,
            teacher_domains=[self.ctx.domains[t] for t in self.teachers],
            generic_domain=self.ctx.generic_domain,
            across_ranks=True,
            seed=cfg.seed + 1,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.step = 0
        self.best_heldout = math.inf
        self.run_dir = Path(cfg.out_dir)

    # -- exact resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on, as tensors and plain containers."""
        consumed = (self.step - self.epoch * self.steps_per_epoch) * self.local_batch
        # The epoch of the next step (at an epoch's end the sampler still holds the old one).
        sampler_state = dict(self.ctx.sampler.state_dict(consumed), epoch=self.epoch)
        rngs = [rng_state()]
        if self.dist.world_size > 1:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": sampler_state,
            "rng_per_rank": rngs,
            "drop_generator": self.dropping.rng_state(),
            "best_heldout": self.best_heldout,
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved, on any number of processes with the same global
        batch (the sampler checks it). Bit-exact only at the saved world size: on another one,
        each rank continues the RNG stream of rank `rank % saved world size`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        sampler_state = dict(state["sampler"], rank=self.dist.rank)
        self.ctx.sampler.load_state_dict(sampler_state)
        self.step = int(state["step"])
        rngs = state["rng_per_rank"]
        set_rng_state(rngs[self.dist.rank % len(rngs)])
        self.dropping.set_rng_state(state["drop_generator"])
        self.best_heldout = float(state["best_heldout"])

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (the last one once training is over)."""
        return min(self.step // self.steps_per_epoch, self.cfg.epochs - 1)

    def sizes(self) -> dict[str, int]:
        """Batch and epoch sizes as this run resolved them (printed and stored at start)."""
        return {
            "world_size": self.dist.world_size,
            "batch_size_global": self.global_batch,
            "batch_size_per_device": self.local_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "images_per_epoch": self.steps_per_epoch * self.global_batch,
            "epochs": self.cfg.epochs,
            "steps_total": self.total_steps,
            "images_total": self.total_steps * self.global_batch,
        }

    # -- the run ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until `epochs` (or `max_steps`) and return a summary of the run."""
        cfg, is_main = self.cfg, self.dist.rank == 0
        stop_at = min(self.total_steps, cfg.max_steps if cfg.max_steps is not None else 10**18)
        # -- run folder: resume from last.pt when the same command ran before ---------------------
        last = checkpoint_dir(self.run_dir) / LAST
        resumed_from = None
        if last.is_file():
            check_resume(self.run_dir, cfg, self.ctx)
            self.load_state_dict(load_checkpoint(last, map_location=self.device))
            resumed_from = self.step
        if is_main:
            write_run_files(self.run_dir, cfg, self.ctx, self.sizes())
            if self.show_progress != "off":
                print(describe_sizes(self.sizes()), flush=True)
        metrics = MetricsLog(
            self.run_dir, resume_step=resumed_from,
            sinks=open_sinks(cfg.logging, self.run_dir, resumed_from, cfg.to_dict()),
        ) if is_main else None
        # -- held-out baseline, so the curves show where the student started ----------------------
        if resumed_from is None and self.step < stop_at:
            self._evaluate(metrics)
        started, paused, images_done = time.perf_counter(), 0.0, 0
        progress = LiveProgress(self.show_progress if is_main else "off", stop_at, self.step)
        loader = self.make_loader()
        while self.step < stop_at:
            self.ctx.sampler.set_epoch(self.epoch)
            # Starting an epoch's iterator draws worker seeds from the global RNG: keep that
            # out of the stream the model uses (drop path), so resumed runs draw the same.
            with torch.random.fork_rng(devices=[]):
                batches = iter(loader)
            for batch in batches:
                if self.step >= stop_at:
                    break
                # -- one optimizer step: lr, forward, losses, dropping, backward, clip, update ---
                logged = self.train_step(batch)
                images_done += self.global_batch
                # -- log: one metrics row per logged step (images/s leaves out eval and saving) ---
                elapsed = time.perf_counter() - started
                rate = images_done / max(elapsed - paused, 1e-9)
                if metrics is not None and (self.step % cfg.log_every == 0 or self.step == 1):
                    metrics.write(
                        {"kind": "train", "step": self.step, "epoch": self.epoch, **logged,
                         "images_per_s": rate, "elapsed_s": elapsed}
                    )
                progress.update(self.step, rate, logged)
                pause_began = time.perf_counter()
                # -- held-out evaluation and best checkpoint --------------------------------------
                if self.step % cfg.eval_every == 0 or self.step == stop_at:
                    self._evaluate(metrics)
                # -- last checkpoint: every checkpoint_every steps and at the end -----------------
                if self.step % cfg.checkpoint_every == 0 or self.step == stop_at:
                    self._save(LAST)
                paused += time.perf_counter() - pause_began
        progress.close()
        if metrics is not None:
            metrics.close()
        # -- loss curves and summary -------------------------------------------------------------
        rows = read_metrics(self.run_dir) if is_main else []
        if is_main:
            draw_loss_curves(rows, self.teachers, self.run_dir / "curves")
        busy = time.perf_counter() - started - paused
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "resumed_from": resumed_from,
            "images_per_s": images_done / busy if busy > 0 and images_done else 0.0,
            "teachers": self.teachers,
            "rows": rows,
        }

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on `batch`; returns the logged values (lr, losses over ranks)."""
        cfg = self.cfg
        # -- learning rate of this step ------------------------------------------------------------
        peak = cfg.base_lr(self.dist.world_size)
        lr = lr_at(self.step, self.total_steps, peak, cfg.optim.min_lr, cfg.optim.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # -- forward: student + projectors, targets, per-teacher losses, dropping ------------------
        out = self.batch_losses(batch, forward=self.forward)
        coeffs = self.dropping(out.losses.detach(), out.present, list(batch.domains))
        loss = total_loss(out.losses, coeffs)
        logged = self._reduce_for_log(loss, out.losses, out.present)
        # -- stop on a non-finite loss, naming the step and each teacher ---------------------------
        check_finite(logged, step=self.step + 1)
        # -- backward, clip, optimizer step --------------------------------------------------------
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
        self.optimizer.step()
        self.step += 1
        return {"lr": lr, **logged}

    # -- pieces of a step -------------------------------------------------------------------------
    def make_loader(self) -> DataLoader:
        """The training DataLoader: this rank's share of each epoch, batches of local_batch."""
        workers = self.cfg.data.num_workers
        sampler: Sampler[int] = self.ctx.sampler
        if self.cfg.data.prefetch_shards and is_url(self.ctx.reader.location):
            # The epoch's next shards, fetched into the local shard cache in the background
            # (the sampler's own state is what checkpoints keep).
            sampler = ShardPrefetchSampler(sampler, self.ctx.train_data,
                                           self.cfg.data.prefetch_shards)
        return DataLoader(
            self.ctx.train_data,
            batch_size=self.local_batch,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self.ctx.collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _reduce_for_log(
        self, loss: torch.Tensor, losses: torch.Tensor, present: torch.Tensor
    ) -> dict[str, float]:
        """Total loss and each teacher's mean loss over its present samples, over all ranks.

        One small all-reduce per step: every rank then sees the same values, so a non-finite
        loss stops every rank at the same step instead of leaving the others waiting.
        """
        mask = present.float()
        sums = torch.where(present, losses.detach().float(), torch.zeros_like(mask)).sum(0)
        packed = torch.cat([loss.detach().float().view(1), sums, mask.sum(0)])
        if self.dist.world_size > 1:
            dist.all_reduce(packed)
            packed[0] /= self.dist.world_size
        values = packed.cpu().tolist()
        n = len(self.teachers)
        logged = {"loss": values[0]}
        for i, teacher in enumerate(self.teachers):
            count = values[1 + n + i]
            if count:  # a teacher absent from the whole global batch has nothing to report
                logged[f"loss/{teacher}"] = values[1 + i] / count
        return logged

    def _evaluate(self, metrics: MetricsLog | None) -> None:
        """Held-out loss and cosine per teacher; saves best.pt when the loss improves."""
        if self.ctx.heldout_data is None:
            return
        # Evaluating must not move the training RNG (its loader draws a seed): a run that
        # evaluates at its stop step and is then resumed draws what an uninterrupted one draws.
        with torch.random.fork_rng(devices=[]):
            result = evaluate_heldout(
                self.batch_losses, self.ctx.heldout_data, batch_size=self.local_batch,
                collate=self.ctx.collate, at_step=self.step, rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        if metrics is not None:
            metrics.write({"kind": "eval", "step": self.step, **result})
        # The untrained baseline (step 0) is not a candidate for best.pt.
        if self.step > 0 and result["heldout/loss"] < self.best_heldout:
            self.best_heldout = result["heldout/loss"]
            self._save(BEST)

    def _save(self, name: str) -> None:
        state = self.state_dict()  # collective in DDP: every rank takes part
        if self.dist.rank == 0:
            save_atomic(state, checkpoint_dir(self.run_dir) / name)
        if self.dist.world_size > 1:
            dist.barrier()
