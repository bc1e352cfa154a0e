"""Anchors per pyramid level (paper section 4): A = num_scales x num_ratios boxes per location.

On level l (P3..P7, stride 2^l) the anchor side is `size * 2^(l-3)` times the scales
2^(k / num_scales); an aspect ratio r = h / w keeps the area and sets w = s / sqrt(r), h = s * sqrt(r).
Anchors are laid out level by level, then row (y), column (x), anchor: the order in which the
heads flatten their outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def cell_anchors(size: float, num_scales: int, aspect_ratios: Sequence[float]) -> Tensor:
    """The A anchors of one location, centred on (0, 0).

    Returns: float32 [A, 4] x1y1x2y2, A = len(aspect_ratios) * num_scales, ratio-major.
    """
    scales = torch.tensor([2.0 ** (k / num_scales) for k in range(num_scales)], dtype=torch.float64)
    ratios = torch.tensor(list(aspect_ratios), dtype=torch.float64)
    sides = size * scales  # [S]
    ws = (sides[None, :] / ratios.sqrt()[:, None]).reshape(-1)  # [R*S]
    hs = (sides[None, :] * ratios.sqrt()[:, None]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).float()


def grid_anchors(cell: Tensor, height: int, width: int, stride: int, offset: float) -> Tensor:
    """`cell` anchors shifted to every location of an H x W feature map.

    cell: [A, 4]. Returns [H * W * A, 4] in (y, x, a) order; the centre of cell (y, x) is at
    ((x + offset) * stride, (y + offset) * stride) in image pixels.
    """
    ys = (torch.arange(height, dtype=torch.float32) + offset) * stride
    xs = (torch.arange(width, dtype=torch.float32) + offset) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
    return (shifts + cell[None]).reshape(-1, 4)


class AnchorGenerator:
    """All anchors of an image batch, cached per feature-map shape and device.

    Every image of a batch is padded to the same size, so one [N, 4] anchor tensor serves all.
    """

    def __init__(self, size: float = 32.0, num_scales: int = 3,
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), offset: float = 0.5,
                 strides: Sequence[int] = (8, 16, 32, 64, 128)):
        self.strides = tuple(strides)
        self.offset = offset
        self.cells = [cell_anchors(size * 2.0 ** i, num_scales, aspect_ratios)
                      for i in range(len(self.strides))]
        self._cache: dict[tuple, tuple[Tensor, list[int]]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return self.cells[0].shape[0]

    def __call__(self, feature_sizes: Sequence[tuple[int, int]],
                 device: torch.device | str = "cpu") -> tuple[Tensor, list[int]]:
        """Anchors for feature maps of the given (H, W) per level.

        Returns: (anchors float32 [N, 4], num_anchors_per_level list[int]) with N = sum H*W*A.
        """
        key = (tuple(feature_sizes), str(device))
        if key not in self._cache:
            per_level = [grid_anchors(cell, h, w, stride, self.offset)
                         for cell, (h, w), stride in zip(self.cells, feature_sizes, self.strides)]
            self._cache[key] = (torch.cat(per_level).to(device), [len(a) for a in per_level])
        return self._cache[key]


def feature_sizes_for(image_height: int, image_width: int,
                      strides: Sequence[int] = (8, 16, 32, 64, 128)) -> list[tuple[int, int]]:
    """(H, W) of each level for a padded input, as stride-2 3x3 convs with padding 1 produce."""
    sizes = []
    for stride in strides:
        sizes.append((math.ceil(image_height / stride), math.ceil(image_width / stride)))
    return sizes
