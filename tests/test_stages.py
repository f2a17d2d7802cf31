"""Resolution stages, batch naming and resume on another number of processes.

Two tiny caches of the same images at grids 2 and 3 (student inputs 28 and 42 px) stand in for
DUNE's 336 and 448 px stages.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from cache_format.errors import ConfigError
from tests.build_fixtures import REPO, subprocess_env
from tests.processes import sigkill_fit_after_step
from tests.test_trainer import cache_base, one_thread, tiny_cache, tiny_config, train_losses
from train.checkpoint import latest_stage_dir, load_checkpoint
from train.config import TrainConfig, load_train_config, resolve_paths
from train.export import export_run
from train.metrics import read_metrics
from train.stages import fit_run
from train.trainer import Trainer

__all__ = ["cache_base", "one_thread"]  # fixtures shared with test_trainer.py


def two_stage_toml(cache_base: Path, path: Path, **top: Any) -> Path:
    """The tiny train.toml with two stages: grid 2 (28 px) then grid 3 (42 px, lower lr)."""
    small, large = tiny_cache(cache_base, "int8"), tiny_cache(cache_base, "int8", grid=3)
    data = tomllib.loads((small / "train.toml").read_text())
    data["data"].pop("cache")
    data.update(deterministic=True, checkpoint_every=3, epochs=1,
                out_dir=str(path.parent / path.stem), **top)
    data["stages"] = [
        {"name": "g2", "cache": str(small / "cache"), "img_size": 28},
        {"name": "g3", "cache": str(large / "cache"), "img_size": 42, "lr": 1e-3,
         "overrides": {"optim.warmup_fraction": 0.0}},
    ]
    path.write_text(tomli_w.dumps(data))
    return path


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A finished run of `two_stage_toml`: its resolved config (out_dir = the run folder) and
    what `fit_run` returned."""

    cfg: TrainConfig
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def two_stage_run(cache_base: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """The uninterrupted two-stage run, trained once for the tests that check it or compare
    with it (each run costs both stages). Tests only read its folder; one that reruns it works
    on a copy. It draws its loss curves (a module fixture is set up before the function-scoped
    switch of tests/conftest.py that turns them off)."""
    config = two_stage_toml(cache_base, tmp_path_factory.mktemp("two-stage") / "reference.toml")
    cfg = resolve_paths(load_train_config(config), config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every test here (one_thread) and in the CLI runs it meets
    try:
        return FinishedRun(cfg, fit_run(cfg, progress="off"))
    finally:
        torch.set_num_threads(threads)


def test_two_stages_run_in_order_and_carry_the_student_over(
    two_stage_run: FinishedRun, tmp_path: Path
) -> None:
    cfg, summary = two_stage_run.cfg, two_stage_run.summary
    stage_cfgs = cfg.stage_configs()
    assert [c.student.img_size for c in stage_cfgs] == [28, 42]
    assert [c.optim.lr for c in stage_cfgs] == [cfg.optim.lr, 1e-3]
    assert stage_cfgs[1].optim.warmup_fraction == 0.0 and stage_cfgs[1].seed == cfg.seed + 1
    run = Path(cfg.out_dir)
    for stage in ("00-g2", "01-g3"):
        for name in ("config.json", "sizes.json", "metrics.jsonl", "checkpoints/last.pt",
                     "stage_done.json"):
            assert (run / "stages" / stage / name).is_file(), (stage, name)
    assert (run / "stages.json").is_file() and (run / "metrics.jsonl").is_file()
    merged = read_metrics(run)
    train_steps = [r["step"] for r in merged if r["kind"] == "train"]
    assert train_steps == list(range(1, 21)) and summary["step"] == 20
    assert {r["stage"] for r in merged} == {"g2", "g3"}
    assert any(p.suffix == ".png" for p in (run / "curves").iterdir())
    # Stage 2 started from stage 1's weights: its first held-out loss (step 0, before any
    # step) is far below stage 1's untrained one.
    evals = [r for r in merged if r["kind"] == "eval"]
    g2_start = next(r for r in evals if r["stage"] == "g2")["heldout/loss"]
    g3_start = next(r for r in evals if r["stage"] == "g3")["heldout/loss"]
    assert g3_start < 0.9 * g2_start
    first = load_checkpoint(run / "stages" / "00-g2" / "checkpoints" / "last.pt")["model"]
    second = load_checkpoint(run / "stages" / "01-g3" / "checkpoints" / "last.pt")["model"]
    assert first["student.vit.pos_embed"].shape[1] == 4
    assert second["student.vit.pos_embed"].shape[1] == 9
    # The optimizer restarted: stage 2's schedule is its own (no warmup: its peak at once).
    g3_lrs = [r["lr"] for r in merged if r["kind"] == "train" and r["stage"] == "g3"]
    assert g3_lrs[0] == pytest.approx(stage_cfgs[1].base_lr(1)) and g3_lrs[-1] < g3_lrs[0]
    # Rerunning the finished run trains nothing more (on a copy: the run is shared).
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    again = fit_run(dataclasses.replace(cfg, out_dir=str(copy)), progress="off")
    assert again["step"] == 20 and len(read_metrics(copy)) == len(merged)
    assert latest_stage_dir(copy) == copy / "stages" / "01-g3"
    # `dune-train export RUN` on the staged run folder exports the last stage's student.
    paths = export_run(run, tmp_path / "export")
    assert load_file(paths["student_weights"])["pos_embed"].shape[1] == 9


def test_max_steps_counts_over_the_stages_and_a_rerun_continues(
    two_stage_run: FinishedRun, tmp_path: Path
) -> None:
    cfg, reference = two_stage_run.cfg, two_stage_run.summary["rows"]
    out = tmp_path / "stopped"
    for stop in (5, 12, None):
        summary = fit_run(dataclasses.replace(cfg, out_dir=str(out), max_steps=stop),
                          progress="off")
        assert summary["step"] == (stop or 20)
        if stop == 5:
            assert not (out / "stages" / "01-g3").exists()
            assert latest_stage_dir(out) == out / "stages" / "00-g2"
    rows = read_metrics(out)
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 21))
    assert train_losses(rows) == train_losses(reference)
    changed = dataclasses.replace(cfg, out_dir=str(out), stages=(
        cfg.stages[0], dataclasses.replace(cfg.stages[1], lr=2e-3)))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.lr \(stored 0\.001, now 0\.002\)"):
        fit_run(changed, progress="off")


