"""ablate.matching: batched IoU, anchor assignment (fg / bg / ignored, low-quality rule), box coding,
and the Matcher / BoxCoder objects that hold their parameters."""

from __future__ import annotations

import math

import torch

import pytest

from ablate.matching import (BACKGROUND, IGNORED, MAX_LOG_SCALE, BoxCoder, Matcher, batched_iou, decode_boxes,
                             encode_boxes, match_anchors)

ANCHORS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])


# ----------------------------------------------------------------------------- batched_iou

def test_batched_iou_by_hand_with_padding_row():
    gt = torch.tensor([
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]],  # image 0: one box, then a padding row
        [[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 20.0]],  # image 1: two boxes
    ])
    valid = torch.tensor([[True, False], [True, True]])
    iou = batched_iou(gt, valid, ANCHORS)
    expected = torch.tensor([
        # [0,0,10,10] vs the anchors: itself 1, half-shifted 50 / 150, far 0
        [[1.0, 1 / 3, 0.0], [-1.0, -1.0, -1.0]],
        # [5,0,15,10]: 50/150, 1, 0; [0,0,10,20] (area 200): 100/200, 50/250, 0
        [[1 / 3, 1.0, 0.0], [0.5, 0.2, 0.0]],
    ])
    assert iou.shape == (2, 2, 3)
    torch.testing.assert_close(iou, expected)


