"""Diagnostics of the paper's setting: the foreground:background imbalance of the anchors."""

from __future__ import annotations

from pathlib import Path

import torch

from ablate.config import MatcherConfig, ModelConfig
from ablate.data.coco import CocoDetection, collate
from ablate.matching import BACKGROUND, IGNORED, batched_iou, match_anchors
from ablate.model.anchors import AnchorGenerator, feature_sizes_for


def anchor_balance(dataset: CocoDetection, model_cfg: ModelConfig, matcher_cfg: MatcherConfig,
                   num_images: int = 128, batch_size: int = 16) -> dict[str, float]:
    """Foreground, background and ignored anchors per image over the first `num_images` images,
    as the matcher assigns them; `bg_per_fg` is the imbalance the focal loss is about (the paper's
    setting has ~100k anchors for a handful of objects: about 1:1000 before counting classes)."""
    generator = AnchorGenerator(model_cfg.anchor_size, model_cfg.num_scales, model_cfg.aspect_ratios,
                                model_cfg.anchor_offset)
    counts = torch.zeros(3)
    seen = 0
    for start in range(0, min(num_images, len(dataset)), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, num_images, len(dataset)))])
        anchors, _ = generator(feature_sizes_for(*batch.images.shape[-2:]))
        matched = match_anchors(batched_iou(batch.gt_boxes, batch.gt_labels >= 0, anchors),
                                matcher_cfg.fg_iou_thresh, matcher_cfg.bg_iou_thresh, matcher_cfg.allow_low_quality)
        counts += torch.stack([(matched >= 0).sum(), (matched == BACKGROUND).sum(), (matched == IGNORED).sum()])
        seen += len(batch.images)
    fg, bg, ignored = (counts / max(1, seen)).tolist()
    return {"anchors_per_image": fg + bg + ignored, "fg_per_image": fg, "bg_per_image": bg,
            "ignored_per_image": ignored, "bg_per_fg": bg / max(fg, 1e-9)}


def loss_curve_png(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """The run's loss_cls and loss_box_reg against iteration (log scale), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key in ("loss_cls", "loss_box_reg"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
