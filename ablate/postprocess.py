"""Inference post-processing (paper 4.1), batched over images: per level keep the top-k scores
above the threshold, decode, merge levels, class-wise NMS, keep the best detections per image.

`postprocess` is the pure function; `Postprocess` holds its parameters (the paper's defaults and an
injected box coder) for the engine to call."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from ablate.losses import per_image_rank
from ablate.matching import BoxCoder


def top_candidates(cls_logits: Tensor, num_per_level: Sequence[int], topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `topk` highest class scores of each level of each image.

    cls_logits: [B, N, K]. Returns (scores [B, C] sigmoid probabilities, anchor index [B, C] into N,
    label [B, C]), C = sum over levels of min(topk, N_l * K). Taking the top-k of all scores and then
    thresholding keeps the same set as thresholding first, without a per-image loop.

    Two stages, for speed: the top-k (anchor, class) pairs all lie on the top-k anchors ranked by
    their best class (an anchor holding a top pair has its best score above the k-th pair's, and at
    most k anchors can), so the full top-k runs on k x K scores instead of N_l x K.
    """
    b, _, k = cls_logits.shape
    scores, anchor_idx, labels = [], [], []
    start = 0
    for n in num_per_level:
        level = cls_logits[:, start:start + n]  # [B, n, K]
        count = min(topk, n * k)
        if count < n:  # stage 1: the anchors that can hold a top pair
            _, anchors = level.amax(dim=2).topk(count, dim=1)  # [B, count]
            level = level.gather(1, anchors[..., None].expand(-1, -1, k))  # [B, count, K]
        else:
            anchors = torch.arange(n, device=level.device).expand(b, n)
        top, idx = level.reshape(b, -1).topk(count, dim=1)
        scores.append(torch.sigmoid(top.float()))
        anchor_idx.append(anchors.gather(1, idx // k) + start)
        labels.append(idx % k)
        start += n
    return torch.cat(scores, 1), torch.cat(anchor_idx, 1), torch.cat(labels, 1)


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float) -> Tensor:
    """NMS within each group (image x class): indices kept, by decreasing score.

    Same result as torchvision.ops.batched_nms. Its CPU path scans the whole group-id tensor once per
    group (640 scans for 8 images x 80 classes); here one sort lays the groups out contiguously.
    """
    if boxes.device.type != "cpu" or len(boxes) == 0:
        return batched_nms(boxes, scores, groups, iou_thresh)
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups[order]).tolist()
    kept, start = [], 0
    for count in counts:
        if count:
            seg = order[start:start + count]
            kept.append(seg[nms(boxes[seg], scores[seg], iou_thresh)])
            start += count
    keep = torch.cat(kept)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def clip_to_images(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """boxes [B, C, 4] clipped to each image's (h, w) in image_sizes [B, 2]."""
    h = image_sizes[:, 0].to(boxes.dtype)[:, None, None]
    w = image_sizes[:, 1].to(boxes.dtype)[:, None, None]
    upper = torch.cat([w, h, w, h], dim=-1)  # [B, 1, 4]
    return torch.minimum(boxes.clamp(min=0), upper)


def postprocess(cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, num_per_level: Sequence[int],
                image_sizes: Tensor, score_thresh: float = 0.05, topk_candidates: int = 1000,
                nms_thresh: float = 0.5, detections_per_img: int = 100,
                box_coder: BoxCoder | None = None) -> list[dict[str, Tensor]]:
    """Detections of each image of a batch.

    cls_logits [B, N, K], box_deltas [B, N, 4], anchors [N, 4], image_sizes int [B, 2] (h, w before
    padding); box_coder: the training's (default: unit weights). Returns B dicts with boxes float
    [D, 4] x1y1x2y2 in input pixels, scores float [D], labels int64 [D], sorted by decreasing
    score, D <= detections_per_img.
    """
    box_coder = box_coder or BoxCoder()
    b, _, k = cls_logits.shape
    scores, anchor_idx, labels = top_candidates(cls_logits, num_per_level, topk_candidates)
    deltas = box_deltas.float().gather(1, anchor_idx[..., None].expand(-1, -1, 4))  # [B, C, 4]
    boxes = clip_to_images(box_coder.decode(deltas, anchors[anchor_idx]), image_sizes)
    image = torch.arange(b, device=scores.device)[:, None].expand_as(scores)
    keep = scores > score_thresh
    boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
    kept = grouped_nms(boxes, scores, image * k + labels, nms_thresh)  # sorted by decreasing score
    kept = kept[per_image_rank(image[kept], b) < detections_per_img]
    kept = kept[torch.sort(image[kept], stable=True).indices]  # grouped by image, still by score
    counts = torch.bincount(image[kept], minlength=b).tolist()
    return [{"boxes": bx, "scores": sc, "labels": lb}
            for bx, sc, lb in zip(boxes[kept].split(counts), scores[kept].split(counts),
                                  labels[kept].split(counts))]


class Postprocess:
    """`postprocess` with its parameters fixed: (cls_logits, box_deltas, anchors, num_per_level,
    image_sizes) -> detections per image. Defaults are the paper's (4.1): scores above 0.05, the
    top 1000 per level, NMS at 0.5, 100 detections per image."""

    def __init__(self, score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, box_coder: BoxCoder | None = None):
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_coder = box_coder or BoxCoder()

    def __call__(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, num_per_level: Sequence[int],
                 image_sizes: Tensor) -> list[dict[str, Tensor]]:
        return postprocess(cls_logits, box_deltas, anchors, num_per_level, image_sizes, self.score_thresh,
                           self.topk_candidates, self.nms_thresh, self.detections_per_img, self.box_coder)
