"""Task metrics of frozen-encoder heads: top-k accuracy, mIoU / pixel accuracy, depth errors.

Every metric is an accumulator fed batch by batch (`update`) and read once (`compute`), so
evaluation never holds a whole split's predictions. Conventions follow the DINOv2 protocols:
- segmentation: one confusion matrix over every labelled pixel of the split (pixels whose label
  is `IGNORE` do not count); IoU per class = TP / (TP + FP + FN); mIoU averages the classes that
  occur in the labels or the predictions (a class absent from both has no IoU);
- depth: errors over the valid pixels of each image (ground truth inside (min_depth,
  max_depth]), computed per image and averaged over images, as the NYUd protocol does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE = -1  # label value of pixels that do not count (stored labels use it too)
# Which way each reported metric is better: the lr grid keeps the best on validation by it.
HIGHER_IS_BETTER = {
    "top1": True, "top5": True, "miou": True, "pixel_acc": True,
    "rmse": False, "abs_rel": False, "delta1": True,
}


@dataclass
class TopK:
    """Top-1 and top-5 accuracy (k is clipped to the number of classes), in percent."""

    ks: tuple[int, ...] = (1, 5)
    correct: dict[int, int] = field(default_factory=dict)
    total: int = 0

    def update(self, logits: Tensor, target: Tensor) -> None:
        """`logits` [B, C], `target` [B] class indices."""
        k_max = min(max(self.ks), logits.shape[1])
        top = logits.topk(k_max, dim=1).indices  # [B, k_max], best first
        hit = top == target[:, None]
        for k in self.ks:
            self.correct[k] = self.correct.get(k, 0) + int(hit[:, : min(k, k_max)].any(1).sum())
        self.total += int(target.shape[0])

    def compute(self) -> dict[str, float]:
        return {f"top{k}": 100.0 * self.correct.get(k, 0) / max(self.total, 1) for k in self.ks}


@dataclass
class SegmentationScore:
    """mIoU and pixel accuracy (percent) from a confusion matrix over labelled pixels."""

    num_classes: int
    confusion: Tensor | None = None

    def update(self, pred: Tensor, target: Tensor) -> None:
        """`pred` and `target` [B, H, W] class indices; target == IGNORE does not count."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} "
                             "differ in shape; upsample the logits to the label size first")
        keep = target != IGNORE
        c = self.num_classes
        pairs = target[keep].long() * c + pred[keep].long()
        counts = torch.bincount(pairs.cpu(), minlength=c * c).reshape(c, c)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def per_class_iou(self) -> Tensor:
        """IoU per class (NaN for a class absent from both labels and predictions)."""
        conf = self.confusion if self.confusion is not None else torch.zeros(1, 1)
        conf = conf.double()
        tp = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def compute(self) -> dict[str, float]:
        conf = self.confusion if self.confusion is not None else torch.zeros(1, 1)
        iou = self.per_class_iou()
        labelled = float(conf.sum())
        return {
            "miou": 100.0 * float(iou.nanmean()) if bool((~iou.isnan()).any()) else 0.0,
            "pixel_acc": 100.0 * float(conf.diagonal().sum()) / max(labelled, 1.0),
        }


@dataclass
class DepthScore:
    """RMSE (metres), AbsRel and delta1 (percent of pixels with max(p/g, g/p) < 1.25)."""

    min_depth: float = 1e-3
    max_depth: float = 10.0
    sums: dict[str, float] = field(default_factory=lambda: {"rmse": 0.0, "abs_rel": 0.0,
                                                             "delta1": 0.0})
    images: int = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        """`pred` and `target` [B, H, W] depths in metres; target outside the range is invalid."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} "
                             "differ in shape")
        pred = pred.double().clamp(min=self.min_depth, max=self.max_depth)
        target = target.double()
        for p, g in zip(pred, target, strict=True):
            valid = (g > self.min_depth) & (g <= self.max_depth)
            if not bool(valid.any()):
                continue  # an image without valid depth says nothing
            p, g = p[valid], g[valid]
            self.sums["rmse"] += float(((p - g) ** 2).mean().sqrt())
            self.sums["abs_rel"] += float(((p - g).abs() / g).mean())
            self.sums["delta1"] += 100.0 * float((torch.maximum(p / g, g / p) < 1.25).double()
                                                 .mean())
            self.images += 1

    def compute(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {name: value / n for name, value in self.sums.items()}


def better(metric: str, a: float, b: float) -> bool:
    """Whether value `a` of `metric` is strictly better than `b`."""
    return a > b if HIGHER_IS_BETTER[metric] else a < b
