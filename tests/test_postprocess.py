"""ablate.postprocess: per-level top-k, threshold, decode, clip, class-wise NMS, per-image cap."""

from __future__ import annotations

import math

import pytest
import torch

from ablate.matching import BoxCoder
from ablate.model.anchors import AnchorGenerator, feature_sizes_for
from ablate.postprocess import Postprocess, clip_to_images, postprocess, top_candidates

K = 4


def _setup(batch: int = 3, seed: int = 0, logit_scale: float = 2.0, delta_scale: float = 0.2):
    gen = AnchorGenerator(size=16.0)
    anchors, per_level = gen(feature_sizes_for(64, 64))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, anchors.shape[0], K, generator=g) * logit_scale - 1.0
    deltas = torch.randn(batch, anchors.shape[0], 4, generator=g) * delta_scale
    return logits, deltas, anchors, per_level


SIZES = torch.tensor([[64, 64], [40, 56], [64, 30]])


# ----------------------------------------------------------------------------- top_candidates

def test_top_candidates_by_hand():
    # 2 levels: anchors 0..2 and 3..4, K = 2
    logits = torch.tensor([[[0.1, 0.9], [0.5, -1.0], [2.0, 0.0], [3.0, -2.0], [1.0, 4.0]]])
    scores, idx, labels = top_candidates(logits, [3, 2], topk=5)
    # level 0 has 6 scores, keeps 5; level 1 has 4 < 5, keeps 4: C = 9
    assert scores.shape == idx.shape == labels.shape == (1, 9)
    assert idx.tolist() == [[2, 0, 1, 0, 2, 4, 3, 4, 3]]
    assert labels.tolist() == [[0, 1, 0, 0, 1, 1, 0, 0, 1]]
    expected = torch.sigmoid(torch.tensor([[2.0, 0.9, 0.5, 0.1, 0.0, 4.0, 3.0, 1.0, -2.0]]))
    torch.testing.assert_close(scores, expected)
    scores, idx, labels = top_candidates(logits, [3, 2], topk=2)
    assert idx.tolist() == [[2, 0, 4, 3]] and labels.tolist() == [[0, 1, 1, 0]]


def test_top_candidates_takes_min_topk_and_level_size():
    logits, _, _, per_level = _setup(batch=2)
    for topk in (1, 10, 100, 1000):
        scores, idx, labels = top_candidates(logits, per_level, topk)
        expected = sum(min(topk, n * K) for n in per_level)
        assert scores.shape == (2, expected)
        # each level's candidates point into that level
        start, col = 0, 0
        for n in per_level:
            c = min(topk, n * K)
            assert bool(((idx[:, col:col + c] >= start) & (idx[:, col:col + c] < start + n)).all())
            start, col = start + n, col + c
        assert bool(((labels >= 0) & (labels < K)).all())
        # the score is that of the anchor and label it names
        picked = torch.sigmoid(logits.gather(1, idx[..., None].expand(-1, -1, K))).gather(2, labels[..., None])
        torch.testing.assert_close(picked[..., 0], scores)


# ----------------------------------------------------------------------------- clip

def test_clip_to_images_uses_each_images_size():
    boxes = torch.tensor([[[-5.0, -5.0, 100.0, 100.0]], [[-5.0, 3.0, 100.0, 20.0]]])
    sizes = torch.tensor([[40, 60], [10, 20]])  # (h, w)
    clipped = clip_to_images(boxes, sizes)
    assert clipped.tolist() == [[[0.0, 0.0, 60.0, 40.0]], [[0.0, 3.0, 20.0, 10.0]]]


# ----------------------------------------------------------------------------- postprocess

def _run(logits, deltas, anchors, per_level, sizes, **kw):
    return postprocess(logits, deltas, anchors, per_level, sizes, **kw)


