"""ablate.visualize: what gets drawn where, the enlargement of small images, and PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ablate.visualize import class_color, draw_detections, save_png, upscale_factor

GRAY = 120
NAMES = ["circle", "square", "triangle"]


def _gray(height: int = 128, width: int = 128) -> torch.Tensor:
    return torch.full((3, height, width), GRAY, dtype=torch.uint8)


def _changed(out: torch.Tensor) -> torch.Tensor:
    """bool [H, W]: pixels of a drawing on `_gray` that are no longer the background."""
    return (out != GRAY).any(dim=0)


def _pixel(out: torch.Tensor, x: int, y: int) -> tuple[int, int, int]:
    return tuple(out[:, y, x].tolist())


def test_upscale_factor():
    assert upscale_factor(128, 128) == 4  # 512 px
    assert upscale_factor(128, 96) == 5  # the shorter side decides: 480 px
    assert upscale_factor(399, 1000) == 2
    assert upscale_factor(400, 300 * 2) == 1
    assert upscale_factor(800, 1333) == 1


def test_small_image_is_enlarged_and_box_outline_drawn():
    image = _gray()
    before = image.clone()
    boxes = torch.tensor([[20.0, 30.0, 80.0, 90.0]])  # -> [80, 120, 320, 360] on the 512 px canvas
    out = draw_detections(image, boxes, torch.tensor([1]), torch.tensor([0.87]), NAMES)
    assert out.shape == (3, 512, 512) and out.dtype == torch.uint8
    assert torch.equal(image, before), "the input image was modified"

    color = class_color(1)
    # Mid-points of the four sides (well away from the caption in the top-left corner).
    assert _pixel(out, 80, 240) == color  # left
    assert _pixel(out, 320, 240) == color  # right
    assert _pixel(out, 200, 360) == color  # bottom
    assert _pixel(out, 200, 120) == color  # top

    changed = _changed(out)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    # Everything drawn (outline and caption) lies on or inside the box...
    assert xs.min() >= 79 and xs.max() <= 321 and ys.min() >= 119 and ys.max() <= 361
    # ...the interior away from the caption is untouched, and so is the area just outside.
    assert not changed[200:340, 100:300].any()
    assert not changed[:, 330:].any() and not changed[370:, :].any()
    # The caption is drawn: a block of changed pixels near the top-left corner inside the box.
    assert changed[122:150, 82:200].sum() > 200


def test_score_min_filters():
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [70.0, 70.0, 120.0, 120.0]])
    labels = torch.tensor([0, 2])
    scores = torch.tensor([0.9, 0.2])
    default = draw_detections(_gray(), boxes, labels, scores, NAMES)
    low = draw_detections(_gray(), boxes, labels, scores, NAMES, score_min=0.1)
    second_box_edge = (4 * 95, 4 * 120 - 1)  # bottom side of the low-scoring box, at 4x
    assert _changed(default)[second_box_edge[1], second_box_edge[0]] == False  # noqa: E712
    assert _pixel(low, *second_box_edge) == class_color(2)
    # The high-scoring box is drawn either way, and nothing else differs in its region.
    assert _pixel(default, 4 * 25, 4 * 10) == class_color(0)
    assert torch.equal(default[:, :200, :200], low[:, :200, :200])
    # A score exactly at the threshold is kept.
    at = draw_detections(_gray(), boxes[1:], labels[1:], torch.tensor([0.3]), NAMES, score_min=0.3)
    assert _changed(at).any()


def test_nothing_to_draw_returns_enlarged_copy():
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    out = draw_detections(image, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), torch.zeros(0), NAMES)
    assert out.shape == (3, 400, 600)
    # Nearest-neighbour enlargement: every source pixel becomes a 4x4 block of itself.
    assert torch.equal(out, image.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2))


def test_large_image_keeps_its_size_and_classes_get_distinct_colours():
    image = _gray(480, 640)
    boxes = torch.tensor([[10.0, 10.0, 200.0, 200.0], [300.0, 100.0, 600.0, 400.0]])
    out = draw_detections(image, boxes, torch.tensor([0, 1]), torch.tensor([0.5, 0.6]), NAMES)
    assert out.shape == (3, 480, 640)
    assert _pixel(out, 105, 200) == class_color(0)
    assert _pixel(out, 450, 400) == class_color(1)
    assert class_color(0) != class_color(1)
    assert len({class_color(i) for i in range(20)}) == 20


def test_out_of_bounds_and_unknown_label_do_not_raise():
    boxes = torch.tensor([[-20.0, 50.0, 300.0, 40.0]])  # outside the image and y1 > y2
    out = draw_detections(_gray(), boxes, torch.tensor([7]), torch.tensor([0.9]), NAMES)
    assert out.shape == (3, 512, 512) and _changed(out).any()


def test_rejects_non_uint8_image():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(torch.zeros(3, 32, 32), torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64),
                        torch.zeros(0), NAMES)


def test_save_png_round_trips(tmp_path):
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "nested" / "out.png"
    save_png(image, path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (53, 37)
        pixels = np.asarray(png)
    np.testing.assert_array_equal(pixels, image.permute(1, 2, 0).numpy())


def test_save_png_grayscale(tmp_path):
    image = torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8)
    save_png(image, tmp_path / "gray.png")
    with Image.open(tmp_path / "gray.png") as png:
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), image[0].numpy())
