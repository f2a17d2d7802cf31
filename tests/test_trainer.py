"""The training loop on tiny caches built by stage one itself.

Three random-init teachers of different patch sizes and widths (the demo's stand-ins for DINOv2,
MASt3R and Multi-HMR, at widths 64 / 48 / 32), grid 2x2, a student of width 32 with one block,
batches of 8. `tiny_cache` builds each cache once per session and the other train test files
reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from cache_format.configfile import with_overrides
from cache_format.errors import CacheMismatchError, CheckpointError, ConfigError, TrainingError
from precompute.build import build_cache
from precompute.config import load_build_config
from train.checkpoint import load_checkpoint, save_atomic
from train.config import TrainConfig, load_train_config, resolve_paths
from train.curves import draw_loss_curves
from train.demo import DemoSizes, write_demo_configs
from train.export import export_run, load_full_model
from train.init_from import init_model_from
from train.metrics import MetricsLog, read_metrics
from train.model import DistillModel, TeacherHead
from train.run_folder import resume_differences
from train.student import interpolate_pos_embed
from train.trainer import Trainer, lr_at

TINY = DemoSizes(
    images=(10, 6, 6),
    image_size_range=(32, 64),
    grid=2,
    views_per_image=2,
    samples_per_shard=4,
    student_dim=32,
    student_depth=1,
    student_heads=2,
    batch_size=8,
    steps_per_epoch=10,
    epochs=2,
    heldout_images=2,
    num_workers=0,
    log_every=1,
    eval_every=10,
    checkpoint_every=5,
    lr=2e-3,
)
_BUILT: dict[tuple[str, str, int, int], Path] = {}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tests share 2 cores: one torch thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cache(
    base: Path, encoding: str = "fp16", sharing: str = "all", init_offset: int = 0,
    grid: int = 2,
) -> Path:
    """A folder holding cache.toml, train.toml and the built cache/ (built once per session)."""
    key = (encoding, sharing, init_offset, grid)
    if key not in _BUILT:
        root = base / f"tiny-{encoding}-{sharing.replace('+', '_')}-{init_offset}-g{grid}"
        cache_toml, _ = write_demo_configs(root, dataclasses.replace(
            TINY, encoding=encoding, sharing=sharing, seed=0, grid=grid))
        overrides = {"runtime.torch_threads": 1, "runtime.device": "cpu",
                     "runtime.loader_workers": 0}
        build_cfg = load_build_config(cache_toml, overrides)
        if init_offset:
            teachers = tuple(dataclasses.replace(t, init_seed=t.init_seed + init_offset)
                             for t in build_cfg.teachers)
            build_cfg = dataclasses.replace(build_cfg, teachers=teachers)
        threads = torch.get_num_threads()
        build_cache(build_cfg, console=Console(quiet=True))
        torch.set_num_threads(threads)  # the in-process build pins torch's thread count
        _BUILT[key] = root
    return _BUILT[key]


@pytest.fixture(scope="session")
def cache_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-caches")


def tiny_config(root: Path, out: Path, **overrides: object) -> TrainConfig:
    """The tiny train.toml of `root`, with dotted overrides, resolved, writing into `out`."""
    cfg = load_train_config(root / "train.toml")
    cfg = with_overrides(cfg, {"out_dir": str(out), **overrides})
    return resolve_paths(cfg, root / "train.toml")


def train_losses(rows: list[dict], key: str = "loss") -> list[float]:
    return [r[key] for r in rows if r.get("kind") == "train"]


# -- pieces ------------------------------------------------------------------------------------
def test_lr_warms_up_then_decays_to_min_lr() -> None:
    lrs = [lr_at(s, 100, peak=1e-3, min_lr=1e-6, warmup_fraction=0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 20) and lrs[19] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20], strict=True))
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:], strict=False))
    assert lrs[-1] == pytest.approx(1e-6, abs=2e-6)


def test_config_round_trips_and_refuses_typos(tmp_path: Path) -> None:
    _, train_toml = write_demo_configs(tmp_path, dataclasses.replace(TINY, images=(2, 2, 2)))
    cfg = load_train_config(train_toml)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.base_lr() == pytest.approx(2e-3)  # demo config: no batch scaling
    assert TrainConfig(batch_size=128).base_lr() == pytest.approx(3e-4 * 128 / 256)
    bad = tmp_path / "bad.toml"
    bad.write_text(train_toml.read_text().replace("[optim]", "[optim]\nlearning_rate = 1.0"))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="dropping.strategy"):
        with_overrides(cfg, {"dropping.strategy": "highest"})
    resolved = resolve_paths(cfg, train_toml)
    assert resolved.data.cache == str(tmp_path / "cache")  # relative to the config file
    changed = with_overrides(resolved, {"max_steps": 3, "optim.lr": 1.0})
    diffs = resume_differences(resolved.to_dict(), changed.to_dict())
    assert len(diffs) == 1 and diffs[0].startswith("optim.lr")


def test_checkpoints_are_atomic_and_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)

    class Unsaveable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"step": 2, "bad": Unsaveable()}, path)
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint is intact
    assert list(tmp_path.iterdir()) == [path]  # and no temp file is left behind
    # A checkpoint pickling an object (the reference pickles its argparse namespace) is refused.
    torch.save({"config": TrainConfig()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_metrics_resume_drops_rows_past_the_checkpoint_and_curves_are_pngs(
    tmp_path: Path,
) -> None:
    log = MetricsLog(tmp_path)
    for step in range(1, 8):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step, "loss/a": 2.0 / step})
    log.write({"kind": "eval", "step": 5, "heldout/loss/a": 0.3})
    MetricsLog(tmp_path, resume_step=5)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
    all_teachers, png = draw_loss_curves(rows, ["a"], tmp_path / "curves")
    assert all_teachers.name == "losses.png" and png.name == "loss_a.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.info["Software"].startswith("Matplotlib")
        colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 2  # a line was drawn, not a blank canvas


def test_init_from_a_checkpoint_at_another_grid_interpolates_pos_embed(tmp_path: Path) -> None:
    heads = {"dino": TeacherHead(dim=48, has_cls=True), "mast3r": TeacherHead(32, False)}
    small = TrainConfig.from_dict({"student": {"arch": "vit_small_patch14_reg4_dinov2",
                                               "img_size": 28, "embed_dim": 32, "depth": 1,
                                               "num_heads": 2}, "data": {"cache": "x"}})
    large = with_overrides(small, {"student": dataclasses.replace(small.student, img_size=56)})
    torch.manual_seed(0)
    old = DistillModel(small, heads)
    save_atomic({"model": old.state_dict()}, tmp_path / "last.pt")
    torch.manual_seed(1)
    new = DistillModel(large, heads)
    init_model_from(new, str(tmp_path / "last.pt"))
    expected = interpolate_pos_embed({"pos_embed": old.student.vit.pos_embed}, (4, 4),
                                     num_prefix_tokens=0)["pos_embed"]
    assert old.student.vit.pos_embed.shape[1] == 4 and new.student.vit.pos_embed.shape[1] == 16
    torch.testing.assert_close(new.student.vit.pos_embed, expected)
    torch.testing.assert_close(new.projectors["dino"].linear.weight,
                               old.projectors["dino"].linear.weight)
    # The fine-tuned student on the large input computes what the old one does there.
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(new.student.forward_tokens(x), old.student.forward_tokens(x))
    with pytest.raises(CheckpointError, match="no student weights"):
        save_atomic({"model": {"other.weight": torch.ones(1)}}, tmp_path / "other.pt")
        init_model_from(new, str(tmp_path / "other.pt"))


# -- runs --------------------------------------------------------------------------------------
@pytest.mark.loss_curves
def test_short_run_learns_the_teachers_and_fills_the_run_folder(
    cache_base: Path, tmp_path: Path
) -> None:
    root = tiny_cache(cache_base, "int8")
    cfg = tiny_config(root, tmp_path / "run", epochs=3, eval_every=15, max_steps=30)
    summary = Trainer(cfg, progress="off").fit()
    rows = summary["rows"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 15, 30]
    for teacher in ("dinov2", "mast3r", "multihmr"):
        start, end = evals[0][f"heldout/cos/{teacher}"], evals[-1][f"heldout/cos/{teacher}"]
        assert abs(start) < 0.2 and end > start + 0.25, (teacher, start, end)
    first = next(r for r in rows if r["kind"] == "train")
    assert {"step", "lr", "loss", "loss/dinov2", "loss/mast3r", "loss/multihmr"} <= set(first)
    run = tmp_path / "run"
    for name in ("config.json", "teachers.json", "metrics.jsonl", "checkpoints/last.pt",
                 "checkpoints/best.pt", "curves/loss_dinov2.png", "curves/loss_multihmr.png"):
        assert (run / name).is_file(), name
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == cfg
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 30 and ckpt["sampler"]["epoch"] == 2

    # Export: the student alone loads in timm and reproduces forward_tokens.
    paths = export_run(run, tmp_path / "export")
    import timm

    meta = json.loads(paths["student_config"].read_text())
    vit = timm.create_model(meta["architecture"], checkpoint_path=str(paths["student_weights"]),
                            **meta["model_args"]).eval()
    full = load_full_model(tmp_path / "export")
    x = torch.rand(2, 3, 28, 28)
    patches, prefix = vit.forward_intermediates(
        x, indices=1, norm=False, return_prefix_tokens=True, output_fmt="NLC",
        intermediates_only=True)[0]
    torch.testing.assert_close(torch.cat([prefix[:, :1], patches], 1),
                               full.student.forward_tokens(x))
    assert set(full.norms) == {"dinov2", "mast3r", "multihmr"}


@pytest.mark.parametrize(("encoding", "first_tol"), [("fp16", 1e-3), ("int8", 5e-3)])
def test_cached_and_online_runs_agree(
    cache_base: Path, tmp_path: Path, encoding: str, first_tol: float
) -> None:
    """fp16: first-step loss within 1e-3 of the online run; int8 within its fidelity bound
    (token cosine >= 0.9999 moves each loss term by at most ~sqrt(2e-4)/2 per token, well under
    5e-3 on average). After 50 steps the two loss curves stay within 2%."""
    root = tiny_cache(cache_base, encoding)
    steps = 50 if encoding == "fp16" else 1
    runs = {}
    for online in (False, True):
        cfg = tiny_config(root, tmp_path / f"online{online}", online=online, epochs=5,
                          max_steps=steps, eval_every=1000, checkpoint_every=1000)
        runs[online] = train_losses(Trainer(cfg, progress="off").fit()["rows"])
    cached, online = runs[False], runs[True]
    assert len(cached) == len(online) == steps
    assert abs(cached[0] - online[0]) < first_tol
    for step, (a, b) in enumerate(zip(cached, online, strict=True), start=1):
        assert abs(a - b) <= 0.02 * abs(b), (step, a, b)


def test_resume_reproduces_the_uninterrupted_run_exactly(cache_base: Path, tmp_path: Path) -> None:
    """Stopped by max_steps mid-epoch, then rerun: the losses equal the uninterrupted run's.
    (tests/test_train_cli.py kills a run between two checkpoints with SIGKILL.)"""
    root = tiny_cache(cache_base, "int8")
    # Drop path draws from the global RNG: its state must be restored too (timm gives the
    # first block rate 0, hence two blocks).
    common = {"deterministic": True, "epochs": 2, "checkpoint_every": 5,
              "student.drop_path_rate": 0.2, "student.depth": 2}
    full = tiny_config(root, tmp_path / "full", max_steps=14, **common)
    reference = read_metrics(Path(Trainer(full, progress="off").fit()["run_dir"]))
    for stop in (7, 14):
        cfg = tiny_config(root, tmp_path / "cut", max_steps=stop, **common)
        summary = Trainer(cfg, progress="off").fit()
    assert summary["resumed_from"] == 7
    resumed = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed if r["kind"] == "train"] == list(range(1, 15))
    for key in ("loss", "loss/dinov2", "loss/mast3r", "loss/multihmr"):
        assert train_losses(resumed, key) == train_losses(reference, key)
    last = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    ref_last = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    for name, value in ref_last["model"].items():
        assert torch.equal(value, last["model"][name]), name


def test_mismatched_caches_are_refused_before_step_zero(cache_base: Path, tmp_path: Path) -> None:
    root = tiny_cache(cache_base, "int8")
    wrong_grid = tiny_config(root, tmp_path / "a", **{"student.img_size": 42})
    with pytest.raises(CacheMismatchError, match=r"grid \(2, 2\).*grid \(3, 3\)"):
        Trainer(wrong_grid, progress="off")
    wrong_sha = tiny_config(root, tmp_path / "b",
                            **{"data.expect_checkpoint_sha256": {"mast3r": "0" * 64}})
    with pytest.raises(CacheMismatchError, match="teacher 'mast3r'.*expects 0000"):
        Trainer(wrong_sha, progress="off")
    # A run folder started on one cache refuses to continue on a cache of other teachers.
    cfg = tiny_config(root, tmp_path / "c", max_steps=2)
    Trainer(cfg, progress="off").fit()
    other = tiny_cache(cache_base, "int8", init_offset=50)
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=str(other / "cache")),
                                max_steps=4)
    with pytest.raises(CacheMismatchError, match="other contents"):
        Trainer(moved, progress="off").fit()
    assert not (tmp_path / "a").exists()  # nothing was written for the refused runs


def poison_targets(trainer: Trainer, *, evaluating: bool, at_step: int | None = None) -> None:
    """Make mast3r's patch targets NaN in the training batches (`evaluating=False`) or in the
    held-out batches (`evaluating=True`), optionally only at trainer step `at_step`.

    Training and evaluation are told apart by the model's mode (evaluation runs it in eval
    mode), not by counting calls, so the poison lands where the test says whatever the number
    of held-out batches."""
    real = trainer.batch_losses.targets

    def poisoned(batch):  # noqa: ANN001, ANN202 - same signature as the real targets
        targets = real(batch)
        in_evaluation = not trainer.model.training
        if in_evaluation == evaluating and at_step in (None, trainer.step):
            targets["mast3r"]["patch"][:] = math.nan
        return targets

    trainer.batch_losses.targets = poisoned


def test_non_finite_loss_names_the_step_and_each_teacher(cache_base: Path, tmp_path: Path) -> None:
    root = tiny_cache(cache_base, "int8")
    trainer = Trainer(tiny_config(root, tmp_path / "run", max_steps=5), progress="off")
    poison_targets(trainer, evaluating=False)  # every training step; the step-0 eval is clean
    with pytest.raises(TrainingError, match=r"step 1: non-finite loss .*mast3r=nan") as info:
        trainer.fit()
    assert "dinov2=" in str(info.value) and "multihmr=" in str(info.value)


def test_non_finite_heldout_values_stop_the_run_naming_the_step(
    cache_base: Path, tmp_path: Path
) -> None:
    root = tiny_cache(cache_base, "int8")
    cfg = tiny_config(root, tmp_path / "run", max_steps=6, eval_every=2, checkpoint_every=2)
    trainer = Trainer(cfg, progress="off")
    poison_targets(trainer, evaluating=True, at_step=4)  # training and other evals are clean
    with pytest.raises(
        TrainingError, match=r"step 4: non-finite held-out loss or cosine .*heldout/loss/mast3r=nan"
    ) as info:
        trainer.fit()
    assert "heldout/cos/mast3r=nan" in str(info.value)
    assert "heldout/loss/dinov2=" in str(info.value) and "heldout/cos/multihmr=" in str(info.value)
    # Nothing non-finite was logged, and the run stopped before saving step 4.
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_own_data_sharing_masks_absent_teachers(cache_base: Path, tmp_path: Path) -> None:
    root = tiny_cache(cache_base, "int8", sharing="own")
    cfg = tiny_config(root, tmp_path / "run", max_steps=6, **{"dropping.strategy": "own_data"})
    rows = Trainer(cfg, progress="off").fit()["rows"]
    losses = train_losses(rows)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # teacher_balanced batches hold every domain, so every teacher reports a loss each step.
    for key in ("loss/dinov2", "loss/mast3r", "loss/multihmr"):
        assert len(train_losses(rows, key)) == 6
