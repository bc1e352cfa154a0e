"""A COCO-format detection set, its transforms and its collate.

Read from COCO 2017's layout (ROOT/annotations/instances_{split}2017.json, images in ROOT/{split}2017/),
from any annotation file and image folder (`read_files`: exports of Roboflow, CVAT, Label Studio),
or from a document already in memory (`Annotations`: Pascal VOC converted by ablate.data.voc).
The JSON is checked up front and turned into flat per-image box arrays once, so that a sample
costs one image decode plus a resize; anything wrong with the input is a one-line `DataError`
naming the file (and the field or annotation) at fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image
from torchvision.transforms import v2

from ablate.data import decoded
from ablate.errors import DataError
from ablate.paths import check_name_lengths


@dataclass
class DataStats:
    """What the reader kept and what it left out, for the run log."""

    num_images: int  # images kept (after max_images / category filtering)
    num_boxes: int  # boxes kept
    num_crowd: int  # iscrowd=1 boxes ignored
    num_degenerate: int  # boxes of zero or negative width/height after clipping, dropped
    num_empty_images: int  # kept images left with no box (pure-background images)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class _Boxes:
    """Kept boxes of all kept images, flat: image i owns rows offsets[i]:offsets[i + 1]."""

    boxes: np.ndarray  # float32 [M, 4] x1 y1 x2 y2, clipped to the image
    labels: np.ndarray  # int64 [M] contiguous 0..K-1
    offsets: np.ndarray  # int64 [num_images + 1]
    num_crowd: int
    num_degenerate: int
    degenerate: np.ndarray  # bool [num annotations in the JSON]: dropped for having no area


@dataclass
class Annotations:
    """A COCO-format document (images, annotations, categories), the file it stands for (named in
    every message about it) and the folder its images' file names are relative to."""

    doc: dict[str, Any]
    ann_file: Path
    img_dir: Path
    # The file that describes each image, by image id, where it is not `ann_file` (a VOC image's XML):
    # messages about one image name it.
    sources: dict[int, Path] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- reading the JSON


