"""ablate.losses: the Table 1 classification losses against the paper's formulas, OHEM, box losses."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from ablate import losses

# (logit x, target y) pairs: an easy positive, an easy negative gone wrong, a hard positive, x = 0
PAIRS = [(2.0, 1.0), (2.0, 0.0), (-1.0, 1.0), (0.0, 0.0)]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _p_t(x: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    return p if y == 1 else 1.0 - p


def _xy():
    return _t([x for x, _ in PAIRS]), _t([y for _, y in PAIRS])


# ----------------------------------------------------------------------------- hand values

def test_sigmoid_ce_by_hand():
    x, y = _xy()
    expected = [-math.log(_p_t(a, b)) for a, b in PAIRS]
    torch.testing.assert_close(losses.sigmoid_ce(x, y), _t(expected))
    # the same numbers written out: log(1 + e^-2), log(1 + e^2), log(1 + e), log 2
    torch.testing.assert_close(losses.sigmoid_ce(x, y), _t([0.126928, 2.126928, 1.313262, 0.693147]),
                               atol=1e-6, rtol=0)


def test_alpha_ce_by_hand():
    x, y = _xy()
    alpha = 0.25
    expected = [-(alpha if b == 1 else 1 - alpha) * math.log(_p_t(a, b)) for a, b in PAIRS]
    torch.testing.assert_close(losses.alpha_ce(x, y, alpha), _t(expected))
    torch.testing.assert_close(losses.alpha_ce(x, y, alpha), _t([0.031732, 1.595196, 0.328316, 0.519860]),
                               atol=1e-6, rtol=0)


def test_alpha_weights():
    torch.testing.assert_close(losses.alpha_weights(_t([1.0, 0.0, 1.0]), 0.25), _t([0.25, 0.75, 0.25]))


def test_focal_by_hand():
    x, y = _xy()
    gamma, alpha = 2.0, 0.25
    expected = [-(alpha if b == 1 else 1 - alpha) * (1 - _p_t(a, b)) ** gamma * math.log(_p_t(a, b))
                for a, b in PAIRS]
    torch.testing.assert_close(losses.focal(x, y, gamma, alpha), _t(expected))
    # x = 2, y = 1: p = 0.880797, (1 - p)^2 = 0.014209, CE = 0.126928 -> 0.25 * 0.014209 * 0.126928
    assert losses.focal(_t([2.0]), _t([1.0]), 2.0, 0.25).item() == pytest.approx(0.000450893, rel=1e-4)
    # x = 0, y = 0: p_t = 0.5 -> 0.75 * 0.25 * log 2
    assert losses.focal(_t([0.0]), _t([0.0]), 2.0, 0.25).item() == pytest.approx(0.75 * 0.25 * math.log(2))


def test_focal_gamma_five_and_no_alpha_by_hand():
    x, y = _xy()
    expected = [-(1 - _p_t(a, b)) ** 5 * math.log(_p_t(a, b)) for a, b in PAIRS]
    torch.testing.assert_close(losses.focal(x, y, gamma=5.0, alpha=None), _t(expected))


def test_focal_star_by_hand():
    x, y = _xy()
    for gamma, beta in ((4.0, 0.0), (2.0, 1.0), (4.0, 1.0)):
        expected = []
        for a, b in PAIRS:
            x_t = a if b == 1 else -a
            p_star = 1.0 / (1.0 + math.exp(-(gamma * x_t + beta)))
            expected.append(-math.log(p_star) / gamma)
        torch.testing.assert_close(losses.focal_star(x, y, gamma, beta), _t(expected))
    # x = 0, y = 1, gamma = 4, beta = 1: -log(sigmoid(1)) / 4 = log(1 + e^-1) / 4
    assert losses.focal_star(_t([0.0]), _t([1.0]), 4.0, 1.0).item() == pytest.approx(0.313262 / 4, rel=1e-5)


def test_focal_star_gamma_one_beta_zero_is_ce():
    x, y = _xy()
    torch.testing.assert_close(losses.focal_star(x, y, 1.0, 0.0), losses.sigmoid_ce(x, y))


# ----------------------------------------------------------------------------- relations

def test_focal_gamma_zero_is_alpha_ce():
    x = torch.randn(50, dtype=torch.float64) * 3
    y = (torch.rand(50) < 0.3).double()
    torch.testing.assert_close(losses.focal(x, y, gamma=0.0, alpha=0.25), losses.alpha_ce(x, y, 0.25))
    torch.testing.assert_close(losses.focal(x, y, gamma=0.0, alpha=0.6), losses.alpha_ce(x, y, 0.6))


def test_focal_gamma_zero_without_alpha_is_ce():
    x = torch.randn(50, dtype=torch.float64) * 3
    y = (torch.rand(50) < 0.3).double()
    torch.testing.assert_close(losses.focal(x, y, gamma=0.0, alpha=None), losses.sigmoid_ce(x, y))


def test_focal_matches_torchvision_reference():
    x = torch.randn(4, 30) * 4
    y = (torch.rand(4, 30) < 0.2).float()
    for gamma, alpha in ((2.0, 0.25), (0.5, 0.75), (5.0, 0.5)):
        torch.testing.assert_close(losses.focal(x, y, gamma, alpha),
                                   sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction="none"))


@pytest.mark.parametrize("p_t, factor", [(0.9, 100.0), (0.968, 1.0 / 0.032 ** 2)])
def test_paper_claim_focal_down_weights_easy_examples(p_t, factor):
    # Section 3.2: with gamma = 2, an example at p_t = 0.9 has 100x lower loss than with CE,
    # one at p_t ~= 0.968 about 1000x lower.
    logit = math.log(p_t / (1 - p_t))
    for x, y in ((logit, 1.0), (-logit, 0.0)):  # a positive and a negative at the same p_t
        ce = losses.sigmoid_ce(_t([x]), _t([y])).item()
        fl = losses.focal(_t([x]), _t([y]), gamma=2.0, alpha=None).item()
        assert ce / fl == pytest.approx(factor, rel=1e-6)
    assert 900 < 1.0 / 0.032 ** 2 < 1100  # "about 1000x" for the second case


def test_focal_is_below_ce_and_decreasing_in_p_t():
    p_t = torch.linspace(0.05, 0.99, 50, dtype=torch.float64)
    x = torch.log(p_t / (1 - p_t))
    y = torch.ones_like(x)
    ce = losses.sigmoid_ce(x, y)
    fl = losses.focal(x, y, 2.0, None)
    assert bool((fl < ce).all())
    assert bool((fl[1:] < fl[:-1]).all())
    # and a larger gamma weighs easy examples down more
    assert bool((losses.focal(x, y, 5.0, None) < fl).all())


# ----------------------------------------------------------------------------- stability

def test_focal_star_gradient_by_hand_and_finite_for_large_logits():
    # d/dx [softplus(-(g x + b)) / g] = -sigmoid(-(g x + b)) for y = 1; at x = 0, g = 4, b = 1: -sigmoid(-1)
    x = _t([0.0]).requires_grad_()
    losses.focal_star(x, _t([1.0]), 4.0, 1.0).sum().backward()
    assert x.grad.item() == pytest.approx(-1.0 / (1.0 + math.e), rel=1e-6)
    x = torch.tensor([-1e4, -100.0, -30.0, 30.0, 100.0, 1e4], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    loss = losses.focal_star(x, y, 4.0, 1.0)
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all())
    assert bool(torch.isfinite(x.grad).all())
    # a confidently wrong example keeps a gradient of magnitude ~1; a confidently right one ~0
    torch.testing.assert_close(x.grad, torch.tensor([-1.0, 0.0, -1.0, 1.0, 0.0, 1.0]), atol=1e-6, rtol=0)


LOSS_FNS = {
    "ce": lambda x, y: losses.sigmoid_ce(x, y),
    "alpha_ce": lambda x, y: losses.alpha_ce(x, y, 0.25),
    "focal": lambda x, y: losses.focal(x, y, 2.0, 0.25),
    "focal_no_alpha": lambda x, y: losses.focal(x, y, 2.0, None),
    "focal_gamma_5": lambda x, y: losses.focal(x, y, 5.0, 0.25),
    "focal_star": lambda x, y: losses.focal_star(x, y, 4.0, 0.0),
    "focal_star_beta": lambda x, y: losses.focal_star(x, y, 2.0, 1.0),
}


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_extreme_logits_give_finite_losses_and_gradients(name):
    x = torch.tensor([-100.0, -100.0, 100.0, 100.0, -20.0, 20.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    loss = LOSS_FNS[name](x, y)
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all())
    assert not bool(torch.isnan(x.grad).any())
    assert bool(torch.isfinite(x.grad).all())
    # confidently wrong examples (x = +100 for y = 0, x = -100 for y = 1) keep a large loss
    assert loss[1].item() > 1.0 and loss[2].item() > 1.0
    assert loss[0].item() < 1e-6 and loss[3].item() < 1e-6


# ----------------------------------------------------------------------------- per_image_rank

def test_per_image_rank_by_hand():
    index = torch.tensor([0, 1, 0, 2, 1, 0])
    assert losses.per_image_rank(index, 3).tolist() == [0, 0, 1, 0, 1, 2]
    assert losses.per_image_rank(torch.tensor([2, 2, 2]), 4).tolist() == [0, 1, 2]
    assert losses.per_image_rank(torch.zeros(0, dtype=torch.int64), 2).tolist() == []


# ----------------------------------------------------------------------------- ohem_select

def _far_boxes(b: int, n: int) -> torch.Tensor:
    """n disjoint 10 x 10 boxes per image, 100 px apart."""
    x = torch.arange(n, dtype=torch.float32) * 100
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    return boxes.expand(b, n, 4).clone()


def test_ohem_keeps_top_b_losses_per_image():
    loss = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.8, 0.05]])
    ones = torch.ones(2, 4, dtype=torch.bool)
    sel = losses.ohem_select(loss, _far_boxes(2, 4), ~ones, ones, batch_size=2, nms_thresh=0.7)
    assert sel.tolist() == [[False, True, True, False], [True, False, True, False]]
    # batch larger than the image: all kept
    sel = losses.ohem_select(loss, _far_boxes(2, 4), ~ones, ones, batch_size=10, nms_thresh=0.7)
    assert bool(sel.all())


def test_ohem_nms_removes_the_lower_of_two_overlapping_boxes():
    # boxes 0 and 1 overlap with IoU 100 / 110 = 0.91 > 0.7; box 2 is far away
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0], [100.0, 0.0, 110.0, 10.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    loss = torch.tensor([[0.9, 0.8, 0.1]])
    sel = losses.ohem_select(loss, boxes, ~valid, valid, batch_size=2, nms_thresh=0.7)
    assert sel.tolist() == [[True, False, True]]
    # the higher one is kept whichever it is
    sel = losses.ohem_select(torch.tensor([[0.8, 0.9, 0.1]]), boxes, ~valid, valid, batch_size=2, nms_thresh=0.7)
    assert sel.tolist() == [[False, True, True]]
    # above the overlap, NMS lets both through
    sel = losses.ohem_select(loss, boxes, ~valid, valid, batch_size=2, nms_thresh=0.95)
    assert sel.tolist() == [[True, True, False]]


def test_ohem_nms_does_not_act_across_images():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).expand(2, 1, 4)
    valid = torch.ones(2, 1, dtype=torch.bool)
    sel = losses.ohem_select(torch.tensor([[0.9], [0.1]]), boxes, ~valid, valid, batch_size=1, nms_thresh=0.5)
    assert sel.tolist() == [[True], [True]]


def test_ohem_fg_fraction_caps_foreground_and_fills_with_background():
    loss = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    is_fg = torch.tensor([[True, True, True, False, False, False, False, False]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    sel = losses.ohem_select(loss, _far_boxes(1, 8), is_fg, valid, batch_size=4, nms_thresh=0.7,
                             fg_fraction=0.25)
    # at most int(4 * 0.25) = 1 foreground (the hardest), then the 3 hardest backgrounds
    assert sel.tolist() == [[True, False, False, True, True, True, False, False]]
    assert int((sel & is_fg).sum()) == 1
    # without the ratio: simply the 4 hardest
    sel = losses.ohem_select(loss, _far_boxes(1, 8), is_fg, valid, batch_size=4, nms_thresh=0.7)
    assert sel.tolist() == [[True, True, True, True, False, False, False, False]]


def test_ohem_fg_fraction_with_few_foreground():
    loss = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6, 0.5]])
    is_fg = torch.tensor([[True, False, False, False, False, False]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    sel = losses.ohem_select(loss, _far_boxes(1, 6), is_fg, valid, batch_size=4, nms_thresh=0.7,
                             fg_fraction=0.5)
    # one foreground exists (easy, still taken), backgrounds fill the other 3 places
    assert sel.tolist() == [[True, True, True, True, False, False]]


def test_ohem_never_selects_ignored_anchors():
    loss = torch.tensor([[5.0, 0.2, 0.1, 4.0], [0.0, 3.0, 0.3, 0.2]])
    valid = torch.tensor([[False, True, True, False], [True, False, True, True]])
    is_fg = torch.zeros(2, 4, dtype=torch.bool)
    sel = losses.ohem_select(loss, _far_boxes(2, 4), is_fg, valid, batch_size=2, nms_thresh=0.7)
    assert sel.tolist() == [[False, True, True, False], [False, False, True, True]]
    sel = losses.ohem_select(loss, _far_boxes(2, 4), is_fg, valid, batch_size=4, nms_thresh=0.7)
    assert torch.equal(sel, valid)  # even with room for all, ignored ones stay out
    sel = losses.ohem_select(loss, _far_boxes(2, 4), is_fg, valid, batch_size=4, nms_thresh=0.7,
                             fg_fraction=0.25, num_candidates=2)
    assert not bool((sel & ~valid).any())


# ----------------------------------------------------------------------------- box losses

def test_smooth_l1_by_hand():
    pred = _t([0.05, -0.3, 1.0, 0.0])
    target = _t([0.0, 0.0, 0.0, 0.0])
    beta = 0.11
    # |d| < beta: 0.5 d^2 / beta; else |d| - 0.5 beta
    expected = _t([0.5 * 0.05 ** 2 / beta, 0.3 - 0.5 * beta, 1.0 - 0.5 * beta, 0.0])
    torch.testing.assert_close(losses.smooth_l1(pred, target, beta), expected)
    torch.testing.assert_close(losses.smooth_l1(pred, target, beta), _t([0.0113636, 0.245, 0.945, 0.0]),
                               atol=1e-6, rtol=0)
    # continuous at |d| = beta: both branches give beta / 2
    assert losses.smooth_l1(_t([beta]), _t([0.0]), beta).item() == pytest.approx(beta / 2)


def test_smooth_l1_beta_zero_is_l1():
    pred, target = torch.randn(10, 4), torch.randn(10, 4)
    torch.testing.assert_close(losses.smooth_l1(pred, target, 0.0), (pred - target).abs())


def test_giou_loss_identical_and_disjoint_boxes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 4.0, 50.0, 7.0]])
    torch.testing.assert_close(losses.giou_loss(boxes, boxes), torch.zeros(2))
    # disjoint unit boxes 1 px apart: IoU 0, hull area 3, union 2 -> GIoU = -1/3, loss 4/3
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert losses.giou_loss(a, b).item() == pytest.approx(4 / 3)
    # half overlap: IoU 1/3, hull = union -> loss 2/3
    c = torch.tensor([[0.5, 0.0, 1.5, 1.0]])
    assert losses.giou_loss(a, c).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5])
def test_focal_gradient_finite_for_small_gamma_on_confident_examples(gamma):
    # (1 - p_t)^gamma with gamma < 1 has an infinite slope at p_t = 1; saturated logits must not NaN.
    x = torch.tensor([-20.0, 20.0, 100.0, -100.0], requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0])
    losses.focal(x, t, gamma=gamma, alpha=0.25).sum().backward()
    assert torch.isfinite(x.grad).all()


# CE, alpha-CE (two alphas), FL at gamma 0.5, 1, 2 (with and without alpha), 5
FUSED_SETTINGS = [(0.0, None), (0.0, 0.25), (0.0, 0.75), (0.5, 0.25), (1.0, 0.25), (2.0, 0.25), (2.0, None),
                  (5.0, 0.25)]


@pytest.mark.parametrize("extremes", [(), (20.0, 50.0, 87.0, 88.5), (20.0, 95.0, 200.0)])
@pytest.mark.parametrize("gamma,alpha", FUSED_SETTINGS)
def test_fused_focal_sum_equals_the_elementwise_loss_and_gradient(gamma, alpha, extremes):
    # Reference: autograd through the elementwise `focal` in float64, on the same float32 logits.
    # Extremes, as positives and negatives of both signs: sigmoid(-x) in float32 is subnormal
    # from x = 87.3 and 0 from 88.7, where softplus(x) must be taken as x.
    torch.manual_seed(3)
    b, n, k = 3, 700, 9
    logits = torch.randn(b, n, k) * 4 - 3
    is_fg = torch.rand(b, n) < 0.05
    if extremes:
        values = torch.tensor([0.0, *extremes, *(-v for v in extremes)])
        logits[0, :len(values)] = values[:, None]
        is_fg[0, :len(values)] = True
    valid = (torch.rand(b, n) > 0.1) | is_fg  # positives are never ignored
    labels = torch.randint(0, k, (b, n))
    targets = torch.zeros(b, n, k, dtype=torch.float64)
    targets.view(-1, k)[is_fg.view(-1).nonzero().squeeze(1), labels.view(-1)[is_fg.view(-1)]] = 1.0
    wide = logits.double().requires_grad_()
    reference = (losses.focal(wide, targets, gamma, alpha) * valid[..., None]).sum()
    (g_ref,) = torch.autograd.grad(reference * 0.37, wide)  # a scale, as the normaliser gives
    x = logits.clone().requires_grad_()
    index = is_fg.view(-1).nonzero().squeeze(1) * k + labels.view(-1)[is_fg.view(-1)]
    fused = losses.focal_loss_sum(x, index, valid, gamma, alpha, chunk=64)  # several chunks, a short last one
    (g_fused,) = torch.autograd.grad(fused * 0.37, x)
    torch.testing.assert_close(fused.double(), reference.detach(), rtol=1e-5, atol=0)
    # 1e-5 relative; the absolute 1e-9 covers gradients below ~1e-4 where softplus(x) of a logit
    # under about -8 is -log(sigmoid(-x)), exact only to float32's spacing near 1 (as it always was).
    torch.testing.assert_close(g_fused.double(), g_ref, rtol=1e-5, atol=1e-9)


def test_fused_focal_sum_keeps_the_many_small_terms_of_a_detector_batch():
    # As a detector at its 0.01 prior sees it: 1.3M values of ~1e-6 loss each, a few confident
    # negatives of ~1 each. Sums whose running value is large drop terms below its float32 spacing;
    # the sum must stay within 1e-6 of the float64 reference (default chunks).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 16_384, 80, generator=g) * 0.5 - 4.6
    logits[torch.rand(1, 16_384, generator=g) < 0.002] += 6.0
    valid = torch.rand(1, 16_384, generator=g) > 0.01
    index = torch.tensor([5 * 80 + 3, 700 * 80 + 11])
    targets = torch.zeros(logits.shape, dtype=torch.float64)
    targets.view(-1)[index] = 1.0
    reference = (losses.focal(logits.double(), targets) * valid[..., None]).sum()
    fused = losses.focal_loss_sum(logits, index, valid)
    torch.testing.assert_close(fused.double(), reference, rtol=1e-6, atol=0)


def test_fused_focal_sum_threads_restore_the_thread_count_and_pass_errors_on():
    threads = torch.get_num_threads()
    logits = torch.randn(1, 600, 8)
    valid = torch.ones(1, 600, dtype=torch.bool)
    one_thread = losses.focal_loss_sum(logits, torch.tensor([3]), valid, chunk=600)
    shared = losses.focal_loss_sum(logits, torch.tensor([3]), valid, chunk=7)  # 86 chunks over the threads
    torch.testing.assert_close(shared, one_thread)
    assert torch.get_num_threads() == threads
    calls = []

    def fail():
        calls.append(torch.get_num_threads())
        raise RuntimeError("in a worker")

    with pytest.raises(RuntimeError, match="in a worker"):
        losses._on_threads(fail, 2)
    assert calls == [1, 1]  # both threads ran their ops single-threaded
    assert torch.get_num_threads() == threads


def test_fused_focal_sum_without_positives_or_anchors():
    logits = torch.randn(2, 5, 3, requires_grad=True)
    valid = torch.ones(2, 5, dtype=torch.bool)
    none = torch.zeros(0, dtype=torch.int64)
    loss = losses.focal_loss_sum(logits, none, valid)
    reference = losses.focal(logits, torch.zeros_like(logits)).sum()
    torch.testing.assert_close(loss, reference)
    empty = torch.zeros(2, 0, 3, requires_grad=True)
    assert losses.focal_loss_sum(empty, none, valid[:, :0]).item() == 0.0


def test_normalized_loss_cdf_by_hand():
    from ablate.analysis import normalized_loss_cdf

    fraction, cumulative = normalized_loss_cdf(torch.tensor([3.0, 1.0, 0.0, 4.0]), points=4)
    assert fraction.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert cumulative.tolist() == pytest.approx([0.0, 0.125, 0.5, 1.0])


@pytest.mark.parametrize("fg_fraction", [None, 0.25])
@pytest.mark.parametrize("nms_thresh", [0.5, 0.7])
def test_ohem_short_nms_prefix_selects_as_nms_over_all_candidates(fg_fraction, nms_thresh):
    """The prefix shortcut must pick exactly what NMS over all candidates picks (the exact path is
    forced by a batch too large for any prefix to fill, then compared at the real batch size)."""
    g = torch.Generator().manual_seed(3)
    b, n, batch = 4, 3000, 32
    centers = torch.rand(b, n, 2, generator=g) * 128
    sizes = torch.rand(b, n, 1, generator=g) * 30 + 8
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], -1)
    loss = torch.rand(b, n, generator=g)
    is_fg = torch.rand(b, n, generator=g) < 0.01
    valid = torch.rand(b, n, generator=g) > 0.01
    fast = losses.ohem_select(loss, boxes, is_fg, valid, batch, nms_thresh, fg_fraction)
    # reference: NMS over all 16 * batch candidates in one go, then the same ranking rules
    flat, kept_image = losses._nms_survivors(loss.masked_fill(~valid, -1.0), boxes, 16 * batch, nms_thresh)
    fg = is_fg.reshape(-1)[flat]
    if fg_fraction is None:
        chosen = losses.per_image_rank(kept_image, b) < batch
        expected = torch.zeros(b * n, dtype=torch.bool)
        expected[flat[chosen]] = True
        assert torch.equal(fast.reshape(-1), expected)
    else:
        max_fg = int(batch * fg_fraction)
        for i in range(b):
            mine = kept_image == i
            want = set(flat[mine & fg][:max_fg].tolist())
            want |= set(flat[mine & ~fg][:batch - len(want)].tolist())
            assert set((i * n + fast[i].nonzero().squeeze(1)).tolist()) == want
    assert int(fast.sum()) == b * batch


# ----------------------------------------------------------------------------- registries

def _targets(valid=(True, True, True)) -> losses.ClsTargets:
    """One image, 3 anchors: a0 foreground of class 1, a1 background, a2 background (or ignored)."""
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]]])
    return losses.ClsTargets(labels=torch.tensor([[1, -1, 0]]), is_fg=torch.tensor([[True, False, False]]),
                             valid=torch.tensor([list(valid)]), pred_boxes=lambda: boxes)


def test_the_configs_loss_choices_are_the_registries():
    from ablate.config import ConfigError, apply_overrides, build_config, choices_of

    assert choices_of("loss.cls") == ("ce", "alpha_ce", "focal", "focal_star", "ohem")
    assert choices_of("loss.box") == ("smooth_l1", "l1", "giou")
    with pytest.raises(ConfigError, match="'loss.cls' must be one of ce, alpha_ce, focal, focal_star, ohem"):
        apply_overrides(build_config("tiny"), {"loss.cls": "softmax"}, "--set")


def test_each_loss_declares_its_hyper_parameters_and_gets_only_those():
    assert losses.CLS_LOSSES.declared == {"ce": (), "alpha_ce": ("alpha",), "focal": ("gamma", "alpha"),
                                          "focal_star": ("gamma", "beta"),
                                          "ohem": ("ohem_batch", "ohem_nms", "ohem_fg_fraction")}
    assert losses.BOX_LOSSES.declared == {"smooth_l1": ("smooth_l1_beta",), "l1": (), "giou": ()}
    given = {"alpha": 0.5, "gamma": 1.0, "beta": 0.5}
    assert losses.CLS_LOSSES.params_for("focal_star", given) == {"gamma": 1.0, "beta": 0.5}
    assert losses.CLS_LOSSES.params_for("ce", given) == {}


def test_a_hyper_parameter_no_loss_declares_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"classification loss: no loss takes 'gama' \(known: alpha, beta, gamma"):
        losses.CLS_LOSSES.params_for("focal", {"gama": 1.0, "alpha": 0.25})
    with pytest.raises(TypeError, match="gama"):  # called directly, a misspelling is no silent default either
        losses.focal_sum(torch.zeros(1, 3, 2), _targets(), gama=1.0)


def test_a_loss_taking_any_keyword_is_refused_at_registration():
    with pytest.raises(ValueError, match=r"'test_only_any': declare its hyper-parameters by name"):
        losses.register_cls_loss("test_only_any")(lambda logits, targets, **kwargs: logits.sum())
    assert "test_only_any" not in losses.CLS_LOSSES


def test_unknown_loss_names_raise_and_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown classification loss 'softmax' \(known: ce, alpha_ce, focal"):
        losses.get_cls_loss("softmax")
    with pytest.raises(ValueError, match=r"unknown box loss 'iou' \(known: smooth_l1, l1, giou\)"):
        losses.get_box_loss("iou")
    assert losses.get_cls_loss("ohem") is losses.ohem_sum


def test_register_adds_a_name_once():
    @losses.register_cls_loss("test_only_zero")
    def zero(logits, targets):
        return logits.sum() * 0

    try:
        assert losses.get_cls_loss("test_only_zero") is zero
        with pytest.raises(ValueError, match="registered twice"):
            losses.register_cls_loss("test_only_zero")(zero)
    finally:
        del losses.CLS_LOSSES["test_only_zero"]


def test_cls_targets_positive_index_and_one_hot_by_hand():
    t = _targets()
    # a0's class 1 in a [1, 3, K=2] tensor: flat index 0 * 2 + 1
    assert t.positive_index(2).tolist() == [1]
    torch.testing.assert_close(t.one_hot(torch.zeros(1, 3, 2)), torch.tensor([[[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]))


def test_registered_cls_losses_by_hand_at_zero_logits():
    logits = torch.zeros(1, 3, 2)
    log2 = math.log(2)
    params = {"alpha": 0.25, "gamma": 2.0, "beta": 1.0, "ohem_batch": 128, "ohem_nms": 0.7, "ohem_fg_fraction": None}
    got = {name: fn(logits, _targets(), **losses.CLS_LOSSES.params_for(name, params)).item()
           for name, fn in losses.CLS_LOSSES.items()}
    # 6 elements at p = 0.5: CE log 2 each; alpha-CE 0.25 / 0.75 of it for the 1 positive / 5 negatives;
    # FL a further (1 - p_t)^2 = 1/4; FL* (gamma 2, beta 1) log(1 + e^-1) / 2 each; OHEM keeps all 3 anchors.
    assert got["ce"] == pytest.approx(6 * log2, rel=1e-6)
    assert got["alpha_ce"] == pytest.approx((0.25 + 5 * 0.75) * log2, rel=1e-6)
    assert got["focal"] == pytest.approx((0.25 + 5 * 0.75) * 0.25 * log2, rel=1e-6)
    assert got["focal_star"] == pytest.approx(6 * math.log1p(math.exp(-1)) / 2, rel=1e-6)
    assert got["ohem"] == pytest.approx(6 * log2, rel=1e-6)
    # an ignored anchor (a2) drops out of every one of them: 2 of the 3 anchors remain
    ignored = {name: fn(logits, _targets((True, True, False)), **losses.CLS_LOSSES.params_for(name, params)).item()
               for name, fn in losses.CLS_LOSSES.items()}
    assert ignored["ce"] == pytest.approx(4 * log2, rel=1e-6)
    assert ignored["ohem"] == pytest.approx(4 * log2, rel=1e-6)
    assert ignored["focal_star"] == pytest.approx(4 * math.log1p(math.exp(-1)) / 2, rel=1e-6)


def test_registered_ohem_keeps_ohem_batch_examples():
    logits = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [1.0, 0.0]]])  # a1 the hardest negative, then a2
    kept_one = losses.CLS_LOSSES["ohem"](logits, _targets(), ohem_batch=1)
    # only a1 is kept: CE of logits 3 and 0 as negatives
    assert kept_one.item() == pytest.approx(math.log1p(math.exp(3.0)) + math.log(2), rel=1e-6)


def test_registered_box_losses_by_hand():
    from ablate.matching import BoxCoder

    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    gt = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # target deltas (0.7, 0.2, log 2, 0)
    zero = torch.zeros(1, 4)
    coder = BoxCoder()
    l1 = 0.7 + 0.2 + math.log(2)
    assert losses.BOX_LOSSES["l1"](zero, gt, anchors, coder).item() == pytest.approx(l1, rel=1e-6)
    # smooth L1 with beta 0.11: every |d| is above beta, so each loses beta / 2
    assert losses.BOX_LOSSES["smooth_l1"](zero, gt, anchors, coder).item() == pytest.approx(l1 - 3 * 0.055, rel=1e-6)
    assert losses.BOX_LOSSES["smooth_l1"](zero, gt, anchors, coder, smooth_l1_beta=1.0).item() == pytest.approx(
        (0.49 + 0.04 + math.log(2) ** 2) / 2, rel=1e-6)
    # GIoU on the decoded anchor itself: [0,0,10,20] vs [2,4,22,24]: 8 x 16 = 128 over 200 + 400 - 128;
    # the hull 22 x 24 = 528 adds (528 - 472) / 528
    iou, hull_term = 128 / 472, (528 - 472) / 528
    assert losses.BOX_LOSSES["giou"](zero, gt, anchors, coder).item() == pytest.approx(1 - iou + hull_term, rel=1e-5)
