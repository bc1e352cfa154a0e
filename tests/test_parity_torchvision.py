"""Ours against torchvision 0.29's RetinaNet, given identical weights, anchors, image and targets.

One image, so that torchvision's per-image normalisation and ours (batch total) agree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet as TvRetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ablate.criterion import DetectionLoss
from ablate.model.retinanet import RetinaNet
from ablate.postprocess import postprocess

NUM_CLASSES = 5


def _torchvision_copy(ours: RetinaNet) -> TvRetinaNet:
    """torchvision's RetinaNet holding exactly our weights (trunk, FPN, both subnets)."""
    extra = LastLevelP6P7(512, 64)
    backbone = BackboneWithFPN(resnet18(norm_layer=nn.BatchNorm2d), {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [128, 256, 512], 64, extra_blocks=extra)
    tv = TvRetinaNet(backbone, NUM_CLASSES)
    tv.backbone.load_state_dict(ours.backbone.state_dict())
    for tv_sub, our_sub in ((tv.head.classification_head, ours.cls_subnet),
                            (tv.head.regression_head, ours.box_subnet)):
        our_convs = [m for m in our_sub.tower if isinstance(m, nn.Conv2d)]
        for block, conv in zip(tv_sub.conv, our_convs):
            block[0].load_state_dict(conv.state_dict())
    tv.head.classification_head.cls_logits.load_state_dict(ours.cls_subnet.out.state_dict())
    tv.head.regression_head.bbox_reg.load_state_dict(ours.box_subnet.out.state_dict())
    return tv.eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    # The paper's head (4 convs, prior 0.01, no norm) and anchors, narrower to stay fast.
    ours = RetinaNet(NUM_CLASSES, trunk="resnet18", fpn_channels=64, head_channels=64, head_convs=4,
                     prior=0.01).eval()
    tv = _torchvision_copy(ours)
    image = torch.randint(0, 256, (1, 3, 160, 192), dtype=torch.uint8)
    with torch.no_grad():
        cls_logits, box_deltas, anchors, per_level = ours(image)
        x = (image.float() - ours.mean) / ours.std
        tv_out = tv.head(list(tv.backbone(x).values()))
    gt_boxes = torch.tensor([[[20.0, 30.0, 60.0, 90.0], [100.0, 40.0, 180.0, 70.0], [5.0, 100.0, 40.0, 150.0]]])
    gt_labels = torch.tensor([[1, 4, 1]])
    return cls_logits, box_deltas, anchors, per_level, tv, tv_out, gt_boxes, gt_labels


def test_same_weights_give_same_head_outputs(setup):
    cls_logits, box_deltas, *_, tv_out, _, _ = setup
    assert torch.allclose(cls_logits, tv_out["cls_logits"], atol=1e-5)
    assert torch.allclose(box_deltas, tv_out["bbox_regression"], atol=1e-5)


@pytest.mark.parametrize("box_loss,beta", [("l1", 0.0), ("smooth_l1", 1.0), ("giou", 0.0)])
def test_focal_and_box_losses_match_torchvision(setup, box_loss, beta):
    cls_logits, box_deltas, anchors, _, tv, _, gt_boxes, gt_labels = setup
    criterion = DetectionLoss(cls_loss="focal", gamma=2.0, alpha=0.25, box_loss=box_loss, smooth_l1_beta=beta)
    ours = criterion(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    tv.head.regression_head._loss_type = box_loss
    theirs = tv.compute_loss([{"boxes": gt_boxes[0], "labels": gt_labels[0]}],
                             {"cls_logits": cls_logits, "bbox_regression": box_deltas}, [anchors])
    assert ours["num_fg"] > 3  # the boxes really matched anchors, so the box loss is not trivially 0
    assert torch.allclose(ours["loss_cls"], theirs["classification"], rtol=1e-4)
    assert torch.allclose(ours["loss_box_reg"], theirs["bbox_regression"], rtol=1e-4)


def test_postprocess_matches_torchvision(setup):
    cls_logits, box_deltas, anchors, per_level, tv, *_ = setup
    # Raise some scores so that NMS and the 100-per-image cap both have work to do.
    logits = cls_logits.clone()
    gen = torch.Generator().manual_seed(0)
    logits[0, ::7, 2] += 4.0 + 4.0 * torch.rand(logits[0, ::7, 2].shape, generator=gen)
    tv.detections_per_img = 100
    ours = postprocess(logits, box_deltas, anchors, per_level, torch.tensor([[160, 192]]))[0]
    split = lambda t: list(t.split(per_level, dim=1))  # noqa: E731
    theirs = tv.postprocess_detections({"cls_logits": split(logits), "bbox_regression": split(box_deltas)},
                                       [list(anchors.split(per_level))], [(160, 192)])[0]
    assert len(ours["scores"]) == len(theirs["scores"]) == 100
    assert torch.equal(ours["scores"], theirs["scores"])  # both sorted by decreasing score
    assert torch.equal(ours["labels"], theirs["labels"])
    assert torch.allclose(ours["boxes"], theirs["boxes"], atol=1e-4)


def test_focal_equals_torchvision_sigmoid_focal_loss():
    from torchvision.ops import sigmoid_focal_loss

    from ablate.losses import focal

    torch.manual_seed(1)
    logits = torch.randn(4, 50, 7) * 3
    targets = (torch.rand(4, 50, 7) < 0.1).float()
    for gamma, alpha in [(0.0, 0.25), (2.0, 0.25), (0.5, 0.75), (5.0, 0.5)]:
        assert torch.allclose(focal(logits, targets, gamma, alpha),
                              sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma), atol=1e-6)