def locate(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of `split` under `root`, both checked to exist."""
    root = check_name_lengths(root, "data.root")
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    img_dir = root / f"{split}2017"
    expected = f"expected annotations/instances_{split}2017.json and {split}2017/"
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found ({expected})")
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: annotation file not found ({expected} under {root})")
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found ({expected} under {root})")
    return ann_file, img_dir


def check_files(ann_file: str | Path, img_dir: str | Path | None) -> tuple[Path, Path]:
    """(annotation file, image folder), both checked to exist; the folder defaults to the file's own
    (Roboflow exports keep them together)."""
    ann_file = check_name_lengths(ann_file, "annotation file")
    img_dir = check_name_lengths(img_dir, "image folder") if img_dir else ann_file.parent
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: annotation file not found")
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found (the images of {ann_file})")
    return ann_file, img_dir


def read_files(ann_file: str | Path, img_dir: str | Path | None = None) -> Annotations:
    """A COCO-format annotation file and its image folder (default: the file's folder), read."""
    ann_file, img_dir = check_files(ann_file, img_dir)
    return Annotations(read_json(ann_file), ann_file, img_dir)


def read_json(ann_file: Path) -> dict[str, Any]:
    """The annotation document, with its three top-level lists checked to be there."""
    try:
        doc = json.loads(ann_file.read_bytes())
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise DataError(f"{ann_file}: malformed JSON: {e.msg} ({where})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{ann_file}: malformed JSON: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise DataError(f"{ann_file}: malformed JSON: nested too deeply for an annotation file") from None
    except OSError as e:
        raise DataError(f"{ann_file}: cannot read ({e.strerror})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{ann_file}: expected a JSON object with 'images', 'annotations' and "
                        "'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise DataError(f"{ann_file}: missing top-level field '{key}'")
        if not isinstance(doc[key], list):
            raise DataError(f"{ann_file}: top-level field '{key}' must be a list")
    return doc


def _field(entry: Any, key: str, what: str, ann_file: Path, kinds: tuple[type, ...]) -> Any:
    """entry[key], checked to exist and be one of `kinds`; `what` names the entry."""
    if not isinstance(entry, dict):
        raise DataError(f"{ann_file}: {what}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{ann_file}: {what}: missing field '{key}'")
    value = entry[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(f"{ann_file}: {what}: field '{key}' has the wrong type ({value!r:.40})")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:  # ids go into int64 arrays
        raise DataError(f"{ann_file}: {what}: field '{key}' = {value:.3g} does not fit a 64-bit integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{ann_file}: {what}: field '{key}' must be a finite number, got {value}")
    return value


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _entry_name(kind: str, entry: Any, i: int) -> str:
    """'annotation id 17' (or 'annotation #3' when it has no usable id), for messages."""
    eid = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind} id {eid}" if isinstance(eid, (int, str)) else f"{kind} #{i}"


def inside_folder(file_name: str) -> bool:
    """Whether an image's file name stays inside its image folder (relative, no '..'): an annotation
    file must not make us read, or name in messages, files elsewhere on the machine."""
    posix = PurePosixPath(file_name.replace("\\", "/"))
    return bool(file_name) and not posix.is_absolute() and not PureWindowsPath(file_name).drive \
        and ".." not in posix.parts


def _file_name(entry: Any, what: str, ann_file: Path) -> str:
    name = _field(entry, "file_name", what, ann_file, (str,))
    if not inside_folder(name):
        raise DataError(f"{ann_file}: {what}: file_name {name!r} is not a relative path inside the image "
                        "folder (absolute, or with '..')")
    return name


# The largest image side an annotation may declare: past it (and PIL's pixel limit, which
# decode_image applies) there is no image to read.
MAX_SIDE = 1 << 20


def index_images(images: list, ann_file: Path) -> dict[str, np.ndarray]:
    """Image table sorted by id: ids int64 [N], file names str [N], heights/widths int64 [N]."""
    rows = []
    for i, im in enumerate(images):
        what = _entry_name("image", im, i)
        height, width = (_field(im, key, what, ann_file, (int, float)) for key in ("height", "width"))
        if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
            raise DataError(f"{ann_file}: {what}: 'width' x 'height' must be in 1..{MAX_SIDE} pixels, "
                            f"got {width:.6g} x {height:.6g}")
        rows.append((_field(im, "id", what, ann_file, (int,)), _file_name(im, what, ann_file), height, width))
    rows.sort()
    ids = np.array([r[0] for r in rows], dtype=np.int64).reshape(-1)
    if len(ids) > 1 and (dup := ids[1:][ids[1:] == ids[:-1]]).size:
        raise DataError(f"{ann_file}: image id {int(dup[0])} appears twice in 'images'")
    return {"ids": ids, "file_names": np.array([r[1] for r in rows], dtype=str),
            "heights": np.array([r[2] for r in rows], dtype=np.int64),
            "widths": np.array([r[3] for r in rows], dtype=np.int64)}


def category_table(categories: list, ann_file: Path,
                   wanted: Sequence[str]) -> tuple[list[int], list[str]]:
    """(category ids, names) sorted by id, restricted to the names in `wanted` if any."""
    cats = []
    for i, c in enumerate(categories):
        what = _entry_name("category", c, i)
        cats.append((_field(c, "id", what, ann_file, (int,)), _field(c, "name", what, ann_file, (str,))))
    cats.sort()
    if len(cats) > 1 and (dup := next((a for (a, _), (b, _) in zip(cats, cats[1:]) if a == b), None)) is not None:
        raise DataError(f"{ann_file}: category id {dup} appears twice in 'categories'")
    known = {name for _, name in cats}
    for name in wanted:
        if name not in known:
            raise DataError(f"{ann_file}: unknown category '{name}' in the category filter "
                            f"({len(known)} categories in the file)")
    if wanted:
        cats = [(cid, name) for cid, name in cats if name in set(wanted)]
    return [cid for cid, _ in cats], [name for _, name in cats]


def _bbox_array(bboxes: list, anns: list, ann_file: Path) -> np.ndarray:
    """float64 [N, 4] from the annotations' 'bbox' lists, each checked to be 4 finite numbers."""
    arr = None
    with contextlib.suppress(ValueError, TypeError):
        arr = np.array(bboxes) if bboxes else np.zeros((0, 4))
    if arr is not None and arr.dtype.kind in "iuf" and arr.shape == (len(bboxes), 4) \
            and np.isfinite(arr).all():
        return arr.astype(np.float64)
    # Slow path only to find the culprit and name it.
    for i, b in enumerate(bboxes):
        ok = isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
        if not ok:
            raise DataError(f"{ann_file}: {_entry_name('annotation', anns[i], i)}: "
                            f"field 'bbox' must be 4 numbers [x, y, w, h], got {b!r:.60}")
    raise AssertionError("unreachable: a bbox failed the array check but passed one by one")


def parse_annotations(anns: list, ann_file: Path, image_ids: np.ndarray,
                      category_ids_all: dict[int, int]) -> dict[str, np.ndarray]:
    """Per annotation: image position int64 [N] (in sorted `image_ids`), label int64 [N]
    (-1: category filtered out), crowd bool [N], bbox float64 [N, 4] x y w h.

    `category_ids_all` maps every category id of the file to its label or -1.
    """
    image_pos = {int(iid): p for p, iid in enumerate(image_ids)}
    pos, labels, crowd, bboxes = [], [], [], []
    for i, ann in enumerate(anns):
        what = _entry_name("annotation", ann, i)
        iid = _field(ann, "image_id", what, ann_file, (int,))
        cid = _field(ann, "category_id", what, ann_file, (int,))
        bboxes.append(_field(ann, "bbox", what, ann_file, (list,)))
        if iid not in image_pos:
            raise DataError(f"{ann_file}: {what}: field 'image_id' = {iid} is not an image id "
                            "in 'images'")
        if cid not in category_ids_all:
            raise DataError(f"{ann_file}: {what}: field 'category_id' = {cid} is not a category id "
                            "in 'categories'")
        pos.append(image_pos[iid])
        labels.append(category_ids_all[cid])
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # True and False are 1 and 0 too
            raise DataError(f"{ann_file}: {what}: field 'iscrowd' must be 0 or 1, got {iscrowd!r:.40}")
        crowd.append(bool(iscrowd))
    return {"pos": np.array(pos, dtype=np.int64), "labels": np.array(labels, dtype=np.int64),
            "crowd": np.array(crowd, dtype=bool), "xywh": _bbox_array(bboxes, anns, ann_file)}


def group_boxes(parsed: dict[str, np.ndarray], heights: np.ndarray, widths: np.ndarray,
                num_kept: int) -> _Boxes:
    """Kept boxes grouped by image: x y w h -> x1 y1 x2 y2 clipped to the image; crowd boxes
    and boxes left with no area are counted and dropped. Images past `num_kept` are ignored."""
    use = (parsed["pos"] < num_kept) & (parsed["labels"] >= 0)
    crowd = use & parsed["crowd"]
    pos = parsed["pos"]
    x, y, w, h = parsed["xywh"].T
    img_w = widths[pos] if len(pos) else np.zeros(0)
    img_h = heights[pos] if len(pos) else np.zeros(0)
    x1, x2 = np.clip(x, 0, img_w), np.clip(x + w, 0, img_w)
    y1, y2 = np.clip(y, 0, img_h), np.clip(y + h, 0, img_h)
    has_area = (x2 > x1) & (y2 > y1)
    keep = use & ~parsed["crowd"] & has_area
    degenerate = use & ~parsed["crowd"] & ~has_area
    # Stable, so each image's boxes stay in the JSON's order.
    order = np.flatnonzero(keep)[np.argsort(pos[keep], kind="stable")]
    counts = np.bincount(pos[order], minlength=num_kept)
    return _Boxes(boxes=np.stack([x1, y1, x2, y2], 1)[order].astype(np.float32),
                  labels=parsed["labels"][order],
                  offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                  num_crowd=int(crowd.sum()), num_degenerate=int(degenerate.sum()),
                  degenerate=degenerate)


def check_image_files(img_dir: Path, file_names: np.ndarray, ids: np.ndarray, ann_file: Path) -> None:
    """DataError for the first image the JSON names that is not in `img_dir` (one listdir)."""
    present = set(os.listdir(img_dir))
    for name, iid in zip(file_names, ids):
        if name not in present and not (os.sep in name and (img_dir / name).is_file()):
            raise DataError(f"{img_dir / name}: image file missing (image id {iid} in {ann_file})")


def ground_truth(doc: dict[str, Any], keep_images: set[int], keep_cats: set[int],
                 degenerate: np.ndarray) -> COCO:
    """A pycocotools COCO of the kept images and categories, for evaluation.

    Boxes are the file's (unclipped, as the official evaluation uses them), crowd regions
    included. Degenerate boxes (bool [num annotations]), which training drops, are marked
    iscrowd=1 here so that COCOeval ignores them instead of counting a miss no model can avoid.
    Missing 'area' / 'iscrowd' fields are filled in as COCOeval expects them, and annotation ids
    renumbered 1..N unless they already are distinct positive integers.
    """
    anns = []
    for a, bad in zip(doc["annotations"], degenerate):
        if a["image_id"] in keep_images and a["category_id"] in keep_cats:
            a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
            a.setdefault("iscrowd", 0)
            anns.append({**a, "iscrowd": 1} if bad else a)
    ids = [a.get("id") for a in anns]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids) or len(set(ids)) < len(ids):
        # COCOeval marks a match by the annotation's id, 0 meaning unmatched: exports that number from
        # 0 (Roboflow, Label Studio) would lose the first box's matches, and a missing or repeated id
        # would confuse two boxes. Evaluation needs ids only to tell boxes apart: number them 1..N.
        anns = [{**a, "id": k + 1} for k, a in enumerate(anns)]
    coco = COCO()
    coco.dataset = {
        "info": doc.get("info", {}),
        "images": [im for im in doc["images"] if im["id"] in keep_images],
        "annotations": anns,
        "categories": [c for c in doc["categories"] if c["id"] in keep_cats],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


# ----------------------------------------------------------------------------- images


def _reason(error: BaseException) -> str:
    """A short, one-line cause that does not repeat the path."""
    if isinstance(error, UnidentifiedImageError):
        return "not a known image format, or damaged"
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:120]


def _decode_pil(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] through PIL: the formats torchvision.io lacks (BMP, TIFF, ...), and a
    readable reason when a file is damaged."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({_reason(e)})") from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def check_pixel_count(path: Path) -> None:
    """DataError when the file's header declares more pixels than PIL's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS, ~89 Mpx): a 1 MB PNG of 20000x20000 px decodes to 1.2 GB (measured: 4.65
    GB in `ablate infer`). Only the header is read; a file PIL cannot identify is left to the decoders."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                width, height = im.size
        except Image.DecompressionBombError:  # above twice the limit: PIL refuses before the size is known
            raise DataError(f"{path}: image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (PIL's "
                            "decompression-bomb limit); downscale it") from None
        except Exception:  # noqa: BLE001 - not identified here: torchvision or _decode_pil says why
            return
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: image is {width}x{height} pixels, above {Image.MAX_IMAGE_PIXELS:,} (PIL's "
                        "decompression-bomb limit); downscale it")


def decode_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB (grayscale, palette, RGBA and CMYK converted; EXIF orientation
    ignored, as COCO's boxes are in the stored orientation). An animated image (GIF) gives its
    first frame, as PIL does; one above PIL's pixel limit is a DataError (`check_pixel_count`).

    torchvision.io first: measured faster than PIL here (CPU time per image: JPEG 640x480
    1.3-1.9 ms vs 2.0-2.6 ms, 128 px PNG 0.44 vs 0.48 ms); PIL only when it fails.
    torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here):
    the version is pinned, so the warning is silenced, and PIL is the way out if they go.
    """
    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except FileNotFoundError:
        raise DataError(f"{path}: image file missing") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror})") from None
    check_pixel_count(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = tv_decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return _decode_pil(path)
    if image.dim() == 4:  # an animated GIF: [frames, 3, H, W]
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.to(torch.int32) // 257).to(torch.uint8)
    return image


# What `decode_image` is, for the key of a store of decoded images (ablate.data.decoded): another
# torchvision or Pillow may decode a file to other pixels. Bump v1 when decode_image's output changes.
DECODER = f"decode_image v1, torchvision {torchvision.__version__}, Pillow {PIL.__version__}"


def make_transform(min_size: int, max_size: int, hflip_prob: float) -> v2.Transform:
    """Shorter side -> min_size with the longer capped at max_size, then an optional flip."""
    if max_size > min_size:
        resize = v2.Resize(size=min_size, max_size=max_size, antialias=True)
    else:
        # torchvision wants max_size > size; with max_size <= min_size the cap always binds,
        # i.e. the longer side becomes max_size, which is Resize(size=None, max_size=...).
        resize = v2.Resize(size=None, max_size=max_size, antialias=True)
    steps = [resize] + ([v2.RandomHorizontalFlip(hflip_prob)] if hflip_prob > 0 else [])
    return v2.Compose(steps)


def too_thin(heights: np.ndarray, widths: np.ndarray, max_size: int) -> np.ndarray:
    """bool [N]: images (int64 [N] heights and widths) whose shorter side `make_transform` would
    resize to 0 px: the longer side capped at max_size leaves the shorter int(max_size * short / long)
    px, 0 exactly when short * max_size < long (a 20000x20 px image at max_size 128)."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    return np.minimum(heights, widths) * max_size < np.maximum(heights, widths)


def thin_image_error(path: Path | str, height: int, width: int, max_size: int) -> DataError:
    return DataError(f"{path}: image is {width}x{height} pixels: with its longer side at data.max_size={max_size} "
                     "its shorter would be 0 px; crop it or leave it out")


# ----------------------------------------------------------------------------- the data set


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection set: (image uint8 [3, H, W], target dict) after resize/flip.

    target: boxes float32 [N, 4] x1 y1 x2 y2 in the resized image's pixels, labels int64 [N]
    in 0..K-1 (label k is COCO category `category_ids[k]`), image_id int, orig_size (h, w).
    """

    def __init__(self, source: str | Path | Annotations, split: str = "", *, min_size: int, max_size: int,
                 hflip_prob: float = 0.0, max_images: int = 0, categories: Sequence[str] = (),
                 cache_images: bool = False, cache_dir: str | Path | None = None, progress: bool = False):
        """`source`: a folder in the COCO 2017 layout (then `split` picks the split), or `Annotations`.

        `cache_images`: read the images from a store of them decoded once per machine under
        `cache_dir` (None: $ABLATE_CACHE or ~/.cache/ablate), built now if no process has built it,
        with a progress bar if `progress`; see ablate.data.decoded.
        """
        where = source.ann_file if isinstance(source, Annotations) else source
        if min_size < 1 or max_size < 1:
            raise DataError(f"{where}: min_size and max_size must be >= 1 (got {min_size}, {max_size})")
        if not 0.0 <= hflip_prob <= 1.0:
            raise DataError(f"{where}: hflip_prob must be in [0, 1] (got {hflip_prob})")
        if not isinstance(source, Annotations):
            ann_file, img_dir = locate(source, split)
            source = Annotations(read_json(ann_file), ann_file, img_dir)
        self.ann_file, self.img_dir, doc = source.ann_file, source.img_dir, source.doc
        self._sources = source.sources
        images = index_images(doc["images"], self.ann_file)
        self.category_ids, self.category_names = category_table(
            doc["categories"], self.ann_file, categories)
        label_of = {cid: -1 for cid in (c["id"] for c in doc["categories"])}
        label_of.update({cid: k for k, cid in enumerate(self.category_ids)})
        parsed = parse_annotations(doc["annotations"], self.ann_file, images["ids"], label_of)

        num_kept = min(max_images, len(images["ids"])) if max_images > 0 else len(images["ids"])
        self._ids = images["ids"][:num_kept]
        self._files = images["file_names"][:num_kept]
        self._sizes = np.stack([images["heights"], images["widths"]], 1)[:num_kept]
        check_image_files(self.img_dir, self._files, self._ids, self.ann_file)
        thin = np.flatnonzero(too_thin(self._sizes[:, 0], self._sizes[:, 1], max_size))
        if thin.size:
            i = int(thin[0])
            error = thin_image_error(self.img_dir / str(self._files[i]), *(int(v) for v in self._sizes[i]), max_size)
            raise DataError(f"{error} ({self._described_by(i)})")
        self._boxes = group_boxes(parsed, images["heights"], images["widths"], num_kept)
        self.image_ids: list[int] = self._ids.tolist()
        self.coco = ground_truth(doc, set(self.image_ids), set(self.category_ids),
                                 self._boxes.degenerate)
        self.stats = DataStats(
            num_images=num_kept, num_boxes=len(self._boxes.labels), num_crowd=self._boxes.num_crowd,
            num_degenerate=self._boxes.num_degenerate,
            num_empty_images=int((np.diff(self._boxes.offsets) == 0).sum()))
        self.transform = make_transform(min_size, max_size, hflip_prob)
        # Decoded images, all decoded before training (by this process or an earlier one): for small sets
        # read every epoch, decoding would otherwise take CPU from the training step. Mapped from one
        # file that every process shares, not copied into each.
        self._store: decoded.DecodedImages | None = None
        if cache_images:
            self._store = decoded.open_images(self.img_dir, self._files.tolist(), sizes=self._sizes,
                                              decode=decode_image, cache_dir=cache_dir, decoder=DECODER,
                                              progress=progress)
            # The store keeps the files' sizes, which no annotation edit changes: compare them now.
            wrong = np.flatnonzero((self._store.sizes != self._sizes).any(1))
            if wrong.size:
                raise self._size_error(int(wrong[0]), *(int(v) for v in self._store.sizes[wrong[0]]))

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self._ids)

    def _raw(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The file's image uint8 [3, h, w], boxes float32 [N, 4] and labels int64 [N]."""
        if self._store is not None:
            image = self._store[i]
        else:
            image = decode_image(self.img_dir / str(self._files[i]))
        if tuple(image.shape[-2:]) != tuple(self._sizes[i]):
            raise self._size_error(i, *image.shape[-2:])
        lo, hi = self._boxes.offsets[i], self._boxes.offsets[i + 1]
        # Copies: the transforms must never write into the shared per-image arrays.
        boxes = torch.tensor(self._boxes.boxes[lo:hi])
        labels = torch.tensor(self._boxes.labels[lo:hi])
        return image, boxes, labels

    def _size_error(self, i: int, height: int, width: int) -> DataError:
        """The error for image i's file being height x width pixels, not what the annotation says."""
        h, w = (int(v) for v in self._sizes[i])
        return DataError(f"{self.img_dir / str(self._files[i])}: image is {width}x{height} pixels but "
                         f"{self._described_by(i)} says {w}x{h}")

    def _described_by(self, i: int) -> str:
        """Where image i's annotation is: its own file (a VOC XML), else 'image id N in ann_file'."""
        source = self._sources.get(int(self._ids[i]))
        return str(source) if source else f"image id {self._ids[i]} in {self.ann_file}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, boxes, labels = self._raw(i)
        h, w = image.shape[-2:]
        image, boxes = self.transform(
            tv_tensors.Image(image), tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)))
        target = {"boxes": boxes.as_subclass(torch.Tensor).float(), "labels": labels,
                  "image_id": int(self._ids[i]), "orig_size": (int(h), int(w))}
        return image.as_subclass(torch.Tensor), target


