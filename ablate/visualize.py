"""Drawing detections onto images for `ablate infer`.

All drawing is torchvision's `draw_bounding_boxes`; this module only picks the boxes, colours,
captions and scale. Small images (the synthetic set is 128 px) are enlarged by a whole-number
factor first, and captions use a TrueType font sized to the image when one can be found (PIL's
built-in fallback is about 10 px tall whatever the image size).
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import draw_bounding_boxes

from ablate.paths import SOFTWARE, SOFTWARE_KEY, atomic_write

# Images whose shorter side is below this are enlarged before drawing, so captions stay legible.
MIN_SHORT_SIDE = 400


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for class `label`, the same on every call.

    Hues step by the golden ratio, so neighbouring labels get far-apart hues for any class count.
    """
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


@functools.cache
def caption_font() -> str | None:
    """Path of a TrueType font for captions, or None to use PIL's small built-in one.

    matplotlib (installed with seaborn) ships DejaVu Sans; it is located without importing
    matplotlib, which would cost about a second.
    """
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
            if path.is_file():
                return str(path)
    return None


def upscale_factor(height: int, width: int, min_short_side: int = MIN_SHORT_SIDE) -> int:
    """The smallest whole factor that brings the shorter side to at least `min_short_side` (>= 1).

    A whole factor keeps nearest-neighbour upsampling free of uneven pixel widths.
    """
    short = min(height, width)
    if short <= 0 or short >= min_short_side:
        return 1
    return math.ceil(min_short_side / short)


def _upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, H*factor, W*factor] by nearest-neighbour repetition."""
    if factor == 1:
        return image
    # Nearest keeps the original pixels exact (no blur) and works on uint8 without a float round trip.
    return F.interpolate(image.unsqueeze(0), scale_factor=factor, mode="nearest").squeeze(0)


def draw_detections(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    class_names: Sequence[str],
    *,
    score_min: float = 0.3,
) -> torch.Tensor:
    """Draw the detections scoring at least `score_min`, each captioned "name 0.87".

    Args:
        image: uint8 [3, H, W].
        boxes: float [N, 4] x1y1x2y2 in `image`'s pixels.
        labels: int64 [N] class indices into `class_names` (an index past the end is captioned
            with the number itself).
        scores: float [N].
        class_names: one name per class index.
        score_min: detections below this score are not drawn.

    Returns:
        uint8 [3, H*f, W*f] on the CPU, where f = `upscale_factor(H, W)` (1 when the shorter side
        is already >= 400 px); boxes are scaled by the same f. One colour per class.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"draw_detections: image must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}")
    factor = upscale_factor(image.shape[1], image.shape[2])
    canvas = _upscale(image.detach().cpu(), factor)

    boxes = boxes.detach().cpu().float().reshape(-1, 4)
    labels = labels.detach().cpu().reshape(-1)
    scores = scores.detach().cpu().float().reshape(-1)
    keep = scores >= score_min
    if not bool(keep.any()):
        return canvas.clone() if factor == 1 else canvas  # never hand back the caller's own tensor

    boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    # Continuous pixel coordinates scale exactly by the enlargement factor.
    boxes = boxes * factor
    # draw_bounding_boxes rejects x1 > x2; clamp to the canvas, then order each pair, so a
    # degenerate or out-of-bounds prediction is still drawn (thin, at the edge) instead of raising.
    boxes = boxes.clamp(min=0.0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=float(canvas.shape[2] - 1))
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=float(canvas.shape[1] - 1))
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)

    names = [class_names[i] if 0 <= i < len(class_names) else str(i) for i in labels.tolist()]
    captions = [f"{name} {score:.2f}" for name, score in zip(names, scores.tolist())]
    colors = [class_color(i) for i in labels.tolist()]
    short_side = min(canvas.shape[1:])
    line_width = max(2, short_side // 200)
    font = caption_font()
    font_size = max(12, short_side // 32) if font is not None else None  # 16 px on a 512 px image
    # Filled caption backgrounds with black text read on any image content.
    return draw_bounding_boxes(
        canvas, boxes, labels=captions, colors=colors, width=line_width,
        font=font, font_size=font_size, fill_labels=True,
    )


def save_png(image: torch.Tensor, path) -> None:
    """Write a uint8 [3, H, W] (or [1, H, W]) tensor as a PNG file, creating the parent folder.

    Atomically (a link at `path` is replaced, never written through), and tagged as ours
    (`is_our_drawing`), so that a rerun may replace it while any other file stays the user's."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"save_png: image must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # PIL rather than torchvision.io, whose image encoders are deprecated since torchvision 0.29.
    pixels = image.detach().cpu().permute(1, 2, 0).numpy()  # [H, W, C], as PIL expects
    info = PngInfo()
    info.add_text(SOFTWARE_KEY, SOFTWARE)
    picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    atomic_write(path, lambda f: picture.save(f, format="PNG", pnginfo=info))

