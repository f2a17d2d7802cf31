"""`dune-cache transcode`: same index and views, another encoding, resumable, origin recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheMismatchError, ConfigError
from cache_format.reader import open_cache
from cache_format.testing import build_tiny_cache, tiny_teacher
from precompute.cli import app
from precompute.transcode import transcode


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


@pytest.fixture()
def fp16_cache(tmp_path: Path) -> tuple[Path, dict]:
    teachers = [tiny_teacher("t1", dim=32), tiny_teacher("t2", dim=48)]
    written = build_tiny_cache(tmp_path / "src", EncodingSpec("fp16"), teachers=teachers,
                               datasets=(("ds", 6), ("other", 3)))
    return tmp_path / "src", written


def test_fp16_to_int8_keeps_index_and_tokens(fp16_cache: tuple[Path, dict],
                                            tmp_path: Path) -> None:
    src, written = fp16_cache
    report = transcode(str(src), str(tmp_path / "new"), EncodingSpec("int8"))
    assert report.shards_written > 0 and report.shards_skipped == 0
    with open_cache(src) as a, open_cache(tmp_path / "new") as b:
        assert b.encoding.name == "int8" and a.encoding.name == "fp16"
        assert b.manifest.origin == {"transcoded_from": a.location,
                                     "encoding": {"name": "fp16", "codec": "none", "level": 3}}
        assert b.manifest.datasets == a.manifest.datasets
        assert b.manifest.teachers == a.manifest.teachers
        assert b.manifest.build_config == a.manifest.build_config
        for dataset in a.datasets:
            ia, ib = a.index(dataset), b.index(dataset)
            np.testing.assert_array_equal(ia.status, ib.status)
            np.testing.assert_array_equal(ia.view_params, ib.view_params)
            assert ia.keys.tolist() == ib.keys.tolist()
            assert b.teachers_for(dataset) == a.teachers_for(dataset)
            ok = ia.ok
            for teacher in a.teachers_for(dataset):
                assert b.stats_final(dataset, teacher)
                for tok, x in written[(dataset, teacher)].tokens.items():
                    got = b.read_encoded(dataset, np.arange(x.shape[0]), [teacher])[teacher]
                    decoded = got[tok].decode().numpy()[ok]
                    assert _cos(decoded, x[ok]).min() > 0.999
        assert b.verify().problems == ()


def test_fp16_to_int4h_round_trip(fp16_cache: tuple[Path, dict], tmp_path: Path) -> None:
    """A 4-bit target: calibrated like int8, read back as uint8 nibbles with float16 group
    scales, decoded close to the fp16 source, and verified clean."""
    src, written = fp16_cache
    transcode(str(src), str(tmp_path / "new"), EncodingSpec("int4h"))
    with open_cache(tmp_path / "new") as b:
        assert b.encoding.name == "int4h"
        ok = b.index("ds").ok
        for teacher in ("t1", "t2"):
            x = written[("ds", teacher)].tokens["patch"]
            got = b.read_encoded("ds", np.arange(x.shape[0]), [teacher])[teacher]["patch"]
            assert got.values.dtype == torch.uint8 and got.scale.dtype == torch.float16
            assert b.calibration("ds", teacher, "patch") is not None
            assert _cos(got.decode().numpy()[ok], x[ok]).mean() > 0.98
        assert b.verify().problems == ()


def test_transcode_resumes_and_refuses_another_source(fp16_cache: tuple[Path, dict],
                                                      tmp_path: Path) -> None:
    src, _ = fp16_cache
    first = transcode(str(src), str(tmp_path / "new"), EncodingSpec("bf16"))
    again = transcode(str(src), str(tmp_path / "new"), EncodingSpec("bf16"))
    assert again.shards_written == 0 and again.shards_skipped == first.shards_written
    with pytest.raises(CacheMismatchError, match="encoding"):
        transcode(str(src), str(tmp_path / "new"), EncodingSpec("int8"))


def test_a_deleted_shard_is_rewritten_identically(fp16_cache: tuple[Path, dict],
                                                  tmp_path: Path) -> None:
    src, _ = fp16_cache
    transcode(str(src), str(tmp_path / "new"), EncodingSpec("int8"))
    with open_cache(tmp_path / "new") as reader:
        before = reader.read_sample("ds", 0)
    # An interrupted run: the shard's done mark (metadata row) and its data never made it.
    meta = tmp_path / "new" / "datasets" / "ds" / "teachers" / "t1" / "shard_meta" / "c" / "0"
    meta.joinpath("0").unlink()
    again = transcode(str(src), str(tmp_path / "new"), EncodingSpec("int8"))
    assert again.shards_written == 1
    with open_cache(tmp_path / "new") as reader:
        after = reader.read_sample("ds", 0)
        assert reader.verify().problems == ()
    for tok, x in before["t1"].items():
        assert np.array_equal(x.numpy(), after["t1"][tok].numpy())


def test_cli_transcode(fp16_cache: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = fp16_cache
    result = CliRunner().invoke(app, ["transcode", str(src), "--encoding", "int8", "--out",
                                      str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and "written" in result.output
    info = CliRunner().invoke(app, ["info", str(tmp_path / "new")])
    assert info.exit_code == 0 and "int8" in info.output


def test_an_unfinished_source_pair_is_refused(fp16_cache: tuple[Path, dict],
                                              tmp_path: Path) -> None:
    src, _ = fp16_cache
    (src / "datasets" / "ds" / "teachers" / "t2" / "summary" / "c" / "0").unlink()
    with pytest.raises(ConfigError, match="ds/t2 is not complete"):
        transcode(str(src), str(tmp_path / "new"), EncodingSpec("int8"))
    assert not (tmp_path / "new").exists()  # refused before anything was written
