"""Anchor assignment and box coding, batched over the images of a batch (no per-image loop).

Assignment (paper 4.1): IoU >= fg_iou_thresh with a ground-truth box makes an anchor foreground,
< bg_iou_thresh background, in between ignored. Box coding is the standard (dx, dy, dw, dh)
parametrisation relative to the anchor, divided by per-coordinate weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

BACKGROUND = -1  # matched index of a background anchor
IGNORED = -2  # matched index of an anchor between the two thresholds
# exp() of a width delta above log(1000 / 16) would make a box 1000/16 times its anchor: clamp it.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def batched_iou(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor) -> Tensor:
    """IoU of every ground-truth box with every anchor.

    gt_boxes: float [B, M, 4] x1y1x2y2; gt_valid: bool [B, M] (False on padding rows);
    anchors: float [N, 4]. Returns float [B, M, N], -1 on padding rows.
    """
    b, m, _ = gt_boxes.shape
    iou = box_iou(gt_boxes.reshape(b * m, 4), anchors).view(b, m, -1)
    return iou.masked_fill_(~gt_valid[..., None], -1.0)


def match_anchors(iou: Tensor, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                  allow_low_quality: bool = True) -> Tensor:
    """Each anchor's ground-truth index, or BACKGROUND (-1) / IGNORED (-2).

    iou: float [B, M, N] from `batched_iou`. Returns int64 [B, N] with values in -2..M-1.
    With `allow_low_quality`, the anchors that reach a ground-truth box's highest IoU (ties
    included, IoU > 0) become foreground even below fg_iou_thresh, matched to the box they
    overlap most (as torchvision's Matcher does), so that no object goes without an anchor.
    """
    best_iou, best_gt = iou.max(dim=1)  # [B, N]
    matched = best_gt.clone()
    matched[best_iou < fg_iou_thresh] = IGNORED
    matched[best_iou < bg_iou_thresh] = BACKGROUND
    if allow_low_quality:
        best_per_gt = iou.amax(dim=2, keepdim=True)  # [B, M, 1]
        is_best = (iou == best_per_gt) & (best_per_gt > 0)  # [B, M, N]
        low_quality = is_best.any(dim=1)  # [B, N]
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
