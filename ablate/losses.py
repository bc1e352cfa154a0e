"""The classification-loss family of Table 1 and the box losses, as pure tensor functions, and
the registries that pick one by name.

Classification losses are elementwise over sigmoid outputs: logits and 0/1 targets of the same
shape (typically [B, N, K]) in, an unreduced loss of that shape out; the caller masks ignored
anchors, sums and normalises. All are computed from logits (log-sigmoid / softplus) for
numerical stability. Notation of the paper: p = sigmoid(x), p_t = p if y = 1 else 1 - p.

`CLS_LOSSES` and `BOX_LOSSES` map the names of `loss.cls` and `loss.box` to functions that apply a
loss to a matched batch and return its unnormalised sum (see `ClsTargets`, `register_cls_loss`).
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, generalized_box_iou_loss

if TYPE_CHECKING:
    from ablate.matching import BoxCoder


def sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """CE(p_t) = -log(p_t), elementwise. logits, targets: float [...]; returns float [...]."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def alpha_weights(targets: Tensor, alpha: float) -> Tensor:
    """alpha_t: alpha for positives, 1 - alpha for negatives (same shape as targets)."""
    return alpha * targets + (1.0 - alpha) * (1.0 - targets)


def alpha_ce(logits: Tensor, targets: Tensor, alpha: float) -> Tensor:
    """alpha-balanced CE: -alpha_t log(p_t), elementwise."""
    return alpha_weights(targets, alpha) * sigmoid_ce(logits, targets)


