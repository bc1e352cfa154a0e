"""The detection loss: match anchors, build targets, apply the chosen classification loss and the
box loss, normalise by the number of foreground anchors (paper 4.1), for a whole batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from ablate import losses
from ablate.config import LossConfig, MatcherConfig
from ablate.matching import IGNORED, batched_iou, decode_boxes, encode_boxes, match_anchors


class DetectionLoss:
    """Callable: (head outputs, anchors, padded ground truth) -> dict of losses and counts.

    The only state is the EMA of the foreground count when `loss.normalizer == "ema"`.
    """

    def __init__(self, loss_cfg: LossConfig, matcher_cfg: MatcherConfig):
        self.cfg = loss_cfg
        self.matcher = matcher_cfg
        self.ema_num_fg: float | None = None

    def __call__(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
                 gt_boxes: Tensor, gt_labels: Tensor) -> dict[str, Tensor]:
        """cls_logits [B, N, K], box_deltas [B, N, 4], anchors [N, 4], gt_boxes [B, M, 4] x1y1x2y2,
        gt_labels int64 [B, M] (-1 = padding).

        Returns scalar tensors: loss (to backpropagate), loss_cls, loss_box_reg, num_fg, num_bg,
        num_ignored (counts summed over the batch).
        """
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
        with torch.no_grad():
            iou = batched_iou(gt_boxes, gt_labels >= 0, anchors)
            matched = match_anchors(iou, self.matcher.fg_iou_thresh, self.matcher.bg_iou_thresh,
                                    self.matcher.allow_low_quality)  # [B, N]
            is_fg = matched >= 0
            valid = matched != IGNORED
            num_fg = is_fg.sum()
        normalizer = self._normalizer(num_fg)
        loss_cls = self._classification(cls_logits, box_deltas, anchors, gt_labels, matched, is_fg,
                                        valid) / normalizer
        loss_box = self._box_regression(box_deltas, anchors, gt_boxes, matched, is_fg) / normalizer
        loss_box = loss_box * self.cfg.box_loss_weight
        return {"loss": loss_cls + loss_box, "loss_cls": loss_cls.detach(), "loss_box_reg": loss_box.detach(),
                "num_fg": num_fg, "num_bg": (matched == -1).sum(), "num_ignored": (~valid).sum()}

    def _normalizer(self, num_fg: Tensor) -> Tensor:
        if self.cfg.normalizer == "batch":
            return num_fg.clamp(min=1).float()
        # EMA of the batch's foreground count: smooths the loss scale over batches with few objects.
        m = self.cfg.normalizer_momentum
        count = float(num_fg)
        self.ema_num_fg = count if self.ema_num_fg is None else m * self.ema_num_fg + (1 - m) * count
        return torch.tensor(max(1.0, self.ema_num_fg), device=num_fg.device)

    def _classification(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, gt_labels: Tensor,
                        matched: Tensor, is_fg: Tensor, valid: Tensor) -> Tensor:
        """Unnormalised classification loss summed over counted anchors and classes: a scalar."""
        c = self.cfg
        labels = gt_labels.gather(1, matched.clamp(min=0))  # [B, N]
        if c.cls in ("ce", "alpha_ce", "focal"):  # one family: FL with gamma 0 is alpha-CE, alpha None CE
            gamma = c.gamma if c.cls == "focal" else 0.0
            alpha = None if c.cls == "ce" else c.alpha
            k = cls_logits.shape[-1]
            positive_index = is_fg.reshape(-1).nonzero().squeeze(1) * k + labels.reshape(-1)[is_fg.reshape(-1)]
            return losses.focal_loss_sum(cls_logits, positive_index, valid, gamma, alpha)
        targets = torch.zeros_like(cls_logits)
        targets.scatter_(2, labels.clamp(min=0)[..., None], is_fg[..., None].to(targets.dtype))
        if c.cls == "focal_star":
            per_elem = losses.focal_star(cls_logits, targets, c.gamma, c.beta)
        elif c.cls == "ohem":
            per_elem = losses.sigmoid_ce(cls_logits, targets)
            pred_boxes = decode_boxes(box_deltas.detach(), anchors, c.box_weights)
            valid = losses.ohem_select(per_elem.detach().sum(-1), pred_boxes, is_fg, valid,
                                       c.ohem_batch, c.ohem_nms, c.ohem_fg_fraction)
        else:
            raise ValueError(f"unknown classification loss {c.cls!r}")
        return (per_elem * valid[..., None]).sum()

    def _box_regression(self, box_deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, matched: Tensor,
                        is_fg: Tensor) -> Tensor:
        """Unnormalised box loss summed over foreground anchors: a scalar."""
        img, anc = is_fg.nonzero(as_tuple=True)  # [F] each
        pred = box_deltas[img, anc]  # [F, 4]
        gt = gt_boxes[img, matched[img, anc]]  # [F, 4]
        fg_anchors = anchors[anc]
        c = self.cfg
        if c.box == "giou":
            return losses.giou_loss(decode_boxes(pred, fg_anchors, c.box_weights), gt).sum()
        target = encode_boxes(gt, fg_anchors, c.box_weights)
        beta = c.smooth_l1_beta if c.box == "smooth_l1" else 0.0
        return losses.smooth_l1(pred, target, beta).sum()
