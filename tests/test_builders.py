"""ablate.builders: every config key reaches the part it configures; components never read a config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ablate import builders, losses
from ablate.config import build_config

PACKAGE = Path(__file__).resolve().parents[1] / "ablate"
# Parts that take plain arguments: none may import the config (or the builders that read it).
COMPONENTS = ["matching.py", "losses.py", "criterion.py", "postprocess.py", "engine.py", "evaluation.py",
              "model/anchors.py", "model/retinanet.py", "data/coco.py", "data/synth.py"]


@pytest.mark.parametrize("name", COMPONENTS)
def test_components_do_not_import_the_config(name):
    tree = ast.parse((PACKAGE / name).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"ablate.config", "ablate.builders"}, name


def test_criterion_gets_every_loss_and_matcher_key():
    keys = {"loss.cls": "ohem", "loss.alpha": 0.5, "loss.gamma": 1.0, "loss.beta": 0.5,
            "loss.ohem_batch": 64, "loss.ohem_nms": 0.6, "loss.ohem_fg_fraction": 0.25,
            "loss.normalizer": "ema", "loss.normalizer_momentum": 0.8, "loss.box": "giou",
            "loss.smooth_l1_beta": 0.2, "loss.box_loss_weight": 2.0,
            "model.box_weights": [10.0, 10.0, 5.0, 5.0], "matcher.fg_iou_thresh": 0.6,
            "matcher.bg_iou_thresh": 0.3, "matcher.allow_low_quality": False}
    crit = builders.build_criterion(build_config("paper", keys))
    assert crit.cls_loss is losses.CLS_LOSSES["ohem"] and crit.box_loss is losses.BOX_LOSSES["giou"]
    assert crit.cls_params == {"ohem_batch": 64, "ohem_nms": 0.6, "ohem_fg_fraction": 0.25}
    assert crit.box_params == {} and crit.box_loss_weight == 2.0
    # each loss gets its own keys of the config: alpha to focal, gamma and beta to FL*, the beta to smooth L1
    focal = builders.build_criterion(build_config("paper", {**keys, "loss.cls": "focal", "loss.box": "smooth_l1"}))
    assert focal.cls_params == {"gamma": 1.0, "alpha": 0.5} and focal.box_params == {"smooth_l1_beta": 0.2}
    star = builders.build_criterion(build_config("paper", {**keys, "loss.cls": "focal_star"}))
    assert star.cls_params == {"gamma": 1.0, "beta": 0.5}
    assert (crit.normalizer, crit.normalizer_momentum) == ("ema", 0.8)
    m = crit.matcher
    assert (m.fg_iou_thresh, m.bg_iou_thresh, m.allow_low_quality) == (0.6, 0.3, False)
    assert crit.box_coder.weights == (10.0, 10.0, 5.0, 5.0)


def test_postprocess_gets_every_infer_key_and_the_box_coder():
    cfg = build_config("paper", {"infer.score_thresh": 0.2, "infer.topk_candidates": 50, "infer.nms_thresh": 0.6,
                                 "infer.detections_per_img": 10, "model.box_weights": [2.0, 2.0, 1.0, 1.0]})
    post = builders.build_postprocess(cfg)
    assert (post.score_thresh, post.topk_candidates, post.nms_thresh, post.detections_per_img) == (0.2, 50, 0.6, 10)
    assert post.box_coder.weights == (2.0, 2.0, 1.0, 1.0)


def test_anchor_generator_gets_every_anchor_key():
    cfg = build_config("paper", {"model.anchor_size": 16.0, "model.num_scales": 1, "model.aspect_ratios": [1.0],
                                 "model.anchor_offset": 0.0})
    anchors, per_level = builders.build_anchor_generator(cfg)([(1, 1)] * 5)
    assert per_level == [1] * 5
    # one 16 px anchor on P3 centred at (0, 0) (offset 0), doubling per level
    assert anchors[0].tolist() == [-8.0, -8.0, 8.0, 8.0] and anchors[4].tolist() == [-128.0, -128.0, 128.0, 128.0]


def test_val_loader_reads_the_val_split_in_order(tiny_coco):
    cfg = build_config("tiny", {"data.source": "coco", "data.root": str(tiny_coco), "train.batch_size": 1,
                                "data.cache_images": False})
    val_set, loader = builders.build_val_loader(cfg, builders.data_root(cfg))
    assert len(val_set) == 2 and loader.dataset is val_set
    assert [int(batch.image_ids[0]) for batch in loader] == [10, 11]  # file order, no shuffle, nothing dropped
