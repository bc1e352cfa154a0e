"""RetinaNet (paper section 4): trunk + FPN P3-P7 + class and box subnets, with the prior init.

The network maps a batch of images to per-anchor class logits and box deltas; matching, losses and
post-processing live in their own modules and take these tensors as plain inputs. `RetinaNet`
takes plain arguments with the paper's defaults; the trunk, the anchor generator and the two
subnets can be injected instead (as torchvision's RetinaNet takes anchor_generator and head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from ablate.errors import ConfigError
from ablate.model import pretrained
from ablate.model.anchors import AnchorGenerator

# ImageNet statistics: what torchvision's trunks (and any local weights) were trained with.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
RESNET_C3_C5 = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512],
                "resnet50": [512, 1024, 2048], "resnet101": [512, 1024, 2048]}


class TinyTrunk(nn.Module):
    """A narrow residual trunk for CPU presets, built from torchvision's BasicBlock.

    Five stride-2 stages like a ResNet (stem, layer1..layer4), so C3-C5 come from layer2..layer4
    at strides 8, 16, 32, and the same FPN wiring serves both trunks.
    """

    def __init__(self, widths: list[int], norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if len(widths) != 5:
            raise ConfigError(f"model.tiny_widths must list 5 stage widths, got {widths}")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                                  norm_layer(widths[0]), nn.ReLU(inplace=True))
        for i in range(1, 5):
            down = nn.Sequential(nn.Conv2d(widths[i - 1], widths[i], 1, 2, bias=False),
                                 norm_layer(widths[i]))
            block = BasicBlock(widths[i - 1], widths[i], stride=2, downsample=down, norm_layer=norm_layer)
            setattr(self, f"layer{i}", block)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


TRUNKS = ("tiny", *RESNET_C3_C5)
TRUNK_NORMS = ("bn", "frozen_bn")


def build_trunk(name: str = "resnet50", norm: str = "bn", tiny_widths: Sequence[int] = (16, 32, 64, 128, 256),
                weights: str | Path = "") -> tuple[nn.Module, list[int]]:
    """The trunk `name` (tiny | resnet18/34/50/101) with BatchNorm (`norm` "bn") or frozen BatchNorm
    ("frozen_bn"), and its C3-C5 channel counts. `weights`: "" (random init), a torchvision weights
    name of the ResNet (IMAGENET1K_V1: see ablate.model.pretrained) or a local state dict's path."""
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk {name!r} (known: {', '.join(TRUNKS)})")
    if norm not in TRUNK_NORMS:
        raise ValueError(f"unknown trunk norm {norm!r} (known: {', '.join(TRUNK_NORMS)})")
    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    if name == "tiny":
        trunk, channels = TinyTrunk(list(tiny_widths), norm_layer), list(tiny_widths[2:])
    else:
        trunk = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        channels = RESNET_C3_C5[name]
    if weights and pretrained.is_weights_name(str(weights)):
        put_trunk_weights(trunk, pretrained.state_dict(name, str(weights)), str(weights))
    elif weights:
        load_trunk_weights(trunk, Path(weights))
    return trunk, channels