def test_a_kill_in_the_second_stage_resumes_bit_exactly(
    two_stage_run: FinishedRun, cache_base: Path, tmp_path: Path
) -> None:
    reference = Path(two_stage_run.cfg.out_dir)

    config = two_stage_toml(cache_base, tmp_path / "killed.toml")
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "train.cli", "fit", str(config), "--out", str(out)]
    second = out / "stages" / "01-g3"
    killed_at = sigkill_fit_after_step(command, second, 5, cwd=REPO, env=subprocess_env(),
                                       timeout=240)
    assert not (second / "stage_done.json").exists()
    assert load_checkpoint(second / "checkpoints" / "last.pt")["step"] <= killed_at

    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    resumed, expected = read_metrics(out), read_metrics(reference)
    assert [r["step"] for r in resumed if r["kind"] == "train"] == list(range(1, 21))
    for key in ("loss", "loss/dinov2", "loss/mast3r", "loss/multihmr"):
        assert train_losses(resumed, key) == train_losses(expected, key), key
    for stage in ("00-g2", "01-g3"):
        final = load_checkpoint(out / "stages" / stage / "checkpoints" / "last.pt")["model"]
        ref = load_checkpoint(reference / "stages" / stage / "checkpoints" / "last.pt")["model"]
        assert all(torch.equal(final[k], ref[k]) for k in ref), stage


def test_resume_on_one_process_after_two_reads_the_rest_of_the_epoch(
    cache_base: Path, tmp_path: Path
) -> None:
    """A 2-process run stopped at step 4 continues on 1 process: the samples it reads are the
    epoch's global order from position 4 x 8 on, none repeated or skipped; its losses match an
    uninterrupted 1-process run closely (bit-exactness is only promised at the same world size)."""
    root = tiny_cache(cache_base, "int8")
    config = tmp_path / "train.toml"
    config.write_text((root / "train.toml").read_text()
                      .replace('cache = "cache"', f'cache = "{root / "cache"}"'))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "-m", "train.cli", "fit", str(config), "--out", str(out), "--max-steps", "4"]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["world_size"] == 2 and saved["sampler"]["global_start"] == 32

    trainer = Trainer(tiny_config(root, out, max_steps=10), progress="off")
    seen: list[int] = []
    make_loader = trainer.make_loader

    def recording_loader():  # noqa: ANN202 - wraps the sampler the loader reads
        loader = make_loader()
        sampler = loader.sampler

        class Recording(torch.utils.data.Sampler[int]):
            def __iter__(self):  # noqa: ANN204
                for index in sampler:
                    seen.append(index)
                    yield index

            def __len__(self) -> int:
                return len(sampler)

        return torch.utils.data.DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=Recording(),
            collate_fn=loader.collate_fn, drop_last=True)

    trainer.make_loader = recording_loader  # type: ignore[method-assign]
    summary = trainer.fit()
    assert summary["resumed_from"] == 4 and summary["step"] == 10
    sequence = trainer.ctx.sampler.global_sequence(0)
    assert seen == sequence[32:80].tolist()

    single = Trainer(tiny_config(root, tmp_path / "one", max_steps=10), progress="off").fit()
    resumed = read_metrics(out)
    for key in ("loss", "loss/dinov2"):
        one, two = train_losses(single["rows"], key), train_losses(resumed, key)
        assert len(two) == 10
        assert two == pytest.approx(one, rel=1e-4, abs=1e-6), key


