"""Logs and plots with the ecosystem's tools: matplotlib curves, TensorBoard event files, W&B
offline, the progress display's plain lines; metrics.jsonl stays the source of truth."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from PIL import Image

from cache_format.errors import ConfigError
from tests.test_trainer import cache_base, one_thread, tiny_cache, tiny_config
from train import sinks as sinks_module
from train.config import TrainConfig
from train.curves import draw_loss_curves, loss_figure, stage_starts
from train.metrics import MetricsLog, read_metrics
from train.progress import LiveProgress
from train.run_folder import resume_differences
from train.sinks import LoggingConfig, TensorBoardSink, WandbConfig, open_sinks
from train.trainer import Trainer

__all__ = ["cache_base", "one_thread"]  # fixtures shared with test_trainer.py

TEACHERS = ["dinov2", "mast3r", "multihmr"]


def fake_rows(steps: int = 12, stage_at: int | None = None) -> list[dict]:
    """Train rows every step and held-out rows every 4 steps, for three teachers."""
    rows: list[dict] = []
    for step in range(0, steps + 1):
        stage = {} if stage_at is None else {"stage": int(step >= stage_at)}
        if step:
            losses = {f"loss/{t}": (i + 1) / (step + 1) for i, t in enumerate(TEACHERS)}
            rows.append({"kind": "train", "step": step, "lr": 1e-3, "loss": 1.0 / step,
                         **losses, **stage})
        if step % 4 == 0:
            held = {f"heldout/loss/{t}": (i + 1.5) / (step + 1) for i, t in enumerate(TEACHERS)}
            cos = {f"heldout/cos/{t}": step / (steps + i) for i, t in enumerate(TEACHERS)}
            rows.append({"kind": "eval", "step": step, "heldout/loss": 1.0, **held, **cos,
                         **stage})
    return rows


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# -- matplotlib -----------------------------------------------------------------------------------
def test_one_matplotlib_figure_shows_every_teacher(tmp_path: Path) -> None:
    rows = fake_rows(stage_at=8)
    rows.append({"kind": "train", "step": 13, "loss/dinov2": math.nan})  # not drawable: skipped
    paths = draw_loss_curves(rows, TEACHERS, tmp_path)
    assert [p.name for p in paths] == ["losses.png"] + [f"loss_{t}.png" for t in TEACHERS]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.info["Software"].startswith("Matplotlib")
    loss_ax, cos_ax = loss_figure(rows, TEACHERS).axes
    assert loss_ax.get_yscale() == "log" and cos_ax.get_yscale() == "linear"
    labels = [text.get_text() for text in loss_ax.get_legend().get_texts()]
    assert labels == [f"{t} {kind}" for t in TEACHERS for kind in ("train", "held-out")]
    assert [text.get_text() for text in cos_ax.get_legend().get_texts()] == TEACHERS
    train_line = loss_ax.lines[0]
    assert list(train_line.get_xdata()) == list(range(1, 13))  # the NaN at step 13 left out
    assert stage_starts(rows) == [8]
    assert [line.get_xdata()[0] for line in cos_ax.lines[len(TEACHERS):]] == [8]  # stage line


def test_an_empty_log_still_draws(tmp_path: Path) -> None:
    (path, _) = draw_loss_curves([], ["a"], tmp_path)
    with Image.open(path) as image:
        assert image.format == "PNG"


# -- progress -------------------------------------------------------------------------------------
def test_plain_progress_lines_parse_as_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    progress = LiveProgress("lines", total=40, start=0)
    for step in range(1, 41):
        progress.update(step, 100.0 + step, {"lr": 1e-3, "loss": 1.0 / step,
                                             "loss/dinov2": 2.0 / step})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and all(line.startswith("progress ") for line in lines)
    fields = [dict(part.split("=", 1) for part in line.split()[1:]) for line in lines]
    assert [int(f["step"]) for f in fields] == list(range(2, 41, 2))
    last = fields[-1]
    assert int(last["total"]) == 40 and float(last["img_per_s"]) == 140.0
    assert float(last["eta_s"]) == 0.0 and float(last["loss/dinov2"]) == pytest.approx(0.05)


def test_off_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    progress = LiveProgress("off", total=4, start=0)
    progress.update(4, 1.0, {"loss": 1.0})
    assert capsys.readouterr().out == ""


# -- TensorBoard ----------------------------------------------------------------------------------
def test_tensorboard_gets_the_jsonl_rows_and_purges_them_on_resume(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    sinks = open_sinks(LoggingConfig(), tmp_path, None, {})
    assert [type(s) for s in sinks] == [TensorBoardSink]
    log = MetricsLog(tmp_path, sinks=sinks)
    for step in range(1, 7):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step, "flag": True})
    log.close()
    # Resume from the checkpoint of step 3: steps 4.. are logged again, with other values.
    log = MetricsLog(tmp_path, resume_step=3, sinks=open_sinks(LoggingConfig(), tmp_path, 3, {}))
    for step in range(4, 6):
        log.write({"kind": "train", "step": step, "loss": 10.0 + step})
    log.write({"kind": "eval", "step": 5, "heldout/cos/dinov2": 0.5})
    log.close()
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    board = read_scalars(tmp_path / "tensorboard", "loss")
    assert board == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [s for s, _ in board] == [1, 2, 3, 4, 5]
    assert read_scalars(tmp_path / "tensorboard", "heldout/cos/dinov2") == [(5, 0.5)]


def test_tensorboard_off_or_missing_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert open_sinks(LoggingConfig(tensorboard=False), tmp_path, None, {}) == []
    monkeypatch.setattr(sinks_module, "installed", lambda package: False)
    assert open_sinks(LoggingConfig(), tmp_path, None, {}) == []
    assert "tensorboard package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "tensorboard").exists()


# -- Weights & Biases -----------------------------------------------------------------------------
def test_wandb_does_nothing_unless_enabled_and_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    off = LoggingConfig(tensorboard=False)
    assert open_sinks(off, tmp_path, None, {}) == []  # installed or not: disabled is nothing
    enabled = LoggingConfig(tensorboard=False, wandb=WandbConfig(enabled=True, mode="offline"))
    monkeypatch.setattr(sinks_module, "installed", lambda package: False)
    assert open_sinks(enabled, tmp_path, None, {}) == []
    assert "wandb package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "wandb").exists()


def test_wandb_offline_writes_the_run_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    # No network: an unreachable server, and offline mode must not try it.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = LoggingConfig(tensorboard=False,
                        wandb=WandbConfig(enabled=True, mode="offline", tags=("test",)))
    log = MetricsLog(tmp_path, sinks=open_sinks(cfg, tmp_path, None, {"batch_size": 4}))
    for row in fake_rows(steps=4):
        log.write(row)
    log.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb")), "the offline run's data file"


def test_logging_config_is_checked_and_free_to_change_on_resume() -> None:
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        WandbConfig(mode="cloud")
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        TrainConfig.from_dict({"logging": {"tensorboard": "yes"}})
    base = TrainConfig()
    changed = dataclasses.replace(base, logging=LoggingConfig(
        tensorboard=False, wandb=WandbConfig(enabled=True)))
    assert resume_differences(base.to_dict(), changed.to_dict()) == []


# -- a run ---------------------------------------------------------------------------------------
@pytest.mark.loss_curves
def test_a_run_writes_tensorboard_and_the_all_teacher_figure(
    cache_base: Path, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    root = tiny_cache(cache_base, "fp16")
    cfg = tiny_config(root, tmp_path / "run", max_steps=6, eval_every=3, log_every=1)
    Trainer(cfg, progress="off").fit()
    run = tmp_path / "run"
    rows = read_metrics(run)
    for teacher in TEACHERS:
        want = [(r["step"], pytest.approx(r[f"loss/{teacher}"])) for r in rows
                if r["kind"] == "train" and f"loss/{teacher}" in r]
        assert read_scalars(run / "tensorboard", f"loss/{teacher}") == want
        cos = [(r["step"], pytest.approx(r[f"heldout/cos/{teacher}"])) for r in rows
               if r["kind"] == "eval"]
        assert read_scalars(run / "tensorboard", f"heldout/cos/{teacher}") == cos
    with Image.open(run / "curves" / "losses.png") as image:
        assert image.info["Software"].startswith("Matplotlib")
