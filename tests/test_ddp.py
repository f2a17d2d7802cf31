"""Two processes under torchrun (gloo, CPU) compute what one process computes with the same
global batch: each rank reads its own blocks of the sequence, teacher dropping normalises and
draws over the global batch, and batch-mode teacher statistics are reduced across ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.build_fixtures import REPO, subprocess_env
from tests.test_trainer import cache_base, one_thread, tiny_cache, tiny_config, train_losses
from train.metrics import read_metrics
from train.trainer import Trainer

__all__ = ["cache_base", "one_thread"]  # fixtures shared with test_trainer.py

STEPS = 6


def test_two_processes_match_one_with_the_same_global_batch(
    cache_base: Path, tmp_path: Path
) -> None:
    # Batch-mode teacher norms and lowest-loss dropping: the two places where ranks must agree
    # on global quantities (statistics, coefficient totals, random draws).
    norm = "batch"
    root = tiny_cache(cache_base, "int8")
    config = tmp_path / "train.toml"
    config.write_text(
        (root / "train.toml").read_text()
        .replace('cache = "cache"', f'cache = "{root / "cache"}"')
        .replace('mode = "exact"', f'mode = "{norm}"')
    )
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "train.cli", "fit", str(config), "--out", str(out), "--max-steps", str(STEPS),
    ]
    # The two processes start first: the single-process reference runs while they import torch.
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        single = tiny_config(root, tmp_path / "one", max_steps=STEPS, **{"norm.mode": norm})
        reference = Trainer(single, progress="off").fit()["rows"]
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    rows = read_metrics(out)
    for key in ("loss", "loss/dinov2", "loss/mast3r", "loss/multihmr"):
        one, two = train_losses(reference, key), train_losses(rows, key)
        assert len(one) == len(two) == STEPS
        for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (key, step)
    heldout_one = [r["heldout/loss"] for r in reference if r["kind"] == "eval"]
    heldout_two = [r["heldout/loss"] for r in rows if r["kind"] == "eval"]
    assert heldout_two == pytest.approx(heldout_one, rel=1e-4)