# -- batch and epoch names -----------------------------------------------------------------------
def test_the_batch_is_given_once_per_device_or_global() -> None:
    assert TrainConfig().global_batch(4) == 128  # nothing given: 128 global
    assert TrainConfig(batch_size=64).global_batch(4) == 64  # the old key reads as global
    assert TrainConfig(batch_size_global=64).global_batch(4) == 64
    assert TrainConfig(batch_size_per_device=128).global_batch(4) == 512
    assert TrainConfig(batch_size_per_device=128).base_lr(4) == pytest.approx(3e-4 * 2)
    with pytest.raises(ConfigError, match="batch_size_global and batch_size_per_device"):
        TrainConfig(batch_size_global=64, batch_size_per_device=8)
    with pytest.raises(ConfigError, match="batch_size_global and batch_size: both set"):
        TrainConfig(batch_size_global=64, batch_size=64)
    with pytest.raises(ConfigError, match="batch_size_per_device: expected a positive"):
        TrainConfig(batch_size_per_device=0)
    assert TrainConfig(epoch_size="imagenet-1k").epoch_samples() == 1_281_167
    with pytest.raises(ConfigError, match="epoch_size"):
        TrainConfig.from_dict({"epoch_size": "imagenet"})


def test_a_run_stores_and_prints_its_sizes(
    cache_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tiny_cache(cache_base, "int8")
    cfg = tiny_config(root, tmp_path / "run", max_steps=1)
    Trainer(cfg, progress="lines").fit()
    sizes = json.loads((tmp_path / "run" / "sizes.json").read_text())
    assert sizes == {"world_size": 1, "batch_size_global": 8, "batch_size_per_device": 8,
                     "steps_per_epoch": 10, "images_per_epoch": 80, "epochs": 2,
                     "steps_total": 20, "images_total": 160}
    out = capsys.readouterr().out
    assert "batch 8 per device x 1 process(es) = 8 global; epoch 80 images" in out
    assert "run 2 epochs = 160 images" in out


# -- stage entries are checked like every other field -------------------------------------------
@pytest.mark.parametrize(("stage", "message"), [
    ({"name": "b", "lr": "fast"}, r"stages\[1\]\.lr: expected a number"),
    ({"name": "b", "lr": -1.0}, r"stages\[1\]\.lr: expected a number > 0"),
    ({"name": "b", "epochs": 0}, r"stages\[1\]\.epochs: expected a positive integer"),
    ({"name": "b", "speed": 1}, r"stages\[1\]: unknown field\(s\) speed"),
    ({"lr": 1.0}, r"stages\[1\]\.name: required"),
    ({"name": "b/c"}, r"stages\[1\]\.name: expected a name of 1-64 letters"),
    ({"name": "a"}, r"stages: names repeat"),
    ({"name": "b", "overrides": {"optim.lr": "x"}}, r"stages\[1\]\.overrides\.optim\.lr"),
    ({"name": "b", "overrides": {"optim.speed": 1}}, r"stages\[1\]\.overrides: .*'speed'"),
    ({"name": "b", "overrides": {"student.depth": 2}}, r"stages\[1\]\.overrides\.student\.depth"),
])
def test_a_bad_stage_entry_names_its_field(stage: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"stages": [{"name": "a"}, stage]})


def test_init_from_carries_batch_mode_norm_statistics_and_restarts_their_schedule(
    tmp_path: Path,
) -> None:
    from train.checkpoint import save_atomic
    from train.init_from import init_model_from
    from train.model import DistillModel, TeacherHead

    heads = {"dino": TeacherHead(dim=8, has_cls=True)}
    cfg = TrainConfig.from_dict({"student": {"arch": "vit_small_patch14_reg4_dinov2",
                                             "img_size": 28, "embed_dim": 32, "depth": 1,
                                             "num_heads": 2}, "norm": {"mode": "batch"}})
    old = DistillModel(cfg, heads, total_steps=10)
    old.train()
    for _ in range(3):  # three batch-mode updates move the running statistics
        old.norms["dino"]["patch"](torch.randn(4, 5, 8) * 3 + 1)
    save_atomic({"model": old.state_dict()}, tmp_path / "last.pt")
    for norms, carried in ((True, True), (False, False)):
        new = DistillModel(cfg, heads, total_steps=10)
        init_model_from(new, str(tmp_path / "last.pt"), norms=norms)
        norm, before = new.norms["dino"]["patch"], old.norms["dino"]["patch"]
        assert torch.equal(norm.mean, before.mean) is carried
        assert torch.equal(norm.std, before.std) is carried
        assert int(norm.steps_seen) == 0 and int(before.steps_seen) == 3
