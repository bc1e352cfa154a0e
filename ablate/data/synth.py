"""The embedded procedural data set: coloured shapes on cluttered backgrounds, in COCO format.

It stands in for COCO where a laptop CPU is the budget, and is built to keep what makes the
focal-loss paper's problem hard: many classes (shape x colour, 20 by default), small objects
(6-24 px on 128 px images, so a handful of foreground anchors per image against thousands of
background ones), and hard negatives (a textured background, strokes and shapes in colours that
are no class). Each image is a pure function of (seed, split, index), so the set is deterministic
and any image can be re-rendered alone. It is written once, in COCO 2017's layout, into a cache
folder whose name hashes its `SynthSpec`, and read back through `ablate.data.coco.CocoDetection`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ablate.errors import ConfigError, DataError

# Bump when the drawing changes: it is part of the cache folder's hash, so old sets are not reused.
GENERATOR_VERSION = 1

SPLITS = ("train", "val")
SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring", "diamond", "star", "hexagon")
# Saturated or bright: far from the background and distractor tones below.
CLASS_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 70, 240),
    "yellow": (240, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 220, 235),
    "orange": (250, 140, 0),
    "white": (250, 250, 250),
}
# Distractor tones: greys, browns and dull tints, low in saturation and at most mid-bright, so that
# colour (not shape) is what tells a distractor from an object of the same shape.
DULL_COLORS = (
    (70, 70, 70), (110, 110, 110), (140, 140, 140), (115, 80, 50), (90, 65, 40),
    (105, 105, 60), (70, 85, 105), (100, 75, 95), (60, 95, 90), (130, 110, 90),
)
_CLASS_RGB = tuple(CLASS_COLORS.values())
OBJECT_JITTER = 20  # per-channel colour jitter of an object around its class colour
DULL_JITTER = 10
MAX_IOU = 0.3  # a new object is re-placed if its box overlaps an existing one more than this
PLACE_TRIES = 30
SUPERSAMPLE = 4  # shapes are drawn 4x larger then reduced, so small ones keep their outline
# A pixel belongs to a shape when at least this fraction of its sub-pixels do (out of 255).
COVERAGE = 64


@dataclass(frozen=True)
class SynthSpec:
    """What the set is made of: the `synth.*` keys of the config (whose defaults, and why, live
    there; `builders.synth_spec` fills this from a config). Every field is part of the cache
    folder's hash. Sizes are in pixels; the set has num_shapes x num_colors classes."""

    seed: int
    num_train: int  # images per split
    num_val: int
    image_size: int  # square images
    num_shapes: int  # 1..8, of SHAPES
    num_colors: int  # 1..8, of CLASS_COLORS
    min_objects: int  # objects per image, drawn uniformly in [min, max]
    max_objects: int
    min_object_size: int  # object side (sqrt of the box area), log-uniform in [min, max]
    max_object_size: int
    num_distractors: int  # up to this many shapes in no class colour, or strokes, per image
    clutter: float  # 0..1: background texture and pixel noise


