"""Anchor assignment and box coding, batched over the images of a batch (no per-image loop).

Assignment (paper 4.1): IoU >= fg_iou_thresh with a ground-truth box makes an anchor foreground,
< bg_iou_thresh background, in between ignored. Box coding is the standard (dx, dy, dw, dh)
parametrisation relative to the anchor, divided by per-coordinate weights.

`Matcher` and `BoxCoder` hold these parameters (plain arguments with the paper's defaults) so that
the criterion, post-processing and diagnostics take one injected object each; the pure functions
they wrap (`batched_iou`, `match_anchors`, `encode_boxes`, `decode_boxes`) stay usable alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

BACKGROUND = -1  # matched index of a background anchor
IGNORED = -2  # matched index of an anchor between the two thresholds
# exp() of a width delta above log(1000 / 16) would make a box 1000/16 times its anchor: clamp it.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def batched_iou(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor) -> Tensor:
    """IoU of every ground-truth box with every anchor.

    gt_boxes: float [B, M, 4] x1y1x2y2; gt_valid: bool [B, M] (False on padding rows);
    anchors: float [N, 4]. Returns float [B, M, N], -1 on padding rows.

    The same arithmetic, in the same order, as torchvision's box_iou (equal to the bit), but with
    each coordinate as its own vector, so that every op is a broadcast of [M, 1] against [N]
    vectorised along N (box_iou's ops on [M, N, 2] corner pairs run along an inner dimension of 2),
    and image by image into the output and two [M, N] scratch planes: fresh [B*M, N] temporaries
    cost more in page faults than in arithmetic. 7 against 24 ms for the bench batch (8 images x 7
    boxes, 68k anchors; one thread).
    """
    b, m, _ = gt_boxes.shape
    dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
    ax1, ay1, ax2, ay2 = anchors.t().to(dtype).contiguous()  # [N] each
    area_a = (ax2 - ax1) * (ay2 - ay1)  # [N]
    iou = gt_boxes.new_empty(b, m, len(area_a), dtype=dtype)
    height, scratch = iou.new_empty(2, m, len(area_a))  # [M, N] each
    for image in range(b):
        gx1, gy1, gx2, gy2 = gt_boxes[image].t().to(dtype).unsqueeze(-1)  # [M, 1] each
        width = _overlap(gx1, gx2, ax1, ax2, iou[image], scratch)
        inter = width.mul_(_overlap(gy1, gy2, ay1, ay2, height, scratch))
        union = torch.add((gx2 - gx1) * (gy2 - gy1), area_a, out=height).sub_(inter)
        inter.div_(union)
    return iou.masked_fill_(~gt_valid[..., None], -1.0)


def _overlap(g1: Tensor, g2: Tensor, a1: Tensor, a2: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """Length of the overlap of intervals [g1, g2] ([M, 1] each) and [a1, a2] ([N] each), >= 0,
    written to out [M, N] (scratch [M, N] is overwritten). Returns out."""
    torch.minimum(g2, a2, out=out)
    return out.sub_(torch.maximum(g1, a1, out=scratch)).clamp_(min=0)


def match_anchors(iou: Tensor, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                  allow_low_quality: bool = True) -> Tensor:
    """Each anchor's ground-truth index, or BACKGROUND (-1) / IGNORED (-2).

    iou: float [B, M, N] from `batched_iou`. Returns int64 [B, N] with values in -2..M-1.
    With `allow_low_quality`, the anchors that reach a ground-truth box's highest IoU (ties
    included, IoU > 0) become foreground even below fg_iou_thresh, matched to the box they
    overlap most (as torchvision's Matcher does), so that no object goes without an anchor.
    """
    best_iou, best_gt = iou.max(dim=1)  # [B, N]
    matched = best_gt.masked_fill(best_iou < fg_iou_thresh, IGNORED)
    matched.masked_fill_(best_iou < bg_iou_thresh, BACKGROUND)
    if allow_low_quality:
        best_per_gt = iou.amax(dim=2, keepdim=True)  # [B, M, 1]
        # A box that overlaps nothing (0) or a padding row (-1) has no best anchor: compared as +inf,
        # its row matches no IoU, one [B, M, 1] op instead of a mask over [B, M, N].
        best_per_gt.masked_fill_(best_per_gt <= 0, float("inf"))
        low_quality = (iou == best_per_gt).any(dim=1)  # [B, N]
        matched = torch.where(low_quality, best_gt, matched)
    return matched


def encode_boxes(gt_boxes: Tensor, anchors: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets of `gt_boxes` relative to `anchors`.

    gt_boxes, anchors: float [..., 4] x1y1x2y2 (broadcastable). Returns [..., 4] (dx, dy, dw, dh):
    wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * log(gw / aw), wh * log(gh / ah).
    """
    wx, wy, ww, wh = weights
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    gw, gh = gt_boxes[..., 2] - gt_boxes[..., 0], gt_boxes[..., 3] - gt_boxes[..., 1]
    gx, gy = gt_boxes[..., 0] + 0.5 * gw, gt_boxes[..., 1] + 0.5 * gh
    return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                        ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=-1)


