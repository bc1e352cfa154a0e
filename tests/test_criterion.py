"""ablate.criterion.DetectionLoss on a hand-made image: 4 anchors, one ground-truth box, K = 3."""

from __future__ import annotations

import math

import pytest
import torch

from ablate import losses
from ablate.criterion import DetectionLoss
from ablate.matching import BoxCoder, Matcher, encode_boxes

K = 3
GT_BOX = [0.0, 0.0, 10.0, 10.0]
GT_LABEL = 1
# IoU with GT_BOX: a0 1 (fg), a1 100 / 180 = 0.556 (fg), a2 60 / 140 = 0.429 (ignored), a3 0 (bg)
ANCHORS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],
    [0.0, 0.0, 10.0, 18.0],
    [4.0, 0.0, 14.0, 10.0],
    [50.0, 50.0, 60.0, 60.0],
])
FG, IGN, BG = [0, 1], [2], [3]


def _gt(batch: int = 1):
    return torch.tensor([[GT_BOX]]).repeat(batch, 1, 1), torch.tensor([[GT_LABEL]]).repeat(batch, 1)


def _zeros(batch: int = 1):
    return torch.zeros(batch, 4, K), torch.zeros(batch, 4, 4)


def test_counts():
    out = DetectionLoss()(*_zeros(), ANCHORS, *_gt())
    assert int(out["num_fg"]) == 2
    assert int(out["num_bg"]) == 1
    assert int(out["num_ignored"]) == 1
    assert out["loss"].dim() == 0


def test_ce_loss_by_hand_at_zero_logits():
    out = DetectionLoss(cls_loss="ce")(*_zeros(), ANCHORS, *_gt())
    # 3 counted anchors (a0, a1, a3) x 3 classes, each log 2, over 2 foreground anchors
    assert out["loss_cls"].item() == pytest.approx(9 * math.log(2) / 2, rel=1e-6)


def test_focal_loss_by_hand_at_zero_logits():
    out = DetectionLoss(cls_loss="focal", gamma=2.0, alpha=0.25)(*_zeros(), ANCHORS, *_gt())
    # p = 0.5 everywhere: a positive element costs 0.25 * 0.25 * log 2, a negative one 0.75 * 0.25 * log 2;
    # 2 positives (label 1 of a0, a1) and 7 negatives (2 + 2 on a0, a1, 3 on a3), over 2
    expected = (2 * 0.0625 + 7 * 0.1875) * math.log(2) / 2
    assert out["loss_cls"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss_cls"].item() == pytest.approx(0.498197, rel=1e-5)


def test_targets_put_the_gt_label_on_foreground_anchors_only():
    # A large logit on the gt class of a foreground anchor lowers CE; on background it raises it.
    crit = DetectionLoss(cls_loss="ce")
    logits, deltas = _zeros()
    base = crit(logits, deltas, ANCHORS, *_gt())["loss_cls"].item()
    fg_logits = logits.clone()
    fg_logits[0, 0, GT_LABEL] = 5.0
    assert crit(fg_logits, deltas, ANCHORS, *_gt())["loss_cls"].item() < base
    wrong_class = logits.clone()
    wrong_class[0, 0, 0] = 5.0
    assert crit(wrong_class, deltas, ANCHORS, *_gt())["loss_cls"].item() > base
    bg_logits = logits.clone()
    bg_logits[0, 3, GT_LABEL] = 5.0
    assert crit(bg_logits, deltas, ANCHORS, *_gt())["loss_cls"].item() > base


@pytest.mark.parametrize("cls", ["ce", "alpha_ce", "focal", "focal_star"])
def test_ignored_anchors_contribute_nothing(cls):
    crit = DetectionLoss(cls_loss=cls)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, K, generator=g)
    deltas = torch.zeros(1, 4, 4)
    base = crit(logits, deltas, ANCHORS, *_gt())["loss_cls"].item()
    changed = logits.clone()
    changed[0, IGN] = torch.tensor([[9.0, -7.0, 30.0]])
    assert crit(changed, deltas, ANCHORS, *_gt())["loss_cls"].item() == pytest.approx(base, rel=1e-6)
    # and they receive no gradient
    logits.requires_grad_()
    crit(logits, deltas, ANCHORS, *_gt())["loss"].backward()
    assert torch.equal(logits.grad[0, IGN], torch.zeros(1, K))
    assert bool((logits.grad[0, FG + BG].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("cls", ["ce", "alpha_ce", "focal", "focal_star", "ohem"])
def test_normalised_by_the_number_of_foreground_anchors(cls):
    crit = DetectionLoss(cls_loss=cls)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, K, generator=g)
    deltas = torch.randn(1, 4, 4, generator=g) * 0.1
    one = crit(logits, deltas, ANCHORS, *_gt(1))
    two = crit(logits.repeat(2, 1, 1), deltas.repeat(2, 1, 1), ANCHORS, *_gt(2))
    assert int(two["num_fg"]) == 2 * int(one["num_fg"]) == 4
    # numerator and normaliser both double
    assert two["loss_cls"].item() == pytest.approx(one["loss_cls"].item(), rel=1e-5)
    assert two["loss_box_reg"].item() == pytest.approx(one["loss_box_reg"].item(), rel=1e-5)


@pytest.mark.parametrize("cls", ["ce", "alpha_ce", "focal", "focal_star", "ohem"])
@pytest.mark.parametrize("box", ["smooth_l1", "l1", "giou"])
def test_every_option_gives_a_finite_scalar_with_a_gradient(cls, box):
    crit = DetectionLoss(cls_loss=cls, box_loss=box)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, K, generator=g).requires_grad_()
    deltas = (torch.randn(2, 4, 4, generator=g) * 0.3).requires_grad_()
    out = crit(logits, deltas, ANCHORS, *_gt(2))
    loss = out["loss"]
    assert loss.dim() == 0 and bool(torch.isfinite(loss)) and loss.item() > 0
    assert loss.item() == pytest.approx(out["loss_cls"].item() + out["loss_box_reg"].item(), rel=1e-6)
    loss.backward()
    assert bool(torch.isfinite(logits.grad).all()) and logits.grad.abs().sum() > 0
    assert bool(torch.isfinite(deltas.grad).all()) and deltas.grad.abs().sum() > 0
    # only foreground anchors get a box gradient
    assert torch.equal(deltas.grad[:, IGN + BG], torch.zeros(2, 2, 4))


