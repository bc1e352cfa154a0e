"""The detection loss: match anchors, build targets, apply the chosen classification loss and the
box loss, normalise by the number of foreground anchors (paper 4.1), for a whole batch at once.

The matcher and box coder are injected (`ablate.matching`); the losses are picked by name from the
registries of `ablate.losses`. Every argument is plain, with the paper's default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ablate import losses
from ablate.matching import BACKGROUND, IGNORED, BoxCoder, Matcher

NORMALIZERS = ("batch", "ema")


class DetectionLoss:
    """Callable: (head outputs, anchors, padded ground truth) -> dict of losses and counts.

    cls_loss: a name in `losses.CLS_LOSSES` (ce | alpha_ce | focal | focal_star | ohem), with its
    hyper-parameters alpha (alpha_ce, focal), gamma (focal, focal_star), beta (focal_star) and
    ohem_batch / ohem_nms / ohem_fg_fraction (ohem). box_loss: a name in `losses.BOX_LOSSES`
    (smooth_l1 | l1 | giou), scaled by box_loss_weight. normalizer "batch" divides by the batch's
    foreground anchors, "ema" by their moving average (momentum normalizer_momentum): the only
    state this object keeps.

    On `world_size` processes (DDP, which averages the ranks' gradients) each rank's loss is its
    share of the global loss times world_size: "batch" divides by the foreground count of the
    global batch (`all_sum` adds a tensor over the ranks) over world_size, as the paper normalises
    per minibatch; "ema" keeps a per-rank average of the rank's own count (detectron2's way, no
    communication). On one process both are what they were.
    """

    def __init__(self, *, cls_loss: str = "focal", alpha: float = 0.25, gamma: float = 2.0, beta: float = 1.0,
                 ohem_batch: int = 128, ohem_nms: float = 0.7, ohem_fg_fraction: float | None = None,
                 normalizer: str = "batch", normalizer_momentum: float = 0.9, box_loss: str = "smooth_l1",
                 smooth_l1_beta: float = 0.11, box_loss_weight: float = 1.0, matcher: Matcher | None = None,
                 box_coder: BoxCoder | None = None, world_size: int = 1,
                 all_sum: Callable[[Tensor], Tensor] | None = None):
        if normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {normalizer!r} (known: {', '.join(NORMALIZERS)})")
        self.cls_loss = losses.get_cls_loss(cls_loss)
        # Each loss gets the hyper-parameters it declares (losses.Registry.params_for).
        self.cls_params = losses.CLS_LOSSES.params_for(cls_loss, {
            "alpha": alpha, "gamma": gamma, "beta": beta, "ohem_batch": ohem_batch, "ohem_nms": ohem_nms,
            "ohem_fg_fraction": ohem_fg_fraction})
        self.box_loss = losses.get_box_loss(box_loss)
        self.box_params = losses.BOX_LOSSES.params_for(box_loss, {"smooth_l1_beta": smooth_l1_beta})
        self.box_loss_weight = box_loss_weight
        self.normalizer = normalizer
        self.normalizer_momentum = normalizer_momentum
        self.matcher = matcher or Matcher()
        self.box_coder = box_coder or BoxCoder()
        self.ema_num_fg: float | None = None
        self.world_size = world_size
        self.all_sum = all_sum or (lambda tensor: tensor)

    def __call__(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
                 gt_boxes: Tensor, gt_labels: Tensor) -> dict[str, Tensor]:
        """cls_logits [B, N, K], box_deltas [B, N, 4], anchors [N, 4], gt_boxes [B, M, 4] x1y1x2y2,
        gt_labels int64 [B, M] (-1 = padding).

        Returns scalar tensors: loss (to backpropagate), loss_cls, loss_box_reg, num_fg, num_bg,
        num_ignored (counts summed over the batch).
        """
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
        matched = self.matcher(gt_boxes, gt_labels, anchors)  # [B, N]
        is_fg = matched >= 0
        valid = matched != IGNORED
        num_fg = is_fg.sum()
        normalizer = self._normalizer(num_fg)
        targets = losses.ClsTargets(gt_labels.gather(1, matched.clamp(min=0)), is_fg, valid,
                                    lambda: self.box_coder.decode(box_deltas.detach(), anchors))
        loss_cls = self.cls_loss(cls_logits, targets, **self.cls_params) / normalizer
        loss_box = self._box_regression(box_deltas, anchors, gt_boxes, matched, is_fg) / normalizer
        loss_box = loss_box * self.box_loss_weight
        return {"loss": loss_cls + loss_box, "loss_cls": loss_cls.detach(), "loss_box_reg": loss_box.detach(),
                "num_fg": num_fg, "num_bg": (matched == BACKGROUND).sum(), "num_ignored": (~valid).sum()}

    def state_dict(self) -> dict[str, float | None]:
        """What a resumed run needs to go on computing the same losses: the EMA normaliser."""
        return {"ema_num_fg": self.ema_num_fg}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.ema_num_fg = state["ema_num_fg"]

    def _normalizer(self, num_fg: Tensor) -> Tensor:
        if self.normalizer == "batch":
            return self.all_sum(num_fg.clone()).clamp(min=1).float() / self.world_size
        # EMA of the batch's foreground count: smooths the loss scale over batches with few objects.
        m = self.normalizer_momentum
        count = float(num_fg)
        self.ema_num_fg = count if self.ema_num_fg is None else m * self.ema_num_fg + (1 - m) * count
        return torch.tensor(max(1.0, self.ema_num_fg), device=num_fg.device)

    def _box_regression(self, box_deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, matched: Tensor,
                        is_fg: Tensor) -> Tensor:
        """Unnormalised box loss summed over foreground anchors: a scalar."""
        img, anc = is_fg.nonzero(as_tuple=True)  # [F] each
        pred = box_deltas[img, anc]  # [F, 4]
        gt = gt_boxes[img, matched[img, anc]]  # [F, 4]
        return self.box_loss(pred, gt, anchors[anc], self.box_coder, **self.box_params)
