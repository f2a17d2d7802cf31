"""`dune-train eval RUN [--cache CACHE | --online]`: one ruler for every student.

One tiny run trained from the fp16 tiny cache (tests/test_trainer.py's session caches) is scored
against its own cache, the int8 cache stage one built from the same images and teachers, and the
teachers online; caches that do not hold its held-out views are refused, naming what differs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cache_format.errors import CacheMismatchError
from cache_format.reader import open_cache
from tests.test_train_cli import run_main
from tests.test_trainer import cache_base, one_thread, tiny_cache, tiny_config
from train.export import TEACHERS_FILE
from train.metrics import read_metrics
from train.run_eval import check_heldout, eval_run, heldout_differences
from train.trainer import Trainer

__all__ = ["cache_base", "one_thread"]  # fixtures shared with test_trainer.py

STEPS = 10


@pytest.fixture(scope="module")
def run(cache_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-step run from the fp16 tiny cache, evaluated on its held-out views at its end."""
    root = tiny_cache(cache_base, "fp16")
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = tiny_config(root, out, max_steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS)
    Trainer(cfg, progress="off").fit()
    return out


def _last_logged(run: Path) -> dict[str, float]:
    rows = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert rows[-1]["step"] == STEPS
    return {k: v for k, v in rows[-1].items() if k.startswith("heldout/")}


def test_eval_against_its_own_cache_is_what_the_fit_logged(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["eval", str(run)], monkeypatch) == 0
    printed = capsys.readouterr().out
    written = sorted((run / "eval").glob("last-cache-fp16-*.json"))
    assert len(written) == 1 and str(written[0].name) in printed.replace("\n", "")
    result = json.loads(written[0].read_text())
    assert result["step"] == STEPS and result["source"] == "cache"
    assert result["encoding"]["name"] == "fp16" and result["checkpoint"].endswith("last.pt")
    logged = _last_logged(run)
    assert set(result["metrics"]) == set(logged)
    for key, value in logged.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    # The best checkpoint is the step-10 one here (the only evaluation after step 0).
    best = eval_run(run, which="best")
    assert Path(best.path).name.startswith("best-") and best.checkpoint.endswith("best.pt")
    assert best.metrics == pytest.approx(result["metrics"], rel=1e-6)


def test_other_encodings_and_online_score_the_same_student_on_one_ruler(
    run: Path, cache_base: Path
) -> None:
    """int8 targets move the numbers a little; online (exact float32 teachers) equals the fp16
    cache within fp16's rounding, and sits closer to it than int8 does."""
    fp16 = eval_run(run).metrics
    int8_cache = tiny_cache(cache_base, "int8") / "cache"
    int8 = eval_run(run, cache=str(int8_cache)).metrics
    online = eval_run(run, online=True).metrics
    assert (run / "eval" / "last-online.json").is_file()
    assert int8["heldout/samples"] == fp16["heldout/samples"] == online["heldout/samples"] > 0
    teachers = [k.removeprefix("heldout/loss/") for k in fp16 if k.startswith("heldout/loss/")]
    for t in teachers:
        loss, cos = f"heldout/loss/{t}", f"heldout/cos/{t}"
        assert online[loss] == pytest.approx(fp16[loss], rel=1e-3)
        assert online[cos] == pytest.approx(fp16[cos], abs=1e-3)
        assert int8[loss] != fp16[loss] and int8[loss] == pytest.approx(fp16[loss], rel=0.05)
        assert int8[cos] == pytest.approx(fp16[cos], abs=0.02)
    total = "heldout/loss"
    assert abs(online[total] - fp16[total]) < abs(online[total] - int8[total])


def test_a_cache_without_the_runs_heldout_views_is_refused_naming_what_differs(
    run: Path, cache_base: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stored = json.loads((run / TEACHERS_FILE).read_text())
    manifest = open_cache(tiny_cache(cache_base, "fp16") / "cache").manifest
    assert heldout_differences(stored, manifest) == []
    dino = next(iter(manifest.teachers))
    views = dataclasses.replace(manifest.replay.views, flip_p=0.0)
    changed = dataclasses.replace(
        manifest, seed=manifest.seed + 1,
        replay=dataclasses.replace(manifest.replay, seed=manifest.seed + 1, views=views),
        datasets={name: dataclasses.replace(fp, num_images=fp.num_images + 1)
                  for name, fp in manifest.datasets.items()},
        teachers={t: fp for t, fp in manifest.teachers.items() if t != dino},
        assignment={t: d for t, d in manifest.assignment.items() if t != dino},
    )
    kinds = {what for what, _ in heldout_differences(stored, changed)}
    assert kinds == {"other held-out images and views (the split and view seed)", "other views",
                     "other held-out images", "missing teacher"}
    with pytest.raises(CacheMismatchError, match="replay.views.flip_p") as info:
        check_heldout(stored, changed, "elsewhere", run, "the-run-cache")
    assert f"teachers.{dino}" in str(info.value) and "dune-cache transcode" in info.value.hint
    # As a user meets it: a cache of other teacher weights, one error line and a hint.
    other = tiny_cache(cache_base, "int8", init_offset=50) / "cache"
    assert run_main(["eval", str(run), "--cache", str(other)], monkeypatch) == 1
    err = capsys.readouterr().err
    assert "other teacher: cache manifest field teachers." in err and "checkpoint_sha256" in err
    assert "hint: " in err and "--online" in err
    assert run_main(["eval", str(run), "--cache", str(other), "--online"], monkeypatch) == 1
    assert "pick one target source" in capsys.readouterr().err