def test_ema_normalizer_updates_its_state():
    crit = DetectionLoss(cls_loss="ce", normalizer="ema", normalizer_momentum=0.9)
    batch = DetectionLoss(cls_loss="ce")
    logits, deltas = _zeros(2)
    assert crit.ema_num_fg is None
    first = crit(logits[:1], deltas[:1], ANCHORS, *_gt(1))
    assert crit.ema_num_fg == pytest.approx(2.0)  # first call: the count itself
    assert first["loss_cls"].item() == pytest.approx(batch(logits[:1], deltas[:1], ANCHORS, *_gt(1))["loss_cls"].item())
    second = crit(logits, deltas, ANCHORS, *_gt(2))  # num_fg = 4
    assert crit.ema_num_fg == pytest.approx(0.9 * 2 + 0.1 * 4)  # 2.2
    # 2 images x 9 counted elements x log 2, over 2.2 instead of 4
    assert second["loss_cls"].item() == pytest.approx(18 * math.log(2) / 2.2, rel=1e-6)
    crit(logits[:1], deltas[:1], ANCHORS, *_gt(1))
    assert crit.ema_num_fg == pytest.approx(0.9 * 2.2 + 0.1 * 2)  # 2.18


def test_box_loss_zero_when_deltas_equal_the_targets():
    gt_boxes, gt_labels = _gt()
    deltas = torch.zeros(1, 4, 4)
    deltas[0, FG] = encode_boxes(gt_boxes[0, 0], ANCHORS[FG])
    deltas[0, IGN + BG] = 3.0  # not foreground: must not count
    for box in ("smooth_l1", "l1", "giou"):
        out = DetectionLoss(box_loss=box)(torch.zeros(1, 4, K), deltas, ANCHORS, gt_boxes, gt_labels)
        assert out["loss_box_reg"].item() == pytest.approx(0.0, abs=1e-6)


def test_box_loss_by_hand_at_zero_deltas():
    # a0 is the gt itself: target 0. a1 = [0,0,10,18] (centre y 9, h 18) vs gt (centre y 5, h 10):
    # target (0, -4 / 18, 0, log(10 / 18)); over 2 foreground anchors.
    dy, dh = -4 / 18, math.log(10 / 18)
    out = DetectionLoss(box_loss="l1")(*_zeros(), ANCHORS, *_gt())
    assert out["loss_box_reg"].item() == pytest.approx((abs(dy) + abs(dh)) / 2, rel=1e-5)
    beta = 0.11
    out = DetectionLoss(box_loss="smooth_l1", smooth_l1_beta=beta)(*_zeros(), ANCHORS, *_gt())
    assert out["loss_box_reg"].item() == pytest.approx((abs(dy) - beta / 2 + abs(dh) - beta / 2) / 2, rel=1e-5)
    out = DetectionLoss(box_loss="l1", box_loss_weight=2.5)(*_zeros(), ANCHORS, *_gt())
    assert out["loss_box_reg"].item() == pytest.approx(2.5 * (abs(dy) + abs(dh)) / 2, rel=1e-5)
    # giou: decoded a1 = [0,0,10,18] vs gt: IoU 100 / 180, hull = union -> 1 - 5/9
    out = DetectionLoss(box_loss="giou")(*_zeros(), ANCHORS, *_gt())
    assert out["loss_box_reg"].item() == pytest.approx((1 - 100 / 180) / 2, rel=1e-5)


