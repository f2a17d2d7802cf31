"""The heads step of `make demo` on a tiny trained run: table, JSON / markdown, PCA pictures."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from rich.console import Console

from heads.demo import HeadsDemoSizes, run
from tests.test_trainer import cache_base, tiny_cache, tiny_config
from train.trainer import Trainer

__all__ = ["cache_base"]  # fixture shared with test_trainer.py

TINY_HEADS = HeadsDemoSizes(seg_images=10, cls_train=6, cls_val=6, label_size=14, epochs=2,
                            pca_images=2, panel=32)


def test_demo_heads_step_compares_student_and_teachers(cache_base: Path, tmp_path: Path) -> None:
    built = tiny_cache(cache_base, "int8")
    shutil.copy(built / "cache.toml", tmp_path / "cache.toml")
    (tmp_path / "cache").symlink_to(built / "cache")
    Trainer(tiny_config(built, tmp_path / "train", max_steps=3), progress="off").fit()
    out = io.StringIO()
    result = run(tmp_path, Console(file=out, width=200), TINY_HEADS)
    text = out.getvalue()
    table = json.loads((tmp_path / "heads" / "compare.json").read_text())
    encoders = [r["encoder"] for r in table["rows"]]
    assert encoders == ["student", "student-dinov2", "dinov2", "mast3r", "multihmr"]
    assert any(c.startswith("segmentation") for c in table["columns"])
    assert any(c.startswith("classification") for c in table["columns"])
    assert (tmp_path / "heads" / "compare.md").read_text().count("\n| ") >= 6
    assert len(result["pictures"]) == 2 and all(p.is_file() for p in result["pictures"])
    assert "student-dinov2" in text and str(result["pictures"][0]) in text.replace("\n", "")
