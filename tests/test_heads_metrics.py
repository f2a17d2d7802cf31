"""Head metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import pytest
import torch

from heads.metrics import IGNORE, DepthScore, SegmentationScore, TopK, better


def test_top1_and_top5_count_hits_within_k() -> None:
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # target 0: top-1 hit
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 2: rank 5 -> top-5 hit only
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 0: rank 7 -> miss
        [0.1, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0],  # target 1: hit
    ])
    score = TopK()
    score.update(logits[:2], torch.tensor([0, 2]))
    score.update(logits[2:], torch.tensor([0, 1]))
    assert score.compute() == pytest.approx({"top1": 50.0, "top5": 75.0})


def test_top5_with_fewer_classes_is_top_all() -> None:
    score = TopK()
    score.update(torch.tensor([[0.2, 0.1, 0.0]]), torch.tensor([2]))
    assert score.compute() == {"top1": 0.0, "top5": 100.0}


def test_miou_and_pixel_accuracy_skip_ignored_pixels() -> None:
    pred = torch.tensor([[[0, 0], [1, 1]]])
    target = torch.tensor([[[0, 1], [1, IGNORE]]])
    score = SegmentationScore(num_classes=3)
    score.update(pred, target)
    # class 0: TP 1, FP 1, FN 0 -> 1/2; class 1: TP 1, FP 0, FN 1 -> 1/2; class 2 absent: no IoU
    assert score.compute() == pytest.approx({"miou": 50.0, "pixel_acc": 100 * 2 / 3})
    assert math.isnan(float(score.per_class_iou()[2]))


def test_miou_accumulates_one_confusion_over_batches() -> None:
    score = SegmentationScore(num_classes=2)
    score.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    score.update(torch.tensor([[[1, 1]]]), torch.tensor([[[1, 1]]]))
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 0 -> 2/3
    assert score.compute()["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_depth_rmse_absrel_delta1_over_valid_pixels_per_image() -> None:
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    gt = torch.tensor([[[1.0, 1.0], [3.0, 0.0]]])  # 0 = no depth: not counted
    score = DepthScore(min_depth=1e-3, max_depth=10.0)
    score.update(pred, gt)
    got = score.compute()
    assert got["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert got["abs_rel"] == pytest.approx(1 / 3)
    assert got["delta1"] == pytest.approx(100 * 2 / 3)
    # a second image, perfect: metrics average over images
    score.update(torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 2.0))
    assert score.compute()["rmse"] == pytest.approx(math.sqrt(1 / 3) / 2)


def test_better_knows_each_metrics_direction() -> None:
    assert better("miou", 50.0, 40.0) and not better("miou", 40.0, 50.0)
    assert better("rmse", 0.3, 0.5) and not better("rmse", 0.5, 0.3)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        SegmentationScore(2).update(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))
