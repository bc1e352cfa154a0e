"""The anchor imbalance the focal loss is about, measured on a data set: foreground, background and
ignored anchors per image, as a run's matcher assigns its anchors (a run's summary and `ablate
anchors` report it). No plotting: the runner imports it."""

from __future__ import annotations

from pathlib import Path

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


def embedded_set(cfg, preset: str, progress: bool = True) -> tuple[Path, list[str]]:
    """`ablate data synth`: the embedded set written into the cache (its folder), and lines saying
    its statistics and the anchor imbalance `preset`'s anchors and matcher meet on its train split."""
    from ablate import builders
    from ablate.data.synth import synth_stats

    root = builders.data_root(cfg, progress=progress)
    lines = [f"{key}: {value}" for key, value in synth_stats(root).items()]
    train_set = builders.build_dataset(cfg.data, root, cfg.data.train_split, train=False, progress=progress)
    b = anchor_balance(train_set, builders.build_anchor_generator(cfg), builders.build_matcher(cfg))
    lines.append(f"anchors ({preset} preset): {b['anchors_per_image']:.0f} per image, foreground "
                 f"{b['fg_per_image']:.1f}, background {b['bg_per_image']:.0f}: 1:{b['bg_per_fg']:.0f} "
                 f"(x {len(train_set.category_names)} classes in the sigmoid outputs)")
    return root, lines
