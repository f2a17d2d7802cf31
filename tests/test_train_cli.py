"""`dune-train fit | export` as a user runs them: resume by rerunning, SIGKILL, error lines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.build_fixtures import REPO, subprocess_env
from tests.processes import sigkill_fit_after_step
from tests.test_trainer import cache_base, one_thread, tiny_cache, tiny_config, train_losses
from train.checkpoint import load_checkpoint
from train.cli import main
from train.demo import summarize
from train.dune_format import model_from_dune
from train.export import load_full_model
from train.metrics import read_metrics
from train.trainer import Trainer

__all__ = ["cache_base", "one_thread"]  # fixtures shared with test_trainer.py


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run `dune-train ARGS` in this process; returns the exit code."""
    monkeypatch.setattr(sys, "argv", ["dune-train", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def deterministic_toml(root: Path) -> Path:
    """The tiny train.toml with deterministic = true (it checkpoints every 5 steps)."""
    text = (root / "train.toml").read_text()
    text = text.replace("seed = 0\n", "seed = 0\ndeterministic = true\n", 1)
    path = root / "train_det.toml"
    path.write_text(text)
    return path


def test_fit_resumes_when_rerun_and_overrides_apply(
    cache_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tiny_cache(cache_base, "int8")
    out = tmp_path / "run"
    args = ["fit", str(root / "train.toml"), "--cache", str(root / "cache"), "--out", str(out)]
    assert run_main([*args, "--max-steps", "3"], monkeypatch) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3
    assert run_main([*args, "--max-steps", "6"], monkeypatch) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    stored = json.loads((out / "config.json").read_text())
    assert stored["max_steps"] == 6 and stored["data"]["cache"] == str(root / "cache")
    # Export the run: student (timm) and full model.
    assert run_main(["export", str(out), str(tmp_path / "export")], monkeypatch) == 0
    meta = json.loads((tmp_path / "export" / "student.json").read_text())
    assert meta["architecture"] == "vit_small_patch14_reg4_dinov2" and meta["step"] == 6
    assert (tmp_path / "export" / "full_model.safetensors").is_file()
    # ... and in naver/dune's layout, with a teacher renamed; it reads back with equal outputs.
    teacher = json.loads((out / "teachers.json").read_text())["heads"]
    first = sorted(teacher)[0]
    dune_pth = tmp_path / "dune" / "student.pth"
    assert run_main(["export", str(out), str(dune_pth), "--format", "dune", "--rename",
                     f"{first}=dino2reg_vitlarge_14"], monkeypatch) == 0
    full, from_dune = load_full_model(tmp_path / "export"), model_from_dune(dune_pth)
    images = torch.randn(1, 3, full.student.cfg.img_size, full.student.cfg.img_size)
    with torch.no_grad():
        want, got = full(images), from_dune(images)
    torch.testing.assert_close(got["dino2reg_vitlarge_14"]["patch"], want[first]["patch"])
    assert run_main(["export", str(out), str(tmp_path / "bad"), "--format", "dune",
                     "--rename", "nosuch=x"], monkeypatch) != 0
    # The demo's closing summary reads the cache and the run.
    console = Console(file=io.StringIO(), width=200)
    summarize(root, build_s=1.0, train_s=1.0, console=console, run=out)
    text = console.file.getvalue()
    assert "encoding int8" in text and "6 steps" in text and "DINOv2 /14" in text
    assert f"dune-train fit {root / 'train.toml'}" in text


def test_errors_are_one_line_with_a_hint(
    cache_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_main(["fit", str(tmp_path / "missing.toml")], monkeypatch) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "missing.toml: no such config file" in err[0]
    assert err[1].startswith("hint: ") and len(err) == 2
    # Rerunning a run folder with another config is refused, naming the field.
    root = tiny_cache(cache_base, "int8")
    out = tmp_path / "run"
    assert run_main(["fit", str(root / "train.toml"), "--out", str(out), "--max-steps", "1"],
                    monkeypatch) == 0
    capsys.readouterr()
    other = tmp_path / "other.toml"
    other.write_text((root / "train.toml").read_text().replace("lr = 0.002", "lr = 0.001")
                     .replace('cache = "cache"', f'cache = "{root / "cache"}"'))
    assert run_main(["fit", str(other), "--out", str(out)], monkeypatch) == 1
    err = capsys.readouterr().err
    assert "optim.lr (stored 0.002, now 0.001)" in err and "--out" in err
    assert run_main(["fit"], monkeypatch) == 2  # a usage error stays typer's
    monkeypatch.setenv("DUNE_DEBUG", "1")
    with pytest.raises(Exception, match="another config"):
        run_main(["fit", str(other), "--out", str(out)], monkeypatch)


def test_a_killed_run_resumes_with_the_same_command_and_matches(
    cache_base: Path, tmp_path: Path
) -> None:
    """SIGKILL mid-run (between two checkpoints), rerun the same command: identical losses."""
    root = tiny_cache(cache_base, "int8")
    config = deterministic_toml(root)
    steps = 20
    reference_cfg = tiny_config(root, tmp_path / "reference", deterministic=True,
                                max_steps=steps)
    reference = Trainer(reference_cfg, progress="off").fit()["rows"]

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "train.cli", "fit", str(config), "--out", str(out),
               "--max-steps", str(steps)]
    killed_at = sigkill_fit_after_step(command, out, 12, cwd=REPO, env=subprocess_env(),
                                       timeout=120)
    checkpoint_step = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert checkpoint_step % 5 == 0 and checkpoint_step <= killed_at

    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed if r["kind"] == "train"] == list(range(1, steps + 1))
    for key in ("loss", "loss/dinov2", "loss/mast3r", "loss/multihmr"):
        assert train_losses(resumed, key) == train_losses(reference, key), key
    final = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    expected = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)