def default_cache_dir() -> Path:
    """$ABLATE_CACHE if set, else ~/.cache/ablate."""
    env = os.environ.get("ABLATE_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ablate"


def _spec_hash(spec: SynthSpec) -> str:
    fields = dataclasses.asdict(spec) | {"generator_version": GENERATOR_VERSION}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def synth_root(spec: SynthSpec, cache_dir: str | Path | None = None) -> Path:
    """Where the set for `spec` lives: cache_dir / synth-{hash of spec and generator version}.
    cache_dir None or "" (DataConfig's default) means `default_cache_dir()`."""
    base = default_cache_dir() if cache_dir is None or cache_dir == "" else Path(cache_dir)
    return base / f"synth-{_spec_hash(spec)}"


def class_names(spec: SynthSpec) -> list[str]:
    """The K = num_shapes * num_colors names, "red ellipse" ..., in category-id order (id = i + 1)."""
    colors = list(CLASS_COLORS)[: spec.num_colors]
    return [f"{color} {shape}" for shape in SHAPES[: spec.num_shapes] for color in colors]


def check_spec(spec: SynthSpec) -> None:
    """ConfigError naming the first `synth.*` key out of range."""
    checks = [
        ("num_shapes", 1 <= spec.num_shapes <= len(SHAPES), f"in 1..{len(SHAPES)}"),
        ("num_colors", 1 <= spec.num_colors <= len(CLASS_COLORS), f"in 1..{len(CLASS_COLORS)}"),
        ("num_train", spec.num_train >= 1, ">= 1"),
        ("num_val", spec.num_val >= 1, ">= 1"),
        # Upper bounds: what the generator allocates per image (int16 [S, S, 3]: 96 MB at 4096) and
        # draws per image; 100000 px ended in an allocator traceback, 100000 objects ran for minutes.
        ("image_size", 16 <= spec.image_size <= 4096, "in 16..4096"),
        ("max_objects", spec.max_objects <= 100, "<= 100"),
        ("num_distractors", spec.num_distractors <= 100, "<= 100"),
        ("min_objects", 0 <= spec.min_objects <= spec.max_objects, "in 0..synth.max_objects"),
        ("min_object_size", 2 <= spec.min_object_size <= spec.max_object_size,
         "in 2..synth.max_object_size"),
        ("max_object_size", spec.max_object_size <= spec.image_size, "<= synth.image_size"),
        ("num_distractors", spec.num_distractors >= 0, ">= 0"),
        ("clutter", 0.0 <= spec.clutter <= 1.0, "in [0, 1]"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"synth config: 'synth.{key}' must be {what}")


# ----------------------------------------------------------------------------- drawing


def _unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices (float [V, 2], x y in [0, 1]) of a polygonal shape touching all four sides of
    the unit box, or None for the shapes drawn otherwise."""
    if shape == "triangle":
        return np.array([(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)])
    if shape == "diamond":
        return np.array([(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)])
    if shape == "hexagon":
        return np.array([(0.25, 0.0), (0.75, 0.0), (1.0, 0.5), (0.75, 1.0), (0.25, 1.0), (0.0, 0.5)])
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        # Stretched to the box so that the tips touch its four sides.
        return (pts - pts.min(0)) / (pts.max(0) - pts.min(0))
    return None


@lru_cache(maxsize=4096)
def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """bool [h', w'] pixels of `shape` drawn to fill a w x h box, cropped to its tight extent.

    Each shape touches all four sides of its box, so h' = h and w' = w for every size checked
    (2..48 px, aspect 1/2..2); the crop keeps boxes tight should the coverage rule ever drop
    a thin tip."""
    cw, ch = w * SUPERSAMPLE, h * SUPERSAMPLE
    canvas = Image.new("L", (cw, ch), 0)
    draw = ImageDraw.Draw(canvas)
    box = [0, 0, cw - 1, ch - 1]
    poly = _unit_polygon(shape)
    if poly is not None:
        draw.polygon([tuple(p) for p in poly * (cw - 1, ch - 1)], fill=255)
    elif shape == "ellipse":
        draw.ellipse(box, fill=255)
    elif shape == "rectangle":
        draw.rectangle(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse([0.27 * cw, 0.27 * ch, 0.73 * cw - 1, 0.73 * ch - 1], fill=0)
    elif shape == "cross":
        draw.rectangle([cw / 3, 0, 2 * cw / 3 - 1, ch - 1], fill=255)
        draw.rectangle([0, ch / 3, cw - 1, 2 * ch / 3 - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.asarray(canvas.reduce(SUPERSAMPLE)) >= COVERAGE
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    mask.flags.writeable = False  # shared through the cache
    return mask


def _sample_size(rng: np.random.Generator, spec: SynthSpec) -> tuple[int, int]:
    """(w, h): side sqrt(w*h) log-uniform in [min_object_size, max_object_size], aspect h/w
    log-uniform in [1/2, 2]."""
    side = np.exp(rng.uniform(np.log(spec.min_object_size), np.log(spec.max_object_size)))
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    w = int(np.clip(round(side / np.sqrt(ratio)), 2, spec.image_size))
    h = int(np.clip(round(side * np.sqrt(ratio)), 2, spec.image_size))
    return w, h


@lru_cache(maxsize=16)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """float32 [size, grid]: bilinear weights taking a grid-point field to `size` pixels."""
    pos = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    lo = np.minimum(np.floor(pos).astype(int), grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid), np.float32)
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _background(rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    """int16 [S, S, 3]: a dull base tone plus low-frequency colour blobs scaled by `clutter`."""
    s = spec.image_size
    base = rng.uniform(45, 105) + rng.uniform(-12, 12, size=3)
    field = np.zeros((s, s, 3), np.float32)
    for grid, amp in ((3, 1.0), (7, 0.5)):  # two octaves: broad patches and smaller blobs
        m = _upsample_matrix(s, grid)
        coarse = rng.normal(0.0, amp, size=(grid, grid, 3)).astype(np.float32)
        # field[y, x] = sum_ab m[y, a] coarse[a, b] m[x, b], as two small matmuls
        rows = (m @ coarse.reshape(grid, -1)).reshape(s, grid, 3)
        field += m @ rows
    img = base + 35.0 * spec.clutter * field
    # Capped well below the class colours' brightness so the background never mimics a class.
    return np.clip(np.rint(img), 15, 160).astype(np.int16)


def _jittered(rng: np.random.Generator, color: tuple[int, int, int], amp: int) -> np.ndarray:
    return np.clip(np.asarray(color) + rng.integers(-amp, amp + 1, size=3), 0, 255)


def _draw_distractors(rng: np.random.Generator, spec: SynthSpec, img: np.ndarray) -> None:
    """Paint 0..num_distractors unannotated strokes and shapes in dull colours into `img`
    (int16 [S, S, 3], in place)."""
    s = spec.image_size
    for _ in range(int(rng.integers(0, spec.num_distractors + 1))):
        color = _jittered(rng, DULL_COLORS[rng.integers(len(DULL_COLORS))], DULL_JITTER)
        if rng.random() < 0.5:
            canvas = Image.new("L", (s, s), 0)
            reach = 1.5 * spec.max_object_size
            start = rng.uniform(0, s, size=2)
            pts = start + np.cumsum(rng.uniform(-reach, reach, size=(int(rng.integers(2, 5)), 2)), 0)
            pts = np.vstack([start, np.clip(pts, 0, s - 1)])
            width = int(rng.integers(1, max(2, s // 64) + 1))
            ImageDraw.Draw(canvas).line([tuple(p) for p in pts], fill=255, width=width)
            img[np.asarray(canvas) > 0] = color
        else:
            w, h = _sample_size(rng, spec)
            mask = shape_mask(SHAPES[rng.integers(len(SHAPES))], w, h)
            mh, mw = mask.shape
            x, y = int(rng.integers(0, s - mw + 1)), int(rng.integers(0, s - mh + 1))
            img[y : y + mh, x : x + mw][mask] = color


def _iou(box: tuple[int, int, int, int], others: np.ndarray) -> np.ndarray:
    """IoU of one x y w h box with each of `others` (int [N, 4], x y w h)."""
    x, y, w, h = box
    ix = np.clip(np.minimum(x + w, others[:, 0] + others[:, 2]) - np.maximum(x, others[:, 0]), 0, None)
    iy = np.clip(np.minimum(y + h, others[:, 1] + others[:, 3]) - np.maximum(y, others[:, 1]), 0, None)
    inter = ix * iy
    return inter / (w * h + others[:, 2] * others[:, 3] - inter)


def _place(rng: np.random.Generator, mask: np.ndarray, occupied: np.ndarray,
           boxes: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    """Top-left (x, y) for `mask` fully inside the image, with box IoU <= MAX_IOU against every
    placed box and no pixel shared with a placed object (so no object hides another's extent,
    and each box stays the tight extent of visible pixels); None after PLACE_TRIES misses."""
    s = occupied.shape[0]
    mh, mw = mask.shape
    placed = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    for _ in range(PLACE_TRIES):
        x, y = int(rng.integers(0, s - mw + 1)), int(rng.integers(0, s - mh + 1))
        if len(placed) and _iou((x, y, mw, mh), placed).max() > MAX_IOU:
            continue
        if (occupied[y : y + mh, x : x + mw] & mask).any():
            continue
        return x, y
    return None


def _draw_objects(rng: np.random.Generator, spec: SynthSpec,
                  img: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Paint min_objects..max_objects class objects into `img` (int16 [S, S, 3], in place);
    returns (category_id, x, y, w, h) per object, the box being its pixels' tight extent."""
    s = spec.image_size
    occupied = np.zeros((s, s), bool)
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        label = int(rng.integers(spec.num_shapes * spec.num_colors))
        shape, color = SHAPES[label // spec.num_colors], _CLASS_RGB[label % spec.num_colors]
        mask = shape_mask(shape, *_sample_size(rng, spec))
        at = _place(rng, mask, occupied, boxes)
        if at is None:  # only in configs too crowded for the image
            continue
        x, y = at
        mh, mw = mask.shape
        img[y : y + mh, x : x + mw][mask] = _jittered(rng, color, OBJECT_JITTER)
        occupied[y : y + mh, x : x + mw] |= mask
        boxes.append((x, y, mw, mh))
        objects.append((label + 1, x, y, mw, mh))
    return objects


def render_image(spec: SynthSpec, split: str, index: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Image `index` (0-based) of `split`: uint8 [S, S, 3] RGB and its objects as
    (category_id, x, y, w, h). Independent random streams for background, distractors, objects
    and noise, so e.g. changing `clutter` leaves the objects where they were."""
    seq = np.random.SeedSequence([spec.seed, SPLITS.index(split), index])
    rng_bg, rng_dis, rng_obj, rng_noise = (np.random.default_rng(s) for s in seq.spawn(4))
    img = _background(rng_bg, spec)
    _draw_distractors(rng_dis, spec, img)
    objects = _draw_objects(rng_obj, spec, img)
    amp = int(round(4 * spec.clutter))
    if amp:
        # Grey (not per-channel) noise: texture for the detector, and 3x cheaper for PNG.
        img += rng_noise.integers(-amp, amp + 1, size=img.shape[:2], dtype=np.int16)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), objects


# ----------------------------------------------------------------------------- writing


def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.png"


def _write_split(spec: SynthSpec, root: Path, split: str, count: int, advance) -> None:
    """Render `count` images into root/{split}2017/ and write their COCO JSON."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        pixels, objects = render_image(spec, split, index)
        image_id = index + 1
        Image.fromarray(pixels).save(folder / _file_name(image_id), compress_level=1)
        images.append({"id": image_id, "file_name": _file_name(image_id),
                       "width": spec.image_size, "height": spec.image_size})
        for cat, x, y, w, h in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        advance()
    categories = [{"id": i + 1, "name": name, "supercategory": name.split(" ", 1)[1]}
                  for i, name in enumerate(class_names(spec))]
    doc = {"info": {"description": "ablate synthetic shapes", "version": str(GENERATOR_VERSION)},
           "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(doc, f, separators=(",", ":"))


def _generate(spec: SynthSpec, root: Path, progress: bool) -> None:
    """Write the whole set into `root` (an empty folder), with a rich progress bar if asked."""
    counts = {"train": spec.num_train, "val": spec.num_val}
    if not progress:
        for split, n in counts.items():
            _write_split(spec, root, split, n, lambda: None)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("generating the synthetic data set", total=sum(counts.values()))
            for split, n in counts.items():
                _write_split(spec, root, split, n, lambda: bar.advance(task))
    provenance = dataclasses.asdict(spec) | {"generator_version": GENERATOR_VERSION}
    (root / "synth.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")


def ensure_synth(spec: SynthSpec, cache_dir: str | Path | None = None,
                 progress: bool = True) -> Path:
    """The root of the set for `spec`, generated first if absent.

    Generation writes into a temporary sibling folder renamed into place at the end: a folder
    under the final name is therefore always complete, an interrupted run leaves only a
    `.synth-*.tmp-*` folder, and two processes racing both end with the same, complete set.
    """
    check_spec(spec)
    root = synth_root(spec, cache_dir)
    if root.is_dir():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as e:
        raise DataError(f"{root.parent}: cannot create the data cache folder ({e.strerror})") from None
    try:
        _generate(spec, tmp, progress)
        os.rename(tmp, root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if root.is_dir():  # another process finished first: its set is identical
            return root
        raise DataError(f"{root}: cannot write the synthetic data set ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# ----------------------------------------------------------------------------- statistics


def synth_stats(root: Path) -> dict:
    """Summary of a written set, from its JSON (both splits together unless named per split)."""
    root = Path(root)
    images_per_split, per_image, boxes, cats = {}, [], [], {}
    for split in SPLITS:
        path = root / "annotations" / f"instances_{split}2017.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        images_per_split[split] = len(doc["images"])
        cats = {c["id"]: c["name"] for c in doc["categories"]}
        counts = {im["id"]: 0 for im in doc["images"]}
        for ann in doc["annotations"]:
            counts[ann["image_id"]] += 1
            boxes.append((ann["category_id"], ann["bbox"][2], ann["bbox"][3]))
        per_image += list(counts.values())
    if not images_per_split:
        raise DataError(f"{root}: no annotations/instances_{{train,val}}2017.json found")
    n = np.asarray(per_image, dtype=float)
    b = np.asarray(boxes, dtype=float).reshape(-1, 3)
    side, aspect = np.sqrt(b[:, 1] * b[:, 2]), b[:, 2] / np.maximum(b[:, 1], 1e-9)
    per_class = np.bincount(b[:, 0].astype(int), minlength=max(cats, default=0) + 1)[sorted(cats)]

    def summary(x: np.ndarray, *keys: str) -> dict[str, float]:
        funcs = {"min": np.min, "median": np.median, "mean": np.mean, "max": np.max}
        return {k: round(float(funcs[k](x)), 3) if len(x) else 0.0 for k in keys}

    return {
        "images": images_per_split,
        "num_classes": len(cats),
        "num_objects": int(len(b)),
        "objects_per_image": summary(n, "mean", "min", "max"),
        "object_side": summary(side, "min", "median", "max"),
        "aspect_ratio": summary(aspect, "min", "max"),
        "objects_per_class": summary(per_class.astype(float), "min", "max"),
    }
