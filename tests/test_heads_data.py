"""Readers on tiny files in the real layouts, bad pairs, and the features cache round trip."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from heads.datasets import BadPairError, OnBad, PairReport, Task
from heads.encoders import load_encoder
from heads.features import FeaturesConfig, extract_features, open_features, preprocess
from heads.metrics import IGNORE
from heads.readers import open_labelled
from heads.synthetic import make_planes_depth


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_ade20k(root: Path, sizes: dict[str, int], bad_size: bool = False) -> None:
    """images/{training,validation}/*.jpg + annotations/.../*.png, labels 0..150."""
    rng = np.random.default_rng(0)
    for split, count in sizes.items():
        for i in range(count):
            stem = f"ADE_{split}_{i:08d}"
            _png(root / "images" / split / f"{stem}.jpg",
                 rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
            ann = np.full((12, 10), i % 151, np.uint8)
            ann[0, 0] = 0  # "other": ignored
            if bad_size and split == "training" and i == 1:
                ann = ann[:8]
            _png(root / "annotations" / split / f"{stem}.png", ann)


def test_ade20k_layout_maps_zero_to_ignore_and_shifts_classes(tmp_path: Path) -> None:
    write_ade20k(tmp_path, {"training": 3, "validation": 2})
    source = open_labelled("auto", str(tmp_path), task=Task.segmentation, report=PairReport())
    assert source.kind == "ade20k" and len(source.classes) == 150
    assert len(source.keys("train")) == 3 and len(source.keys("val")) == 2
    image, mask = source.load("train", 2)
    assert image.shape == (3, 12, 10) and image.dtype == torch.uint8
    assert mask[0, 0] == IGNORE and mask[5, 5] == 1  # label 2 -> class 1


def test_bad_pairs_are_skipped_and_counted_or_raise_naming_both_files(tmp_path: Path) -> None:
    write_ade20k(tmp_path, {"training": 3, "validation": 1}, bad_size=True)
    (tmp_path / "images" / "validation" / "orphan.jpg").write_bytes(
        (tmp_path / "images" / "validation" / "ADE_validation_00000000.jpg").read_bytes())
    report = PairReport()
    source = open_labelled("ade20k", str(tmp_path), task=Task.segmentation, report=report)
    assert len(source.keys("train")) == 2 and len(source.keys("val")) == 1
    reasons = {Path(s.image).name: s.reason for s in report.skipped}
    assert "sizes differ" in reasons["ADE_training_00000001.jpg"]
    assert "label file is missing" in reasons["orphan.jpg"]
    with pytest.raises(BadPairError) as err:
        open_labelled("ade20k", str(tmp_path), task=Task.segmentation,
                      report=PairReport(OnBad.error))
    assert "ADE_training_00000001.jpg" in str(err.value)
    assert "ADE_training_00000001.png" in str(err.value)


def write_nyu(path: Path, n: int, height: int = 6, width: int = 8) -> dict[str, np.ndarray]:
    """The labelled NYU v2 .mat layout: MATLAB H x W x 3 x N, stored by HDF5 as N x 3 x W x H."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (n, height, width, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.0, (n, height, width)).astype(np.float32)
    labels = rng.integers(0, 5, (n, height, width)).astype(np.uint16)
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    return {"images": images, "depths": depths, "labels": labels}


def test_nyu_mat_reader_transposes_back_to_height_width(tmp_path: Path) -> None:
    truth = write_nyu(tmp_path / "nyu.mat", 5)
    (tmp_path / "val.txt").write_text("2\n5\n")
    depth = open_labelled("auto", str(tmp_path / "nyu.mat"), task=Task.depth,
                          report=PairReport(), val_list=str(tmp_path / "val.txt"))
    assert depth.keys("val") == ["2", "5"] and depth.keys("train") == ["1", "3", "4"]
    image, d = depth.load("val", 0)  # image 2 (1-based)
    assert torch.equal(image, torch.from_numpy(truth["images"][1]).permute(2, 0, 1))
    np.testing.assert_array_equal(d, truth["depths"][1])
    seg = open_labelled("nyu-mat", str(tmp_path / "nyu.mat"), task=Task.segmentation,
                        report=PairReport(), val_list=str(tmp_path / "val.txt"))
    _, mask = seg.load("train", 0)
    expected = truth["labels"][0].astype(np.int64) - 1
    expected[expected < 0] = IGNORE
    np.testing.assert_array_equal(mask, expected)
    assert len(seg.classes) == int(truth["labels"].max())


def test_features_round_trip_through_cache_format(tmp_path: Path) -> None:
    data = make_planes_depth(tmp_path / "planes", 6, side=40, seed=3)
    (data / "depth" / "img_0005.png").unlink()  # one image without depth: left out, counted
    encoder = load_encoder("teacher:test_vit_p14")
    cfg = FeaturesConfig(task="depth", data=str(data), grid=3, label_size=20, val_fraction=0.4,
                         samples_per_shard=2)
    info = extract_features(encoder, cfg, tmp_path / "feats")
    assert info["splits"]["train"]["ok"] + info["splits"]["val"]["ok"] == 5
    assert [Path(s["image"]).name for s in info["skipped"]] == ["img_0005.png"]
    feats = open_features(tmp_path / "feats")
    reader = feats.reader
    assert reader.teachers == ["test_vit_p14"] or list(reader.teachers) == ["test_vit_p14"]
    assert reader.manifest.build_config["encoder"]["name"] == "test_vit_p14"
    source = open_labelled("auto", str(data), task=Task.depth, report=PairReport(),
                           val_fraction=0.4)
    for split in ("train", "val"):
        assert reader.index(split).keys_of([0]) == source.keys(split)[:1]
        image, depth = source.load(split, 0)
        x = preprocess(image, (42, 42), encoder.mean, encoder.std)[None]
        want = encoder.forward_tokens(x)
        got = reader.read_sample(split, 0)["test_vit_p14"]
        for tok in ("cls", "patch"):  # fp16 storage
            torch.testing.assert_close(got[tok], want[tok][0], atol=2e-2, rtol=2e-3)
        stored = feats.labels(split)[0]
        assert stored.shape == (20, 20) and stored.min() > 0.9 and stored.max() < 9.1
    mean, std = feats.standardization("patch")
    assert mean.shape == (encoder.dim,) and bool((std > 0).all())


def test_depth_folder_reads_16bit_png_and_npy_and_seg_folder_ignore_index(tmp_path: Path) -> None:
    root = tmp_path / "depth"
    for i, kind in enumerate(("png", "npy", "png", "npy", "png")):
        _png(root / "images" / f"{i}.png", np.zeros((4, 5, 3), np.uint8))
        depth = np.full((4, 5), 1.5 + i, np.float32)
        depth[0, 0] = 0.0
        (root / "depth").mkdir(parents=True, exist_ok=True)
        if kind == "png":
            millimetres = np.rint(depth * 1000).astype(np.uint16)
            Image.fromarray(millimetres).save(root / "depth" / f"{i}.png")
        else:
            np.save(root / "depth" / f"{i}.npy", depth)
    source = open_labelled("depth-folder", str(root), task=Task.depth, report=PairReport(),
                           val_fraction=0.4)
    for split in ("train", "val"):
        for j, key in enumerate(source.keys(split)):
            i = int(Path(key).stem)
            _, depth = source.load(split, j)
            assert depth.dtype == np.float32 and depth[0, 0] == 0.0
            assert depth[1, 1] == pytest.approx(1.5 + i)
    seg = tmp_path / "seg"
    for split in ("train", "val"):
        _png(seg / split / "images" / "a.png", np.zeros((3, 3, 3), np.uint8))
        _png(seg / split / "masks" / "a.png", np.array([[0, 1, 255]] * 3, np.uint8))
    (seg / "classes.txt").write_text("sky\nroad\n")
    source = open_labelled("auto", str(seg), task=Task.segmentation, report=PairReport())
    assert source.kind == "seg-folder" and source.classes == ("sky", "road")
    _, mask = source.load("val", 0)
    assert mask[0].tolist() == [0, 1, IGNORE]


def test_cli_errors_are_one_line_with_a_hint(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from heads.cli import main

    monkeypatch.setattr(sys, "argv", ["dune-heads", "eval", "/nonexistent/run"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: /nonexistent/run: no head_config.json")
    assert err[1].startswith("hint: ")