def load_trunk_weights(trunk: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"model.weights: no such file '{path}' (nor a torchvision weights name such as "
                          "IMAGENET1K_V1)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise ConfigError(f"model.weights: cannot load '{path}' ({type(e).__name__})") from e
    put_trunk_weights(trunk, state, str(path))


def put_trunk_weights(trunk: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load an ImageNet classifier's state dict into the trunk; `what` names it in errors."""
    # The ImageNet classifier (fc) has no place in a detector: the FPN stops at layer4, so the
    # trunk's own fc stays unused whether the file has one or not.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if unexpected or missing:
        raise ConfigError(f"model.weights: '{what}' does not fit model.trunk "
                          f"({len(missing)} missing, {len(unexpected)} unexpected keys)")


class Subnet(nn.Module):
    """`num_convs` x (3x3 conv, [GroupNorm], ReLU) then a 3x3 conv to A * out_per_anchor channels.

    Shared across levels. Convs start at N(0, 0.01) with bias 0 (paper 4.1); `final_bias` sets the
    last conv's bias (the prior for the class subnet).
    """

    def __init__(self, in_channels: int, channels: int, num_convs: int, num_anchors: int,
                 out_per_anchor: int, norm: str = "none", final_bias: float = 0.0):
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"unknown head norm {norm!r} (known: none, gn)")
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, 1, 1))
            if norm == "gn":
                layers.append(nn.GroupNorm(min(32, channels // 4), channels))
            layers.append(nn.ReLU(inplace=True))
        self.tower = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels if num_convs else in_channels, num_anchors * out_per_anchor, 3, 1, 1)
        self.out_per_anchor = out_per_anchor
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.out.bias, final_bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: per level [B, C, H_l, W_l] -> [B, sum_l H_l*W_l*A, out_per_anchor]."""
        outputs = []
        for x in features:
            y = self.out(self.tower(x))  # [B, A*D, H, W]
            b, _, h, w = y.shape
            y = y.view(b, -1, self.out_per_anchor, h, w).permute(0, 3, 4, 1, 2)  # [B, H, W, A, D]
            outputs.append(y.reshape(b, -1, self.out_per_anchor))
        return torch.cat(outputs, dim=1)


def prior_bias(prior: float | None) -> float:
    """b = -log((1 - pi) / pi), so that every anchor starts at foreground confidence pi."""
    return 0.0 if prior is None else -math.log((1.0 - prior) / prior)


class RetinaNet(nn.Module):
    """images uint8 or float [B, 3, H, W] -> (cls_logits [B, N, K], box_deltas [B, N, 4], anchors [N, 4]).

    N is the number of anchors of the padded batch; anchors are x1y1x2y2 in input pixels.

    trunk: a name for `build_trunk` (with trunk_norm, tiny_widths and `weights`: a file or a name), or a
    module with layer2..layer4 at strides 8, 16, 32 whose C3-C5 widths `trunk_channels` lists.
    FPN P3-P7 of `fpn_channels`; each subnet `head_convs` convs of `head_channels`, GroupNorm if
    head_norm is "gn" (the paper: "none"); `prior` pi sets the class bias (None: 0). The anchor
    generator (default: the paper's 3 scales x 3 ratios from 32 px) and the subnets (modules
    mapping the P3-P7 list to [B, N, K] / [B, N, 4]) may be injected; they must agree on the anchors
    per location.
    """

    def __init__(self, num_classes: int, *, trunk: str | nn.Module = "resnet50",
                 trunk_channels: Sequence[int] | None = None, trunk_norm: str = "bn",
                 tiny_widths: Sequence[int] = (16, 32, 64, 128, 256), weights: str | Path = "",
                 fpn_channels: int = 256, head_convs: int = 4, head_channels: int = 256, head_norm: str = "none",
                 prior: float | None = 0.01, anchor_generator: AnchorGenerator | None = None,
                 cls_subnet: nn.Module | None = None, box_subnet: nn.Module | None = None):
        super().__init__()
        if isinstance(trunk, str):
            trunk, c3_c5 = build_trunk(trunk, trunk_norm, tiny_widths, weights)
        elif trunk_channels is None:
            raise ValueError("trunk_channels: give the C3-C5 widths of an injected trunk")
        else:
            c3_c5 = list(trunk_channels)
        # P6 from C5 (not P5), as in the paper: force it even when C5 has the FPN's width.
        extra = LastLevelP6P7(c3_c5[-1], fpn_channels)
        extra.use_P5 = False
        self.backbone = BackboneWithFPN(trunk, {"layer2": "c3", "layer3": "c4", "layer4": "c5"},
                                        c3_c5, fpn_channels, extra_blocks=extra)
        self.anchor_generator = anchor_generator or AnchorGenerator()
        a = self.anchor_generator.num_anchors_per_location
        self.num_classes = num_classes
        # Built after the backbone, class subnet first: the order a seed's random init has always followed.
        self.cls_subnet = cls_subnet or Subnet(fpn_channels, head_channels, head_convs, a, num_classes, head_norm,
                                               prior_bias(prior))
        self.box_subnet = box_subnet or Subnet(fpn_channels, head_channels, head_convs, a, 4, head_norm)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def features(self, images: Tensor) -> list[Tensor]:
        """[B, 3, H, W] (uint8 0-255 or float 0-255) -> P3..P7, each [B, C, H_l, W_l]."""
        x = (images.float() - self.mean) / self.std
        if images.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return list(self.backbone(x).values())

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """Returns cls_logits [B, N, K], box_deltas [B, N, 4], anchors [N, 4], anchors per level."""
        feats = self.features(images)
        anchors, per_level = self.anchor_generator([tuple(f.shape[-2:]) for f in feats], images.device)
        return self.cls_subnet(feats), self.box_subnet(feats), anchors, per_level