def focal(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), elementwise.

    gamma = 0 gives alpha-CE; alpha = None drops the balancing (alpha_t = 1). Equal to
    torchvision.ops.sigmoid_focal_loss(reduction="none") for alpha in [0, 1].
    """
    ce = sigmoid_ce(logits, targets)
    if gamma != 0:
        # (1 - p_t)^gamma as exp(gamma * log sigmoid(-x_t)): for gamma < 1 the power form has an
        # infinite derivative where 1 - p_t rounds to 0 (|x| > ~17), which turns gradients to NaN.
        x_t = logits * (2 * targets - 1)
        ce = ce * torch.exp(gamma * F.logsigmoid(-x_t))
    return ce if alpha is None else alpha_weights(targets, alpha) * ce


def focal_star(logits: Tensor, targets: Tensor, gamma: float = 4.0, beta: float = 0.0) -> Tensor:
    """FL* of the appendix: -log(sigmoid(gamma * x_t + beta)) / gamma, elementwise.

    x_t = x for positives and -x for negatives.
    """
    x_t = logits * (2 * targets - 1)
    return F.softplus(-(gamma * x_t + beta)) / gamma


def per_image_rank(image_index: Tensor, num_images: int) -> Tensor:
    """Rank of each entry among the entries of its image, in the given order.

    image_index: int64 [E] in 0..num_images-1. Returns int64 [E]: 0 for an image's first entry,
    1 for its second, ... (a cumulative count per image, without a loop over images).
    """
    one_hot = F.one_hot(image_index, num_images)  # [E, B]
    return (one_hot.cumsum(0) * one_hot).sum(1) - 1


def ohem_select(example_loss: Tensor, boxes: Tensor, is_fg: Tensor, valid: Tensor,
                batch_size: int = 128, nms_thresh: float = 0.7, fg_fraction: float | None = None,
                num_candidates: int | None = None) -> Tensor:
    """Online hard example mining (Table 1d): which anchors each image keeps for its loss.

    Examples (anchors) are scored by `example_loss`; NMS at `nms_thresh` over their boxes removes
    near-duplicates; each image then keeps its `batch_size` highest-loss survivors. With
    `fg_fraction` (0.25 for the paper's 1:3), at most that share of the batch is foreground and
    background fills the rest.

    example_loss: float [B, N] (e.g. CE summed over classes; detached); boxes: float [B, N, 4]
    (the examples' predicted boxes); is_fg, valid: bool [B, N] (valid excludes ignored anchors).
    num_candidates: examples per image entering NMS (default min(N, 16 * batch_size)): NMS over all
    ~100k anchors would cost far more than the loss itself, and only the top of the ranking survives.
    Returns bool [B, N], the selected examples.
    """
    b, n = example_loss.shape
    k = min(n, num_candidates or 16 * batch_size)
    scores = example_loss.detach().masked_fill(~valid, -1.0)
    max_fg = None if fg_fraction is None else int(batch_size * fg_fraction)
    # Greedy NMS keeps or drops an example by the higher-loss ones alone, so NMS over the top m
    # candidates gives exactly the first survivors of NMS over all k. Try a short prefix first (NMS
    # costs ~quadratically in the candidates: 16 x 2,048 boxes were 40% of a tiny-preset step) and
    # take all k only when some image has too few survivors to fill its batch.
    for m in sorted({min(k, 4 * batch_size), k}):
        flat, kept_image = _nms_survivors(scores, boxes, m, nms_thresh)
        fg = is_fg.reshape(-1)[flat]
        if m == k or _enough_survivors(kept_image, fg, b, batch_size, max_fg):
            break
    if max_fg is None:
        chosen = per_image_rank(kept_image, b) < batch_size
    else:
        fg_rank = per_image_rank(kept_image[fg], b)
        fg_take = fg_rank < max_fg
        num_fg = torch.bincount(kept_image[fg][fg_take], minlength=b)  # [B]
        bg_rank = per_image_rank(kept_image[~fg], b)
        bg_take = bg_rank < (batch_size - num_fg)[kept_image[~fg]]
        chosen = torch.zeros_like(fg)
        chosen[fg] = fg_take
        chosen[~fg] = bg_take
    selected = torch.zeros(b * n, dtype=torch.bool, device=scores.device)
    selected[flat[chosen]] = True
    return selected.view(b, n)


def _nms_survivors(scores: Tensor, boxes: Tensor, m: int, nms_thresh: float) -> tuple[Tensor, Tensor]:
    """NMS within each image over its m highest-scoring valid examples (scores [B, N], -1 for
    invalid; boxes [B, N, 4]). Returns (flat index b * N + i [S], image [S]) of the survivors,
    by decreasing score."""
    b, n = scores.shape
    top_scores, top_idx = scores.topk(m, dim=1)  # [B, m]
    image = torch.arange(b, device=scores.device)[:, None].expand(b, m)
    flat = (image * n + top_idx).reshape(-1)
    ok = top_scores.reshape(-1) >= 0  # drop ignored anchors that fell into the top-m
    flat, cand_scores, cand_image = flat[ok], top_scores.reshape(-1)[ok], image.reshape(-1)[ok]
    keep = batched_nms(boxes.detach().reshape(-1, 4)[flat].float(), cand_scores.float(), cand_image, nms_thresh)
    return flat[keep], cand_image[keep]


def _enough_survivors(kept_image: Tensor, fg: Tensor, b: int, batch_size: int, max_fg: int | None) -> bool:
    """Whether survivors of a prefix already decide every image's selection: batch_size of them
    (plain OHEM), or batch_size backgrounds and max_fg foregrounds (with a fg:bg ratio)."""
    if max_fg is None:
        return bool((torch.bincount(kept_image, minlength=b) >= batch_size).all())
    return bool((torch.bincount(kept_image[~fg], minlength=b) >= batch_size).all()
                and (torch.bincount(kept_image[fg], minlength=b) >= max_fg).all())


def smooth_l1(pred: Tensor, target: Tensor, beta: float = 0.11) -> Tensor:
    """Smooth-L1 per element: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta. [..., 4] -> [..., 4]."""
    if beta == 0:
        return (pred - target).abs()
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta)


def giou_loss(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """1 - GIoU per box pair: [E, 4] x1y1x2y2 each -> [E]."""
    return generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")


class _FocalLossSum(torch.autograd.Function):
    """Sum of the focal loss over valid anchors, computed with its gradient in one pass.

    Measured speed demands it: the elementwise autograd graph of `focal` over [B, N, K] (43M values
    for 8 images x 68k anchors x 80 classes) materialises a dozen tensors of that size. Here the
    loss and d(loss)/d(logits) are formed chunk by chunk in cache-sized buffers that each thread
    reuses, every element first as a negative (`_negative_chunk`), ignored anchors' rows zeroed, then
    the few positives corrected through their flat indices. The weights (alpha_t, the incoming
    gradient) are applied in backward, in the one pass that scales the saved gradient anyway.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, positive_index: Tensor, valid: Tensor, gamma: float,
                alpha: float | None, chunk: int) -> Tensor:
        k = logits.shape[-1]
        flat = logits.detach().reshape(-1, k)  # [R, K], R = B*N anchors
        rows = valid.reshape(-1, 1).to(flat.dtype)  # [R, 1]: 0 on ignored anchors
        grad = torch.empty_like(flat)  # d/dx of the negatives' unweighted sum; positives' set in backward
        negatives = _negative_sum(flat, rows, gamma, chunk, grad)
        # Positives (valid by construction): remove their negative term, add their positive one, which
        # is the negative term of -x.
        x_pos = flat.reshape(-1)[positive_index][:, None]  # [P, 1]
        ones, scratch, g_pos = x_pos.new_ones(x_pos.shape), torch.empty_like(x_pos), torch.empty_like(x_pos)
        as_negatives = _negative_sum(x_pos, ones, gamma, len(x_pos), scratch)
        as_positives = _negative_sum(-x_pos, ones, gamma, len(x_pos), g_pos)
        neg_weight = 1.0 if alpha is None else 1.0 - alpha
        pos_weight = 1.0 if alpha is None else alpha
        ctx.save_for_backward(grad, positive_index, g_pos.reshape(-1))
        ctx.weights, ctx.shape = (neg_weight, pos_weight), logits.shape
        return (negatives - as_negatives) * neg_weight + as_positives * pos_weight

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, positive_index, g_pos = ctx.saved_tensors
        neg_weight, pos_weight = ctx.weights
        # In place: the saved gradient is used once (a second backward fails on its version check).
        grad.mul_(grad_output * neg_weight)
        # d/dx of a positive's loss, the negative term's derivative at -x, is -g_pos(-x).
        grad.view(-1)[positive_index] = g_pos * (-pos_weight * grad_output)
        return grad.view(ctx.shape), None, None, None, None, None


def _negative_sum(flat: Tensor, rows: Tensor, gamma: float, chunk: int, grad: Tensor) -> Tensor:
    """`_negative_chunk` over flat [R, K] (rows [R, 1], grad [R, K]) in chunks of `chunk` rows, each
    thread with two scratch buffers it reuses. Returns the 0-d sum.

    On CPU the chunks are shared out among torch's threads as Python threads, each running its
    chunks' ops single-threaded (torch releases the GIL in them). Measured on the bench batch with
    2 threads against torch's own intra-op threads: 111 against 116 ms (best of 8), and with one of
    the two cores busy elsewhere 186 against 400 ms (median), where each of the ~3,300 ops'
    fork-join waits for a descheduled thread.

    Past x = 88.7, sigmoid(-x) is 0 in float32 (exp(x) overflows), log gives -inf and the sum stops
    being finite: the chunks where that happens are redone with softplus(x) taken as x (exact to
    float precision there), so that the common case pays nothing for such logits.
    """
    k = flat.shape[1]
    chunk = max(1, min(chunk, flat.shape[0]))
    starts = range(0, flat.shape[0], chunk)
    sums = flat.new_empty(len(starts))  # [chunks]: minus each chunk's sum

    def run(chunks: Iterable[int], saturated: bool) -> None:
        work = flat.new_empty(2, chunk * k)
        for i in chunks:
            x = flat[starts[i]:starts[i] + chunk]
            _negative_chunk(x, rows[starts[i]:starts[i] + chunk], gamma, grad[starts[i]:starts[i] + chunk],
                            work[:, :x.numel()].view(2, *x.shape), saturated, sums[i])

    shared = itertools.count()  # each thread takes the next chunk (next() is atomic under the GIL)
    workers = min(torch.get_num_threads(), len(starts)) if flat.device.type == "cpu" else 1
    _on_threads(lambda: run(itertools.takewhile(len(starts).__gt__, shared), False), workers)
    run((~sums.isfinite()).nonzero().flatten().tolist(), True)  # one check for all chunks
    return -sums.sum()


def _on_threads(fn: Callable[[], None], workers: int) -> None:
    """Call fn() on `workers` threads at once, this one among them, with torch's ops single-threaded
    meanwhile (the new threads start with that count too); re-raise the first error after all end.

    torch.set_num_threads is process-wide: a thread elsewhere in the process that made its first
    torch call meanwhile would keep one thread (none in ablate does; its heartbeats use no torch).
    """
    if workers <= 1:
        fn()
        return
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            errors.append(error)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        others = [threading.Thread(target=guarded, daemon=True) for _ in range(workers - 1)]
        for thread in others:
            thread.start()
        guarded()
        for thread in others:
            thread.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


def _negative_chunk(x: Tensor, rows: Tensor, gamma: float, grad: Tensor, buffers: Tensor, saturated: bool,
                    out: Tensor) -> None:
    """Focal loss of logits x as negatives (target 0, no alpha), summed, and its derivative.

    x: float [C, K]; rows: float [C, 1], 1 to count an anchor and 0 to drop it (ignored anchors);
    grad: float [C, K], written with rows * d(loss)/dx; buffers: float [2, C, K] scratch;
    saturated: take softplus(x) as x where sigmoid(-x) underflows (see `_negative_sum`); out: 0-d,
    written with minus the sum of rows * loss (the caller negates the chunks' total once), where
        loss = p^gamma * softplus(x),   d/dx = p^gamma * (p + gamma * (1 - p) * softplus(x)),
    p = sigmoid(x). Each line is one pass over the chunk, in place: the chunk stays in cache, and
    every pass costs (sigmoid and log vectorise, softplus and log1p do not: 5 ns against 1 ns per
    value here), so the formulas are arranged to need as few as possible; softplus is kept negated.
    """
    q, neg_sp = buffers[0], buffers[1]
    torch.neg(x, out=q)
    torch.sigmoid(q, out=q)  # 1 - p, accurate also where p rounds to 1
    if saturated:
        q.clamp_min_(torch.finfo(q.dtype).tiny)  # keep log finite where sigmoid(-x) underflows
    torch.log(q, out=neg_sp)  # -softplus(x) = log(sigmoid(-x))
    if saturated:
        torch.minimum(neg_sp, x.neg(), out=neg_sp)  # softplus(x) > x, and = x where the clamp acted
    torch.sigmoid(x, out=grad)  # p
    if gamma == 0:
        grad.mul_(rows)  # d/dx = p
        torch.sum(neg_sp.mul_(rows).view(-1), 0, out=out)
        return
    q.mul_(neg_sp)
    torch.add(grad, q, alpha=-gamma, out=q)  # p + gamma * (1 - p) * softplus(x)
    if gamma == 2.0:  # the paper's gamma: a multiply instead of pow
        grad.mul_(grad)
    elif gamma != 1.0:
        grad.pow_(gamma)
    grad.mul_(rows)  # p^gamma, 0 on dropped rows
    # torch.sum's cascaded float32 sum, not a dot: a dot's running sums (~100 from a few confident
    # negatives) round off the many terms below their spacing (1e-6 each, 43M of them) and lost
    # 6.5e-6 of the bench batch's loss, against 7e-8 this way.
    torch.sum(neg_sp.mul_(grad).view(-1), 0, out=out)
    grad.mul_(q)


def focal_loss_sum(logits: Tensor, positive_index: Tensor, valid: Tensor, gamma: float = 2.0,
                   alpha: float | None = 0.25, chunk: int | None = None) -> Tensor:
    """sum over valid anchors and classes of `focal(logits, targets, gamma, alpha)`, fast.

    logits: float [B, N, K]; positive_index: int64 [P], flat indices into logits of the positive
    (anchor, class) pairs (all other entries are negatives; positives are on valid anchors);
    valid: bool [B, N], False for ignored anchors. gamma = 0 gives alpha-CE, and alpha = None with
    gamma = 0 plain CE. Returns a scalar that backpropagates into logits. `chunk`: anchors per
    step (default: ~128k values; 64k to 256k measured alike here, 32k slower from per-op overhead).
    """
    chunk = chunk or max(1, 2**17 // logits.shape[-1])
    return _FocalLossSum.apply(logits, positive_index, valid, float(gamma), alpha, chunk)


# ----------------------------------------------------------------------------- registries


@dataclass
class ClsTargets:
    """The classification targets of a matched batch, as the criterion hands them to a loss.

    labels: int64 [B, N], the class (0..K-1) of each anchor's matched box (meaningless, possibly
    -1, where the anchor is not foreground); is_fg, valid: bool [B, N] (valid is False on ignored
    anchors); pred_boxes: () -> float [B, N, 4] x1y1x2y2, the detached predicted boxes, decoded
    only when a loss asks (OHEM's NMS).
    """

    labels: Tensor
    is_fg: Tensor
    valid: Tensor
    pred_boxes: Callable[[], Tensor]

    def positive_index(self, num_classes: int) -> Tensor:
        """int64 [P]: flat indices into [B, N, K] of the positive (foreground anchor, its class) pairs."""
        fg = self.is_fg.reshape(-1)
        return fg.nonzero().squeeze(1) * num_classes + self.labels.reshape(-1)[fg]

    def one_hot(self, logits: Tensor) -> Tensor:
        """0/1 targets shaped like logits [B, N, K]: 1 at (foreground anchor, its class) only."""
        targets = torch.zeros_like(logits)
        targets.scatter_(2, self.labels.clamp(min=0)[..., None], self.is_fg[..., None].to(targets.dtype))
        return targets


class Registry(dict):
    """name -> function, filled by the `register(name)` decorator: the one list of a kind's names
    (the config's choices come from it). Each function declares its hyper-parameters as keyword-only
    arguments; `params_for(name, given)` hands it those and nothing else, so that a misspelt or
    unknown hyper-parameter is an error naming it, never a default taken in silence."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.declared: dict[str, tuple[str, ...]] = {}  # name -> its keyword-only hyper-parameters

    def register(self, name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
        def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            kinds = {p.name: p.kind for p in inspect.signature(fn).parameters.values()}
            if inspect.Parameter.VAR_KEYWORD in kinds.values():
                raise ValueError(f"{self.kind} {name!r}: declare its hyper-parameters by name, not **kwargs")
            self[name] = fn
            self.declared[name] = tuple(k for k, kind in kinds.items() if kind is inspect.Parameter.KEYWORD_ONLY)
            return fn
        return add

    def find(self, name: str) -> Callable[..., Tensor]:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r} (known: {', '.join(self)})")
        return self[name]

    def params_for(self, name: str, given: dict[str, Any]) -> dict[str, Any]:
        """The hyper-parameters of `given` that loss `name` declares; ValueError naming any key that
        no loss of this registry declares (a misspelling)."""
        known = {param for params in self.declared.values() for param in params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"{self.kind}: no loss takes {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(sorted(known))})")
        return {k: v for k, v in given.items() if k in self.declared[name]}


# name -> fn(logits [B, N, K], targets, *, its hyper-parameters) -> scalar: the loss summed over
# valid anchors and classes, not yet normalised.
ClsLossFn = Callable[..., Tensor]
CLS_LOSSES = Registry("classification loss")  # the `loss.cls` values
# name -> fn(pred_deltas [F, 4], gt_boxes [F, 4], anchors [F, 4], box_coder, *, its hyper-parameters)
# -> scalar: the loss summed over the F foreground anchors, not yet normalised.
BoxLossFn = Callable[..., Tensor]
BOX_LOSSES = Registry("box loss")  # the `loss.box` values
register_cls_loss, get_cls_loss = CLS_LOSSES.register, CLS_LOSSES.find
register_box_loss, get_box_loss = BOX_LOSSES.register, BOX_LOSSES.find


# CE, alpha-CE and FL are one family (FL with gamma 0 is alpha-CE; alpha None drops the balance):
# all three take the fused path.
@register_cls_loss("ce")
def ce_sum(logits: Tensor, targets: ClsTargets) -> Tensor:
    return focal_loss_sum(logits, targets.positive_index(logits.shape[-1]), targets.valid, 0.0, None)


@register_cls_loss("alpha_ce")
def alpha_ce_sum(logits: Tensor, targets: ClsTargets, *, alpha: float = 0.25) -> Tensor:
    return focal_loss_sum(logits, targets.positive_index(logits.shape[-1]), targets.valid, 0.0, alpha)


@register_cls_loss("focal")
def focal_sum(logits: Tensor, targets: ClsTargets, *, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    return focal_loss_sum(logits, targets.positive_index(logits.shape[-1]), targets.valid, gamma, alpha)


@register_cls_loss("focal_star")
def focal_star_sum(logits: Tensor, targets: ClsTargets, *, gamma: float = 2.0, beta: float = 1.0) -> Tensor:
    """FL* with the appendix's best setting (gamma 2, beta 1) by default."""
    per_elem = focal_star(logits, targets.one_hot(logits), gamma, beta)
    return (per_elem * targets.valid[..., None]).sum()


@register_cls_loss("ohem")
def ohem_sum(logits: Tensor, targets: ClsTargets, *, ohem_batch: int = 128, ohem_nms: float = 0.7,
             ohem_fg_fraction: float | None = None) -> Tensor:
    """CE over the examples `ohem_select` keeps (Table 1d), ignored anchors never among them."""
    per_elem = sigmoid_ce(logits, targets.one_hot(logits))
    selected = ohem_select(per_elem.detach().sum(-1), targets.pred_boxes(), targets.is_fg, targets.valid,
                           ohem_batch, ohem_nms, ohem_fg_fraction)
    return (per_elem * selected[..., None]).sum()


@register_box_loss("smooth_l1")
def smooth_l1_sum(pred_deltas: Tensor, gt_boxes: Tensor, anchors: Tensor, box_coder: BoxCoder, *,
                  smooth_l1_beta: float = 0.11) -> Tensor:
    return smooth_l1(pred_deltas, box_coder.encode(gt_boxes, anchors), smooth_l1_beta).sum()


@register_box_loss("l1")
def l1_sum(pred_deltas: Tensor, gt_boxes: Tensor, anchors: Tensor, box_coder: BoxCoder) -> Tensor:
    return smooth_l1(pred_deltas, box_coder.encode(gt_boxes, anchors), 0.0).sum()


@register_box_loss("giou")
def giou_sum(pred_deltas: Tensor, gt_boxes: Tensor, anchors: Tensor, box_coder: BoxCoder) -> Tensor:
    """1 - GIoU of the decoded boxes: the loss is on boxes, not on deltas."""
    return giou_loss(box_coder.decode(pred_deltas, anchors), gt_boxes).sum()