def decode_boxes(deltas: Tensor, anchors: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Inverse of `encode_boxes`: deltas [..., 4] on anchors [..., 4] -> boxes [..., 4] x1y1x2y2."""
    wx, wy, ww, wh = weights
    anchors = anchors.to(deltas.dtype)
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    cx = deltas[..., 0] / wx * aw + ax
    cy = deltas[..., 1] / wy * ah + ay
    half_w = 0.5 * torch.exp((deltas[..., 2] / ww).clamp(max=MAX_LOG_SCALE)) * aw
    half_h = 0.5 * torch.exp((deltas[..., 3] / wh).clamp(max=MAX_LOG_SCALE)) * ah
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


class Matcher:
    """Callable: padded ground truth and anchors -> each anchor's ground-truth index (`match_anchors`).

    fg_iou_thresh 0.5 and bg_iou_thresh 0.4 are the paper's (4.1); `allow_low_quality` keeps each
    box's best anchor(s) as Detectron and torchvision do for RetinaNet.
    """

    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, allow_low_quality: bool = True):
        if bg_iou_thresh > fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh {bg_iou_thresh} must be <= fg_iou_thresh {fg_iou_thresh}")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality = allow_low_quality

    @torch.no_grad()
    def __call__(self, gt_boxes: Tensor, gt_labels: Tensor, anchors: Tensor) -> Tensor:
        """gt_boxes float [B, M, 4] x1y1x2y2, gt_labels int64 [B, M] (-1 = padding row), anchors
        float [N, 4]. Returns int64 [B, N]: 0..M-1 (foreground), BACKGROUND (-1) or IGNORED (-2)."""
        iou = batched_iou(gt_boxes, gt_labels >= 0, anchors)
        return match_anchors(iou, self.fg_iou_thresh, self.bg_iou_thresh, self.allow_low_quality)

    def __repr__(self) -> str:
        return (f"Matcher(fg_iou_thresh={self.fg_iou_thresh}, bg_iou_thresh={self.bg_iou_thresh}, "
                f"allow_low_quality={self.allow_low_quality})")


class BoxCoder:
    """`encode_boxes` / `decode_boxes` with fixed per-coordinate weights (wx, wy, ww, wh).

    Unit weights are RetinaNet's in Detectron and torchvision; (10, 10, 5, 5) is Faster R-CNN's.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
        if len(weights) != 4:
            raise ValueError(f"box coder weights: expected 4 numbers (wx, wy, ww, wh), got {list(weights)}")
        self.weights = tuple(weights)

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """gt_boxes, anchors float [..., 4] x1y1x2y2 (broadcastable) -> deltas [..., 4]."""
        return encode_boxes(gt_boxes, anchors, self.weights)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas [..., 4] on anchors [..., 4] -> boxes [..., 4] x1y1x2y2, in the deltas' dtype."""
        return decode_boxes(deltas, anchors, self.weights)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights})"