# ----------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """A padded batch; every field is a tensor so `to` and `pin_memory` treat them alike."""

    images: torch.Tensor  # uint8 [B, 3, H, W], zero-padded bottom/right to size_divisible
    image_sizes: torch.Tensor  # int64 [B, 2] (h, w) before padding
    gt_boxes: torch.Tensor  # float32 [B, M, 4] x1 y1 x2 y2; padding rows 0
    gt_labels: torch.Tensor  # int64 [B, M]; -1 marks padding rows
    image_ids: torch.Tensor  # int64 [B]
    orig_sizes: torch.Tensor  # int64 [B, 2] (h, w) of the files

    def _map(self, fn) -> Batch:
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on each batch."""
        return self._map(lambda t: t.pin_memory())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def collate(samples: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisible: int = 32) -> Batch:
    """Stack `CocoDetection` samples into a `Batch` (usable as a DataLoader collate_fn).

    Images are zero-padded bottom/right to a common H, W rounded up to `size_divisible`;
    box lists are padded to M = max boxes in the batch (at least 1) with label -1.
    """
    if not samples:
        raise ValueError("collate: empty batch")
    sizes = torch.tensor([tuple(img.shape[-2:]) for img, _ in samples], dtype=torch.int64)
    height, width = (_round_up(int(v), size_divisible) for v in sizes.max(0).values)
    counts = [len(t["labels"]) for _, t in samples]
    m = max(1, max(counts))
    b = len(samples)
    images = torch.zeros((b, 3, height, width), dtype=torch.uint8)
    gt_boxes = torch.zeros((b, m, 4), dtype=torch.float32)
    gt_labels = torch.full((b, m), -1, dtype=torch.int64)
    for i, (img, target) in enumerate(samples):
        h, w = img.shape[-2:]
        images[i, :, :h, :w] = img
        gt_boxes[i, : counts[i]] = target["boxes"]
        gt_labels[i, : counts[i]] = target["labels"]
    return Batch(
        images=images, image_sizes=sizes, gt_boxes=gt_boxes, gt_labels=gt_labels,
        image_ids=torch.tensor([t["image_id"] for _, t in samples], dtype=torch.int64),
        orig_sizes=torch.tensor([t["orig_size"] for _, t in samples], dtype=torch.int64))