@pytest.mark.parametrize("topk, dets", [(1000, 100), (30, 7)])
def test_batched_equals_image_by_image(topk, dets):
    logits, deltas, anchors, per_level = _setup()
    kw = dict(score_thresh=0.05, topk_candidates=topk, nms_thresh=0.5, detections_per_img=dets)
    batched = _run(logits, deltas, anchors, per_level, SIZES, **kw)
    assert len(batched) == 3
    for i in range(3):
        (single,) = _run(logits[i:i + 1], deltas[i:i + 1], anchors, per_level, SIZES[i:i + 1], **kw)
        assert len(single["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(batched[i][key], single[key])


def test_score_threshold_and_sorted_scores():
    logits, deltas, anchors, per_level = _setup()
    for thresh in (0.05, 0.3, 0.7):
        dets = _run(logits, deltas, anchors, per_level, SIZES, score_thresh=thresh, detections_per_img=1000)
        for d in dets:
            assert len(d["scores"]) > 0
            assert bool((d["scores"] > thresh).all())
            assert bool((d["scores"][1:] <= d["scores"][:-1]).all())  # decreasing
            assert d["labels"].dtype == torch.int64
            assert bool(((d["labels"] >= 0) & (d["labels"] < K)).all())
    # a threshold above every score leaves nothing, with well-formed empty tensors
    dets = _run(logits, deltas, anchors, per_level, SIZES, score_thresh=0.9999)
    assert [d["boxes"].shape for d in dets] == [(0, 4)] * 3


def test_at_most_detections_per_img():
    logits, deltas, anchors, per_level = _setup()
    for cap in (1, 5, 100):
        dets = _run(logits, deltas, anchors, per_level, SIZES, detections_per_img=cap)
        assert [len(d["scores"]) for d in dets] == [cap] * 3  # plenty of candidates: exactly cap
    many = _run(logits, deltas, anchors, per_level, SIZES, detections_per_img=10_000)
    few = _run(logits, deltas, anchors, per_level, SIZES, detections_per_img=5)
    for m, f in zip(many, few):
        torch.testing.assert_close(f["scores"], m["scores"][:5])  # the cap keeps the best ones


def test_boxes_clipped_to_each_images_own_size():
    logits, deltas, anchors, per_level = _setup(delta_scale=1.0)
    dets = _run(logits, deltas, anchors, per_level, SIZES, detections_per_img=1000)
    for d, (h, w) in zip(dets, SIZES.tolist()):
        b = d["boxes"]
        assert bool((b >= 0).all())
        assert bool((b[:, [0, 2]] <= w).all()) and bool((b[:, [1, 3]] <= h).all())
        # the clipping is active: some box reaches the right and the bottom edge
        assert b[:, 2].max().item() == w and b[:, 3].max().item() == h


def test_class_wise_nms_by_hand():
    # three identical anchors; anchors 0 and 1 predict class 0, anchor 2 class 1
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[30.0, 30.0, 40.0, 40.0]])
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 0] = 2.0, 1.0, 0.5, -1.0
    dets = postprocess(logits, torch.zeros(1, 4, 4), anchors, [4], torch.tensor([[64, 64]]),
                       score_thresh=0.05, nms_thresh=0.5)[0]
    # anchor 1 is suppressed by anchor 0 (same class, IoU 1); anchor 2 survives (other class)
    assert dets["labels"].tolist() == [0, 1, 0]
    torch.testing.assert_close(dets["scores"], torch.sigmoid(torch.tensor([2.0, 0.5, -1.0])))
    torch.testing.assert_close(dets["boxes"], anchors[[0, 2, 3]])
    # the scores are probabilities: sigmoid(-1) = 1 / (1 + e)
    assert dets["scores"][-1].item() == pytest.approx(1 / (1 + math.e), rel=1e-6)


def test_the_box_coder_is_used_for_decoding():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    logits = torch.full((1, 1, 1), 3.0)
    deltas = torch.tensor([[[10.0, 0.0, 0.0, 0.0]]])  # dx 10 with wx 10: a shift of one anchor width
    dets = postprocess(logits, deltas, anchors, [1], torch.tensor([[100, 100]]),
                       box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)))[0]
    torch.testing.assert_close(dets["boxes"], torch.tensor([[10.0, 0.0, 20.0, 10.0]]))
    # unit weights (the default): dx 10 moves the box by ten widths, clipped to the 100 px image
    dets = postprocess(logits, deltas, anchors, [1], torch.tensor([[100, 100]]))[0]
    torch.testing.assert_close(dets["boxes"], torch.tensor([[100.0, 0.0, 100.0, 10.0]]))


def test_postprocess_object_equals_the_function_with_its_arguments():
    anchors, per_level = AnchorGenerator(size=8.0)(feature_sizes_for(32, 32))
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, len(anchors), 3, generator=g) * 2
    deltas = torch.randn(2, len(anchors), 4, generator=g) * 0.2
    sizes = torch.tensor([[32, 32], [20, 30]])
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    post = Postprocess(score_thresh=0.3, topk_candidates=50, nms_thresh=0.4, detections_per_img=7, box_coder=coder)
    got = post(logits, deltas, anchors, per_level, sizes)
    want = postprocess(logits, deltas, anchors, per_level, sizes, 0.3, 50, 0.4, 7, coder)
    assert [len(d["scores"]) for d in got] == [7, 7]
    for a, b in zip(got, want):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    default = Postprocess()
    assert (default.score_thresh, default.topk_candidates, default.nms_thresh, default.detections_per_img) == (
        0.05, 1000, 0.5, 100)


def test_grouped_nms_equals_torchvision_batched_nms():
    from torchvision.ops import batched_nms

    from ablate.postprocess import grouped_nms

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(3000, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(3000, 2, generator=g) * 40], 1)
    scores = torch.rand(3000, generator=g)
    groups = torch.randint(0, 160, (3000,), generator=g)
    ours = grouped_nms(boxes, scores, groups, 0.5)
    theirs = batched_nms(boxes, scores, groups, 0.5)
    assert len(ours) < 3000  # NMS removed something
    assert torch.equal(ours.sort().values, theirs.sort().values)  # the same boxes kept
    assert torch.equal(scores[ours], scores[theirs])  # in the same score order (ties may swap)


def test_two_stage_topk_keeps_the_same_pairs_as_a_full_topk():
    from ablate.postprocess import top_candidates

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 500, 30, generator=g)
    scores, anchor_idx, labels = top_candidates(logits, [400, 100], topk=50)
    for b in range(2):
        for start, n in ((0, 400), (400, 100)):
            full = logits[b, start:start + n].reshape(-1).topk(50).values.sigmoid()
            mine = scores[b][(anchor_idx[b] >= start) & (anchor_idx[b] < start + n)]
            assert torch.equal(mine.sort().values, full.sort().values)
    picked = logits[torch.arange(2)[:, None], anchor_idx, labels].sigmoid()
    assert torch.equal(picked, scores)  # indices and labels point at the scores returned
