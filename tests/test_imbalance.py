"""ablate.imbalance.anchor_balance with an injected anchor generator and matcher, by hand."""

from __future__ import annotations

import pytest
import torch

from ablate.imbalance import anchor_balance
from ablate.matching import Matcher
from ablate.model.anchors import AnchorGenerator

# One 64 x 64 image whose only box is exactly the P3 anchor of cell (1, 1): 16 px around (12, 12).
IMAGE = (torch.zeros(3, 64, 64, dtype=torch.uint8),
         {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([0]), "image_id": 1,
          "orig_size": (64, 64)})
# One 16 px anchor per location, doubling per level: 64 + 16 + 4 + 1 + 1 = 86 anchors.
ONE_PER_CELL = AnchorGenerator(size=16.0, num_scales=1, aspect_ratios=(1.0,))


def test_anchor_balance_by_hand():
    b = anchor_balance([IMAGE, IMAGE], ONE_PER_CELL, Matcher())
    # Only the anchor equal to the box reaches 0.4: its 4 P3 neighbours overlap 1/3, P4's covering
    # anchor 1/4, everything else less.
    assert b == pytest.approx({"anchors_per_image": 86.0, "fg_per_image": 1.0, "bg_per_image": 85.0,
                               "ignored_per_image": 0.0, "bg_per_fg": 85.0})


def test_anchor_balance_follows_the_injected_matcher():
    # fg >= 0.3 takes the 4 neighbours (1/3); bg < 0.2 leaves P4's covering anchor (1/4) ignored.
    b = anchor_balance([IMAGE], ONE_PER_CELL, Matcher(fg_iou_thresh=0.3, bg_iou_thresh=0.2))
    assert (b["fg_per_image"], b["ignored_per_image"], b["bg_per_image"]) == (5.0, 1.0, 80.0)
