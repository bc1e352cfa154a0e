"""ablate.model.retinanet: plain arguments with the paper's defaults, injected parts, the prior."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ablate.builders import build_model
from ablate.config import build_config
from ablate.model.anchors import AnchorGenerator
from ablate.model.retinanet import RetinaNet, Subnet, TinyTrunk, prior_bias

SMALL = {"trunk": "tiny", "tiny_widths": (4, 8, 8, 8, 8), "fpn_channels": 8, "head_convs": 1, "head_channels": 8}
IMAGES = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _convs(subnet: Subnet) -> list[nn.Conv2d]:
    return [m for m in subnet.tower if isinstance(m, nn.Conv2d)]


def test_defaults_are_the_papers():
    model = RetinaNet(80)
    assert isinstance(model.backbone.body.layer4[-1].conv3, nn.Conv2d)  # a ResNet-50 bottleneck
    assert model.anchor_generator.num_anchors_per_location == 9  # 3 scales x 3 ratios
    assert len(_convs(model.cls_subnet)) == len(_convs(model.box_subnet)) == 4
    assert _convs(model.cls_subnet)[0].out_channels == 256
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    # pi = 0.01: b = -log(99), the same for every anchor and class
    assert torch.allclose(model.cls_subnet.out.bias, torch.full((9 * 80,), -math.log(99.0)))
    assert prior_bias(None) == 0.0


def test_output_shapes_and_anchors_per_level():
    model = RetinaNet(5, **SMALL).eval()
    cls_logits, box_deltas, anchors, per_level = model(IMAGES)
    # 64 px: P3..P7 are 8x8, 4x4, 2x2, 1x1, 1x1 locations with 9 anchors each
    assert per_level == [9 * n for n in (64, 16, 4, 1, 1)]
    assert cls_logits.shape == (2, 774, 5) and box_deltas.shape == (2, 774, 4) and anchors.shape == (774, 4)


def test_injected_anchor_generator_sets_the_heads_width():
    one = AnchorGenerator(size=16.0, num_scales=1, aspect_ratios=(1.0,))
    model = RetinaNet(5, **SMALL, anchor_generator=one).eval()
    assert model.anchor_generator is one
    assert model.cls_subnet.out.out_channels == 5 and model.box_subnet.out.out_channels == 4
    cls_logits, _, anchors, per_level = model(IMAGES)
    assert per_level == [64, 16, 4, 1, 1] and cls_logits.shape == (2, 86, 5)
    torch.testing.assert_close(anchors[0], torch.tensor([-4.0, -4.0, 12.0, 12.0]))  # 16 px around (4, 4)


def test_injected_trunk_and_subnets_are_used():
    trunk = TinyTrunk([4, 8, 12, 16, 20])
    box = Subnet(8, 8, 0, 9, 4)
    model = RetinaNet(3, trunk=trunk, trunk_channels=[12, 16, 20], fpn_channels=8, head_convs=1, head_channels=8,
                      box_subnet=box)
    assert model.backbone.body.layer1 is trunk.layer1 and model.box_subnet is box
    assert len(_convs(model.cls_subnet)) == 1  # built from the arguments
    with pytest.raises(ValueError, match="trunk_channels"):
        RetinaNet(3, trunk=TinyTrunk([4, 8, 12, 16, 20]))


def test_bad_names_raise():
    with pytest.raises(ValueError, match="unknown trunk 'resnet7'"):
        RetinaNet(3, trunk="resnet7")
    with pytest.raises(ValueError, match="unknown trunk norm 'ln'"):
        RetinaNet(3, **SMALL, trunk_norm="ln")
    with pytest.raises(ValueError, match="unknown head norm 'bn'"):
        RetinaNet(3, **SMALL, head_norm="bn")


def test_builder_passes_every_model_key():
    # The builder's model is the model of the same plain arguments, weight for weight, at one seed.
    cfg = build_config("tiny", {"model.prior": 0.05, "model.anchor_size": 10.0, "model.num_scales": 2,
                                "model.aspect_ratios": [1.0, 2.0], "model.anchor_offset": 0.0})
    torch.manual_seed(0)
    built = build_model(cfg, 20)
    torch.manual_seed(0)
    m = cfg.model
    plain = RetinaNet(20, trunk="tiny", tiny_widths=m.tiny_widths, fpn_channels=64, head_convs=2, head_channels=64,
                      head_norm="gn", prior=0.05,
                      anchor_generator=AnchorGenerator(10.0, 2, (1.0, 2.0), offset=0.0))
    a, b = built.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert built.anchor_generator.num_anchors_per_location == 4
    assert torch.equal(built.anchor_generator([(2, 2)])[0], plain.anchor_generator([(2, 2)])[0])