def test_image_without_ground_truth_is_all_background():
    gt_boxes, gt_labels = _gt(2)
    gt_boxes[1, 0] = ANCHORS[0]  # a padding row, even if its box coincides with an anchor
    gt_labels[1, 0] = -1
    crit = DetectionLoss(cls_loss="ce")
    logits, deltas = _zeros(2)
    out = crit(logits, deltas, ANCHORS, gt_boxes, gt_labels)
    assert int(out["num_fg"]) == 2  # image 0 only
    assert int(out["num_bg"]) == 1 + 4  # image 1: every anchor
    assert int(out["num_ignored"]) == 1
    # image 0: 9 elements, image 1: 12 elements, all log 2 at zero logits, over 2
    assert out["loss_cls"].item() == pytest.approx(21 * math.log(2) / 2, rel=1e-6)
    # its anchors are pushed towards background for every class
    logits.requires_grad_()
    crit(logits, deltas, ANCHORS, gt_boxes, gt_labels)["loss"].backward()
    assert bool((logits.grad[1] > 0).all())


def test_batch_without_any_ground_truth():
    gt_boxes = torch.zeros(2, 1, 4)
    gt_labels = torch.full((2, 1), -1)
    logits, deltas = _zeros(2)
    out = DetectionLoss(cls_loss="focal")(logits, deltas.requires_grad_(), ANCHORS, gt_boxes, gt_labels)
    assert int(out["num_fg"]) == 0 and int(out["num_bg"]) == 8
    assert out["loss_box_reg"].item() == 0.0
    # normaliser clamped to 1: 24 negatives at p = 0.5
    assert out["loss_cls"].item() == pytest.approx(24 * 0.75 * 0.25 * math.log(2), rel=1e-6)
    assert bool(torch.isfinite(out["loss"]))


def test_defaults_are_the_papers():
    crit = DetectionLoss()
    assert crit.cls_loss is losses.CLS_LOSSES["focal"] and crit.box_loss is losses.BOX_LOSSES["smooth_l1"]
    assert (crit.cls_params["gamma"], crit.cls_params["alpha"]) == (2.0, 0.25)
    assert (crit.matcher.fg_iou_thresh, crit.matcher.bg_iou_thresh) == (0.5, 0.4)
    assert crit.box_coder.weights == (1.0, 1.0, 1.0, 1.0)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown classification loss 'softmax'"):
        DetectionLoss(cls_loss="softmax")
    with pytest.raises(ValueError, match="unknown box loss 'iou'"):
        DetectionLoss(box_loss="iou")
    with pytest.raises(ValueError, match="unknown normalizer 'image'"):
        DetectionLoss(normalizer="image")


def test_injected_matcher_decides_the_assignment():
    # fg threshold 0.6: a1 (IoU 0.556) drops into the ignored band; it is not the box's best anchor
    # (a0 is), so the low-quality rule does not bring it back.
    out = DetectionLoss(matcher=Matcher(fg_iou_thresh=0.6, bg_iou_thresh=0.4))(*_zeros(), ANCHORS, *_gt())
    assert (int(out["num_fg"]), int(out["num_ignored"]), int(out["num_bg"])) == (1, 2, 1)
    # 2 counted anchors (a0, a3) x 3 classes at zero logits, over 1 foreground anchor
    out = DetectionLoss(cls_loss="ce", matcher=Matcher(0.6, 0.4))(*_zeros(), ANCHORS, *_gt())
    assert out["loss_cls"].item() == pytest.approx(6 * math.log(2), rel=1e-6)


def test_injected_box_coder_sets_the_regression_targets():
    # As test_box_loss_by_hand_at_zero_deltas, with Faster R-CNN's weights: dy x 10, dh x 5.
    dy, dh = -4 / 18, math.log(10 / 18)
    out = DetectionLoss(box_loss="l1", box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)))(*_zeros(), ANCHORS, *_gt())
    assert out["loss_box_reg"].item() == pytest.approx((10 * abs(dy) + 5 * abs(dh)) / 2, rel=1e-5)
