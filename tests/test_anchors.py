"""ablate.model.anchors: cell anchors, their layout on a grid, the per-level generator, level sizes."""

from __future__ import annotations

import math

import pytest
import torch

from ablate.model.anchors import AnchorGenerator, cell_anchors, feature_sizes_for, grid_anchors

SQRT2 = math.sqrt(2.0)


def _wh(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


def _centres(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)


# ----------------------------------------------------------------------------- cell_anchors

def test_cell_anchors_one_scale_three_ratios_by_hand():
    cell = cell_anchors(32.0, 1, [0.5, 1.0, 2.0])
    # r = h / w keeps the area 32^2: w = 32 / sqrt(r), h = 32 * sqrt(r).
    # r = 0.5: w = 32 * sqrt(2) = 45.2548, h = 32 / sqrt(2) = 22.6274; r = 2 the other way round.
    expected = torch.tensor([
        [-16 * SQRT2, -8 * SQRT2, 16 * SQRT2, 8 * SQRT2],  # r = 0.5
        [-16.0, -16.0, 16.0, 16.0],  # r = 1
        [-8 * SQRT2, -16 * SQRT2, 8 * SQRT2, 16 * SQRT2],  # r = 2
    ])
    assert cell.dtype == torch.float32
    assert cell.shape == (3, 4)
    torch.testing.assert_close(cell, expected)
    w, h = _wh(cell)
    torch.testing.assert_close(w, torch.tensor([45.254834, 32.0, 22.627417]))
    torch.testing.assert_close(h, torch.tensor([22.627417, 32.0, 45.254834]))


def test_cell_anchors_area_ratio_and_centre():
    ratios = [0.5, 1.0, 2.0]
    cell = cell_anchors(32.0, 1, ratios)
    w, h = _wh(cell)
    torch.testing.assert_close(w * h, torch.full((3,), 1024.0))  # area preserved
    torch.testing.assert_close(h / w, torch.tensor(ratios))  # ratio is h / w
    torch.testing.assert_close(_centres(cell), torch.zeros(3, 2))  # centred on (0, 0)


def test_cell_anchors_scales_are_powers_of_two_to_the_k_thirds():
    cell = cell_anchors(32.0, 3, [1.0])
    w, h = _wh(cell)
    expected = torch.tensor([32.0, 32.0 * 2 ** (1 / 3), 32.0 * 2 ** (2 / 3)])  # 32, 40.32, 50.80
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(h, expected)
    torch.testing.assert_close(w, torch.tensor([32.0, 40.317474, 50.796834]))


def test_cell_anchors_layout_is_ratio_major():
    cell = cell_anchors(32.0, 3, [0.5, 1.0, 2.0])
    assert cell.shape == (9, 4)
    w, h = _wh(cell)
    # index = ratio * num_scales + scale
    for r_i, r in enumerate([0.5, 1.0, 2.0]):
        for s_i in range(3):
            side = 32.0 * 2 ** (s_i / 3)
            i = r_i * 3 + s_i
            assert w[i].item() == pytest.approx(side / math.sqrt(r), rel=1e-6)
            assert h[i].item() == pytest.approx(side * math.sqrt(r), rel=1e-6)


# ----------------------------------------------------------------------------- grid_anchors

CELL = torch.tensor([[-1.0, -2.0, 1.0, 2.0], [-3.0, -3.0, 3.0, 3.0]])  # A = 2


def test_grid_anchors_order_y_x_a_offset_half():
    boxes = grid_anchors(CELL, height=2, width=3, stride=8, offset=0.5)
    assert boxes.shape == (2 * 3 * 2, 4)
    # centres of cell (y, x) at ((x + .5) * 8, (y + .5) * 8): x in 4, 12, 20; y in 4, 12
    expected_centres = torch.tensor([
        [4, 4], [4, 4], [12, 4], [12, 4], [20, 4], [20, 4],
        [4, 12], [4, 12], [12, 12], [12, 12], [20, 12], [20, 12],
    ], dtype=torch.float32)
    torch.testing.assert_close(_centres(boxes), expected_centres)
    torch.testing.assert_close(boxes[0], torch.tensor([3.0, 2.0, 5.0, 6.0]))  # (0, 0, a0)
    torch.testing.assert_close(boxes[1], torch.tensor([1.0, 1.0, 7.0, 7.0]))  # (0, 0, a1)
    torch.testing.assert_close(boxes[2], torch.tensor([11.0, 2.0, 13.0, 6.0]))  # (0, 1, a0)
    torch.testing.assert_close(boxes[6], torch.tensor([3.0, 10.0, 5.0, 14.0]))  # (1, 0, a0)
    torch.testing.assert_close(boxes[11], torch.tensor([17.0, 9.0, 23.0, 15.0]))  # (1, 2, a1)


def test_grid_anchors_offset_zero():
    boxes = grid_anchors(CELL, height=2, width=3, stride=8, offset=0.0)
    expected_centres = torch.tensor([
        [0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0],
        [0, 8], [0, 8], [8, 8], [8, 8], [16, 8], [16, 8],
    ], dtype=torch.float32)
    torch.testing.assert_close(_centres(boxes), expected_centres)
    # the shapes repeat the cell's
    shapes = boxes - _centres(boxes).repeat(1, 2)  # each box minus its centre
    torch.testing.assert_close(shapes.view(6, 2, 4), CELL.expand(6, 2, 4))


# ----------------------------------------------------------------------------- AnchorGenerator

def test_generator_counts_per_level_for_128px():
    gen = AnchorGenerator()  # 3 scales x 3 ratios, strides 8..128
    assert gen.num_anchors_per_location == 9
    sizes = feature_sizes_for(128, 128)
    assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    anchors, per_level = gen(sizes)
    assert per_level == [256 * 9, 64 * 9, 16 * 9, 4 * 9, 1 * 9]
    assert per_level == [2304, 576, 144, 36, 9]
    assert anchors.shape == (3069, 4)
    assert anchors.dtype == torch.float32


def test_generator_levels_double_the_anchor_size():
    gen = AnchorGenerator(size=32.0, num_scales=3, aspect_ratios=(0.5, 1.0, 2.0), offset=0.5)
    anchors, per_level = gen(feature_sizes_for(128, 128))
    # first anchor of P3: cell (0, 0), ratio 0.5, scale 0, centred at (4, 4)
    torch.testing.assert_close(anchors[0], torch.tensor([4 - 16 * SQRT2, 4 - 8 * SQRT2, 4 + 16 * SQRT2, 4 + 8 * SQRT2]))
    # P7: one location centred at (64, 64); ratio 1, scale 0 (index 3) is a 512 x 512 square
    p7 = anchors[-9:]
    torch.testing.assert_close(p7[3], torch.tensor([64 - 256.0, 64 - 256.0, 64 + 256.0, 64 + 256.0]))
    torch.testing.assert_close(_centres(p7), torch.full((9, 2), 64.0))
    # the square ratio-1 scale-0 anchor side per level: 32, 64, 128, 256, 512
    starts = [0, 2304, 2304 + 576, 2304 + 576 + 144, 2304 + 576 + 144 + 36]
    sides = [(anchors[s + 3, 2] - anchors[s + 3, 0]).item() for s in starts]
    assert sides == pytest.approx([32.0, 64.0, 128.0, 256.0, 512.0])


def test_generator_cache_returns_the_same_object():
    gen = AnchorGenerator()
    sizes = feature_sizes_for(128, 128)
    first = gen(sizes)
    second = gen(list(sizes), "cpu")
    assert second is first
    assert second[0] is first[0]
    other = gen(feature_sizes_for(64, 64))
    assert other[0] is not first[0]
    assert other[0].shape[0] == 9 * (64 + 16 + 4 + 1 + 1)


# ----------------------------------------------------------------------------- feature_sizes_for

def test_feature_sizes_for_non_multiples_use_ceil():
    # 600 / 8 = 75, 900 / 8 = 112.5 -> 113; 600 / 16 = 37.5 -> 38, 900 / 16 = 56.25 -> 57; ...
    assert feature_sizes_for(600, 900) == [(75, 113), (38, 57), (19, 29), (10, 15), (5, 8)]
    assert feature_sizes_for(1, 1) == [(1, 1)] * 5
    assert feature_sizes_for(33, 8, strides=(8, 16)) == [(5, 1), (3, 1)]


@pytest.mark.parametrize("size", [1, 7, 31, 100, 127, 600, 601, 999])
def test_feature_sizes_match_a_chain_of_stride_two_convs(size):
    # out = floor((in + 2 * 1 - 3) / 2) + 1 for a 3x3 stride-2 conv with padding 1
    chain, s = {}, size
    for stride in (2, 4, 8, 16, 32, 64, 128):
        s = (s + 2 - 3) // 2 + 1
        chain[stride] = s
    assert [h for h, _ in feature_sizes_for(size, size)] == [chain[st] for st in (8, 16, 32, 64, 128)]
