"""The anchor imbalance the focal loss is about, measured on a data set: foreground, background and
ignored anchors per image, as a run's matcher assigns its anchors (a run's summary and `ablate
anchors` report it). No plotting: the runner imports it."""

from __future__ import annotations

import torch

from ablate.data.coco import CocoDetection, collate
from ablate.matching import BACKGROUND, IGNORED, Matcher
from ablate.model.anchors import AnchorGenerator, feature_sizes_for


def anchor_balance(dataset: CocoDetection, anchor_generator: AnchorGenerator, matcher: Matcher,
                   num_images: int = 128, batch_size: int = 16) -> dict[str, float]:
    """Foreground, background and ignored anchors per image over the first `num_images` images,
    as `matcher` assigns the anchors of `anchor_generator`; `bg_per_fg` is the imbalance the focal
    loss is about (the paper's setting has ~100k anchors for a handful of objects: about 1:1000
    before counting classes)."""
    counts = torch.zeros(3)
    seen = 0
    for start in range(0, min(num_images, len(dataset)), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, num_images, len(dataset)))])
        anchors, _ = anchor_generator(feature_sizes_for(*batch.images.shape[-2:]))
        matched = matcher(batch.gt_boxes, batch.gt_labels, anchors)
        counts += torch.stack([(matched >= 0).sum(), (matched == BACKGROUND).sum(), (matched == IGNORED).sum()])
        seen += len(batch.images)
    fg, bg, ignored = (counts / max(1, seen)).tolist()
    return {"anchors_per_image": fg + bg + ignored, "fg_per_image": fg, "bg_per_image": bg,
            "ignored_per_image": ignored, "bg_per_fg": bg / max(fg, 1e-9)}