def _grid_boxes(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Boxes [*shape, 4] on a coarse integer grid, so that equal IoUs (ties) and touching edges occur."""
    xy = torch.randint(0, 40, (*shape, 2), generator=g).float()
    return torch.cat([xy, xy + torch.randint(1, 20, (*shape, 2), generator=g).float()], -1)


def test_batched_iou_equals_torchvision_box_iou_to_the_bit():
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(0)
    anchors = torch.cat([_grid_boxes(g, (500,)), torch.rand(500, 4, generator=g).sort(-1).values * 60])
    gt = torch.cat([_grid_boxes(g, (3, 4)), anchors[:12].view(3, 4, 4)], 1)  # some identical to anchors
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, 5:] = False
    iou = batched_iou(gt, valid, anchors)
    for b in range(3):
        assert torch.equal(iou[b][valid[b]], box_iou(gt[b][valid[b]], anchors))
        assert bool((iou[b][~valid[b]] == -1).all())


# ----------------------------------------------------------------------------- match_anchors

PAD = [-1.0] * 6

# [B=2, M=3, N=6]: the last row of each image is padding (-1 as batched_iou writes it).
IOU = torch.tensor([
    [
        #  a0    a1    a2    a3    a4    a5
        [0.70, 0.45, 0.10, 0.35, 0.00, 0.50],  # gt0
        [0.10, 0.20, 0.30, 0.30, 0.00, 0.20],  # gt1: best IoU 0.3, reached by a2 and a3 (a tie)
        PAD,
    ],
    [
        [0.40, 0.39, 0.60, 0.60, 0.00, 0.20],  # gt0
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # gt1: overlaps nothing
        PAD,
    ],
])


def test_match_anchors_with_low_quality_rule():
    matched = match_anchors(IOU, 0.5, 0.4, allow_low_quality=True)
    assert matched.dtype == torch.int64
    expected = torch.tensor([
        # a0: 0.7 -> gt0; a1: 0.45 -> ignored; a2: 0.3 < 0.4 but gt1's best -> gt1;
        # a3: also gt1's best (tie), yet it overlaps gt0 most (0.35) -> gt0, as torchvision's Matcher;
        # a4: 0 -> background; a5: exactly 0.5 -> foreground.
        [0, IGNORED, 1, 0, BACKGROUND, 0],
        # a0: exactly 0.4 -> ignored; a1: 0.39 -> background; a2, a3: 0.6 -> gt0;
        # gt1 has best IoU 0: no anchor for it.
        [IGNORED, BACKGROUND, 0, 0, BACKGROUND, BACKGROUND],
    ])
    assert torch.equal(matched, expected)


def test_match_anchors_without_low_quality_rule():
    matched = match_anchors(IOU, 0.5, 0.4, allow_low_quality=False)
    expected = torch.tensor([
        [0, IGNORED, BACKGROUND, BACKGROUND, BACKGROUND, 0],
        [IGNORED, BACKGROUND, 0, 0, BACKGROUND, BACKGROUND],
    ])
    assert torch.equal(matched, expected)


def test_match_anchors_other_thresholds():
    matched = match_anchors(IOU, fg_iou_thresh=0.3, bg_iou_thresh=0.3, allow_low_quality=False)
    # no ignored band; a2 of image 0 reaches 0.3 with gt1 (its max)
    expected = torch.tensor([
        [0, 0, 1, 0, BACKGROUND, 0],
        [0, 0, 0, 0, BACKGROUND, BACKGROUND],
    ])
    assert torch.equal(matched, expected)


def test_padding_rows_are_never_matched_even_on_an_exact_overlap():
    # image 0's padding row holds a box identical to anchor 2: it must be ignored altogether.
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]])
    valid = torch.tensor([[True, False]])
    matched = match_anchors(batched_iou(gt, valid, ANCHORS))
    assert torch.equal(matched, torch.tensor([[0, BACKGROUND, BACKGROUND]]))
    # the same image with the row valid: anchor 2 becomes foreground of gt 1
    matched = match_anchors(batched_iou(gt, torch.tensor([[True, True]]), ANCHORS))
    assert torch.equal(matched, torch.tensor([[0, BACKGROUND, 1]]))


def test_image_with_only_padding_is_all_background():
    gt = torch.zeros(2, 2, 4)
    gt[0, 0] = torch.tensor([0.0, 0.0, 10.0, 10.0])
    valid = torch.tensor([[True, False], [False, False]])
    matched = match_anchors(batched_iou(gt, valid, ANCHORS))
    assert torch.equal(matched[1], torch.full((3,), BACKGROUND))
    assert matched[0, 0] == 0


def test_match_anchors_properties_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 30], 1)
    xy = torch.rand(3, 4, 2, generator=g) * 100
    gt = torch.cat([xy, xy + 5 + torch.rand(3, 4, 2, generator=g) * 30], -1)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    iou = batched_iou(gt, valid, anchors)
    matched = match_anchors(iou)
    assert matched.shape == (3, 60)
    assert int(matched.min()) >= IGNORED
    # only valid rows are ever matched
    for b in range(3):
        fg = matched[b][matched[b] >= 0]
        assert bool(valid[b][fg].all())
    # every valid gt with some overlap has at least one anchor (the low-quality rule)
    for b in range(3):
        for m in range(4):
            if valid[b, m] and iou[b, m].max() > 0:
                best = iou[b, m] == iou[b, m].max()
                assert bool((matched[b][best] >= 0).all())
    # without the rule, every foreground anchor has IoU >= 0.5 with its gt
    strict = match_anchors(iou, allow_low_quality=False)
    b_idx, n_idx = (strict >= 0).nonzero(as_tuple=True)
    assert bool((iou[b_idx, strict[b_idx, n_idx], n_idx] >= 0.5).all())
    # the rule only ever turns anchors into foreground
    changed = strict != matched
    assert bool((matched[changed] >= 0).all())


# ----------------------------------------------------------------------------- box coding

def test_encode_by_hand_with_weights():
    anchor = torch.tensor([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), 10 x 20
    gt = torch.tensor([2.0, 4.0, 22.0, 24.0])  # centre (12, 14), 20 x 20
    deltas = encode_boxes(gt, anchor, (10.0, 10.0, 5.0, 5.0))
    # dx = 10 * 7 / 10, dy = 10 * 4 / 20, dw = 5 log 2, dh = 5 log 1
    torch.testing.assert_close(deltas, torch.tensor([7.0, 2.0, 5 * math.log(2.0), 0.0]))
    torch.testing.assert_close(deltas, torch.tensor([7.0, 2.0, 3.4657359, 0.0]))
    torch.testing.assert_close(decode_boxes(deltas, anchor, (10.0, 10.0, 5.0, 5.0)), gt)
    # unit weights
    torch.testing.assert_close(encode_boxes(gt, anchor), torch.tensor([0.7, 0.2, math.log(2.0), 0.0]))


def test_encode_of_the_anchor_itself_is_zero():
    torch.testing.assert_close(encode_boxes(ANCHORS, ANCHORS), torch.zeros(3, 4))
    torch.testing.assert_close(decode_boxes(torch.zeros(3, 4), ANCHORS), ANCHORS)


def test_encode_decode_round_trip_on_random_boxes():
    g = torch.Generator().manual_seed(1)
    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 100
        return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 50], 1)
    anchors, gt = boxes(200), boxes(200)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        deltas = encode_boxes(gt, anchors, weights)
        torch.testing.assert_close(decode_boxes(deltas, anchors, weights), gt, atol=1e-4, rtol=0)
        # and the other way round
        d = torch.randn(200, 4, generator=g) * 0.5
        torch.testing.assert_close(encode_boxes(decode_boxes(d, anchors, weights), anchors, weights), d,
                                   atol=1e-4, rtol=1e-4)


def test_encode_broadcasts_over_a_batch():
    gt = torch.tensor([[[2.0, 4.0, 22.0, 24.0]], [[0.0, 0.0, 10.0, 20.0]]])  # [2, 1, 4]
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 20.0, 20.0]])  # [2, 4]
    deltas = encode_boxes(gt, anchors)
    assert deltas.shape == (2, 2, 4)
    torch.testing.assert_close(deltas[1, 0], torch.zeros(4))
    torch.testing.assert_close(deltas[0, 1], torch.tensor([0.1, 0.2, 0.0, 0.0]))


def test_decode_clamps_huge_scale_deltas():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    boxes = decode_boxes(huge, anchor)
    assert bool(torch.isfinite(boxes).all())
    # clamped at log(1000 / 16): a 16 px anchor grows to at most 1000 px
    assert MAX_LOG_SCALE == math.log(1000.0 / 16)
    torch.testing.assert_close(boxes, torch.tensor([[8 - 500.0, 8 - 500.0, 8 + 500.0, 8 + 500.0]]))
    # a huge negative delta shrinks the box to its centre, finitely
    tiny = decode_boxes(-huge, anchor)
    assert bool(torch.isfinite(tiny).all())
    torch.testing.assert_close(tiny, torch.tensor([[8.0, 8.0, 8.0, 8.0]]))
    # the clamp applies after dividing by the weight: 5 * MAX_LOG_SCALE is the limit for ww = 5
    weighted = decode_boxes(torch.tensor([[0.0, 0.0, 1e3, 1e3]]), anchor, (10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(weighted, boxes)


@pytest.mark.parametrize("low_quality", [True, False])
def test_match_anchors_equals_torchvision_matcher_per_image(low_quality):
    from torchvision.models.detection._utils import Matcher as TvMatcher
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(1)
    anchors = _grid_boxes(g, (400,))
    gt = _grid_boxes(g, (4, 6))
    valid = torch.rand(4, 6, generator=g) < 0.8
    valid[:, 0] = True
    matched = match_anchors(batched_iou(gt, valid, anchors), 0.5, 0.4, low_quality)
    tv = TvMatcher(0.5, 0.4, allow_low_quality_matches=low_quality)  # same -1 / -2 codes as ours
    for b in range(4):
        quality = box_iou(gt[b][valid[b]], anchors)
        assert bool((quality.amax(1) > 0).all())  # torchvision also makes a box that overlaps nothing match
        expected = tv(quality)
        rows = valid[b].nonzero().squeeze(1)  # torchvision's index among the valid boxes -> ours among all rows
        expected = torch.where(expected >= 0, rows[expected.clamp(min=0)], expected)
        assert torch.equal(matched[b], expected)


# ----------------------------------------------------------------------------- Matcher / BoxCoder

def test_matcher_by_hand_on_padded_ground_truth():
    # image 0: one box equal to anchor 0, then a padding row (label -1) equal to anchor 2;
    # image 1: a box overlapping anchors 0 and 1 by 7.5 x 10 each (IoU 75 / 125 = 0.6 with both).
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]],
                             [[2.5, 0.0, 12.5, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    gt_labels = torch.tensor([[3, -1], [1, -1]])
    matched = Matcher()(gt_boxes, gt_labels, ANCHORS)
    # image 0: anchor 1 has IoU 1/3 < 0.4 -> background; the padding row matches nothing
    assert torch.equal(matched, torch.tensor([[0, BACKGROUND, BACKGROUND], [0, 0, BACKGROUND]]))
    strict = Matcher(fg_iou_thresh=0.7, bg_iou_thresh=0.4, allow_low_quality=False)(gt_boxes, gt_labels, ANCHORS)
    assert torch.equal(strict, torch.tensor([[0, BACKGROUND, BACKGROUND], [IGNORED, IGNORED, BACKGROUND]]))


def test_matcher_equals_the_functions_it_wraps_and_needs_no_grad():
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 12.0]]], requires_grad=True)
    gt_labels = torch.tensor([[0, 2]])
    matched = Matcher(0.5, 0.3, False)(gt_boxes, gt_labels, ANCHORS)
    assert torch.equal(matched, match_anchors(batched_iou(gt_boxes.detach(), gt_labels >= 0, ANCHORS), 0.5, 0.3, False))
    assert not matched.requires_grad


def test_matcher_rejects_crossed_thresholds():
    with pytest.raises(ValueError, match="bg_iou_thresh 0.6 must be <= fg_iou_thresh 0.5"):
        Matcher(fg_iou_thresh=0.5, bg_iou_thresh=0.6)


def test_box_coder_by_hand():
    anchor = torch.tensor([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), 10 x 20
    gt = torch.tensor([2.0, 4.0, 22.0, 24.0])  # centre (12, 14), 20 x 20
    coder = BoxCoder()
    assert coder.weights == (1.0, 1.0, 1.0, 1.0)
    # dx = 7 / 10, dy = 4 / 20, dw = log 2, dh = 0
    torch.testing.assert_close(coder.encode(gt, anchor), torch.tensor([0.7, 0.2, math.log(2.0), 0.0]))
    torch.testing.assert_close(coder.decode(torch.tensor([0.7, 0.2, math.log(2.0), 0.0]), anchor), gt)
    weighted = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(weighted.encode(gt, anchor), torch.tensor([7.0, 2.0, 5 * math.log(2.0), 0.0]))
    torch.testing.assert_close(weighted.decode(torch.tensor([7.0, 2.0, 5 * math.log(2.0), 0.0]), anchor), gt)
    # bit-identical to the functions it wraps
    assert torch.equal(weighted.encode(gt, anchor), encode_boxes(gt, anchor, (10.0, 10.0, 5.0, 5.0)))


def test_box_coder_decodes_in_the_deltas_dtype_and_checks_its_weights():
    anchors = ANCHORS.double()
    assert BoxCoder().decode(torch.zeros(3, 4), anchors).dtype == torch.float32
    with pytest.raises(ValueError, match="expected 4 numbers"):
        BoxCoder((1.0, 1.0))
