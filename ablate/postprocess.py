"""Inference post-processing (paper 4.1), batched over images: per level keep the top-k scores
above the threshold, decode, merge levels, class-wise NMS, keep the best detections per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ablate.losses import per_image_rank
from ablate.matching import decode_boxes


def top_candidates(cls_logits: Tensor, num_per_level: Sequence[int], topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `topk` highest class scores of each level of each image.

    cls_logits: [B, N, K]. Returns (scores [B, C] sigmoid probabilities, anchor index [B, C] into N,
    label [B, C]), C = sum over levels of min(topk, N_l * K). Taking the top-k of all scores and then
    thresholding keeps the same set as thresholding first, without a per-image loop.
    """
    b, _, k = cls_logits.shape
    scores, anchor_idx, labels = [], [], []
    start = 0
    for n in num_per_level:
        level = cls_logits[:, start:start + n].reshape(b, n * k)
        top, idx = level.topk(min(topk, n * k), dim=1)
        scores.append(torch.sigmoid(top.float()))
        anchor_idx.append(idx // k + start)
        labels.append(idx % k)
        start += n
    return torch.cat(scores, 1), torch.cat(anchor_idx, 1), torch.cat(labels, 1)


def clip_to_images(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """boxes [B, C, 4] clipped to each image's (h, w) in image_sizes [B, 2]."""
    h = image_sizes[:, 0].to(boxes.dtype)[:, None, None]
    w = image_sizes[:, 1].to(boxes.dtype)[:, None, None]
    upper = torch.cat([w, h, w, h], dim=-1)  # [B, 1, 4]
    return torch.minimum(boxes.clamp(min=0), upper)


def postprocess(cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, num_per_level: Sequence[int],
                image_sizes: Tensor, score_thresh: float = 0.05, topk_candidates: int = 1000,
                nms_thresh: float = 0.5, detections_per_img: int = 100,
                box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> list[dict[str, Tensor]]:
    """Detections of each image of a batch.

    cls_logits [B, N, K], box_deltas [B, N, 4], anchors [N, 4], image_sizes int [B, 2] (h, w before
    padding). Returns B dicts with boxes float [D, 4] x1y1x2y2 in input pixels, scores float [D],
    labels int64 [D], sorted by decreasing score, D <= detections_per_img.
    """
    b, _, k = cls_logits.shape
    scores, anchor_idx, labels = top_candidates(cls_logits, num_per_level, topk_candidates)
    deltas = box_deltas.float().gather(1, anchor_idx[..., None].expand(-1, -1, 4))  # [B, C, 4]
    boxes = clip_to_images(decode_boxes(deltas, anchors[anchor_idx], box_weights), image_sizes)
    image = torch.arange(b, device=scores.device)[:, None].expand_as(scores)
    keep = scores > score_thresh
    boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
    kept = batched_nms(boxes, scores, image * k + labels, nms_thresh)  # sorted by decreasing score
    kept = kept[per_image_rank(image[kept], b) < detections_per_img]
    kept = kept[torch.sort(image[kept], stable=True).indices]  # grouped by image, still by score
    counts = torch.bincount(image[kept], minlength=b).tolist()
    return [{"boxes": bx, "scores": sc, "labels": lb}
            for bx, sc, lb in zip(boxes[kept].split(counts), scores[kept].split(counts),
                                  labels[kept].split(counts))]
