"""Pascal VOC folders (the VOCdevkit layout), converted to the in-memory COCO structure.

Layout read, under ROOT (e.g. VOCdevkit/VOC2007):

    Annotations/ID.xml             one file per image: <filename>, <size>, and its <object>s
    JPEGImages/                    the images (the XML's <filename>; ID.jpg when it has none)
    ImageSets/Main/SPLIT.txt       the image IDs of a split (train, val, trainval, test), one a line

The conversion only rewrites the XML as a COCO document (`coco.Annotations`), so decoding, the
degenerate-box count and every later check are ablate.data.coco's. Choices made here:

- classes are the object names of every XML in Annotations/, sorted, so that every split of one
  folder has the same labels (a class missing from val still has its place);
- `difficult` objects become iscrowd=1: training ignores them and COCOeval neither rewards nor
  penalises detecting them, as VOC's own evaluation does;
- boxes are VOC's 1-based inclusive pixel corners, so (xmin, ymin, xmax, ymax) covers COCO's
  [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1];
- image ids are the 1-based positions in the split's list (COCO wants integers; VOC's are strings).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ablate.data.coco import Annotations, inside_folder
from ablate.errors import DataError
from ablate.paths import check_name_lengths


@dataclass
class VocImage:
    """One parsed Annotations/ID.xml."""

    file_name: str
    width: int
    height: int
    objects: list[tuple[str, bool, list[float]]]  # (class name, difficult, [xmin, ymin, xmax, ymax])


def locate(root: str | Path, split: str) -> tuple[Path, Path, Path]:
    """(Annotations/, JPEGImages/, ImageSets/Main/SPLIT.txt) under `root`, checked to exist."""
    root = check_name_lengths(root, "data.root")
    expected = "expected Annotations/, JPEGImages/ and ImageSets/Main/{train,val}.txt: the VOCdevkit/VOC2007 folder"
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found ({expected})")
    paths = (root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main" / f"{split}.txt")
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: not found ({expected})")
    for path, folder in zip(paths, (True, True, False)):
        if path.is_dir() != folder:
            raise DataError(f"{path}: {'not a folder' if folder else 'a folder, not a split file'} ({expected})")
    return paths


def _text(node: ET.Element, tag: str, path: Path, what: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{path}: {what}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, what: str) -> float:
    text = _text(node, tag, path, what)
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}: {what}: <{tag}> must be a number, got {text!r:.40}") from None
    if not math.isfinite(value):
        raise DataError(f"{path}: {what}: <{tag}> must be a finite number, got {text!r:.40}")
    return value


def parse_xml(path: Path, image_id: str) -> VocImage:
    """One annotation file; a malformed one is a `DataError` naming it (and the object at fault)."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    top = tree.getroot()
    size = top.find("size")
    if size is None:
        raise DataError(f"{path}: missing <size> (the image's <width> and <height>)")
    objects = []
    for i, obj in enumerate(top.findall("object")):
        what = f"object #{i + 1}"
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: {what}: missing <bndbox>")
        difficult = obj.find("difficult")
        objects.append((_text(obj, "name", path, what),
                        difficult is not None and (difficult.text or "0").strip() not in ("0", ""),
                        [_number(box, tag, path, what) for tag in ("xmin", "ymin", "xmax", "ymax")]))
    name = top.find("filename")
    file_name = name.text.strip() if name is not None and name.text and name.text.strip() else f"{image_id}.jpg"
    if not inside_folder(file_name):
        raise DataError(f"{path}: <filename> {file_name!r} is not a relative path inside JPEGImages/ "
                        "(absolute, or with '..')")
    return VocImage(file_name, int(_number(size, "width", path, "<size>")),
                    int(_number(size, "height", path, "<size>")), objects)


# An image ID names Annotations/ID.xml: a plain file name, never a path ('../x' reached other folders).
IMAGE_ID = re.compile(r"[^/\\]+")


def split_ids(list_file: Path) -> list[str]:
    """The image IDs of ImageSets/Main/SPLIT.txt (a second column, as in the per-class lists, is ignored)."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{list_file}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{list_file}: cannot read ({e.strerror})") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    for number, image_id in enumerate(ids, 1):
        if not IMAGE_ID.fullmatch(image_id) or image_id in (".", ".."):
            raise DataError(f"{list_file}: image ID {image_id!r:.60} (entry {number}) is not a file name in "
                            "Annotations/ (it holds a path)")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{list_file}: image ID '{dup}' is listed twice")
    return ids


def parse_folder(ann_dir: Path) -> dict[str, VocImage]:
    """Every ann_dir/ID.xml by ID: all of them, since the classes are every split's (each file read once)."""
    return {path.stem: parse_xml(path, path.stem) for path in sorted(ann_dir.glob("*.xml"))}


def class_names(images: dict[str, VocImage]) -> list[str]:
    """Every object name of `images`, sorted: the labels of every split of the folder."""
    return sorted({name for image in images.values() for name, _, _ in image.objects})


def to_coco(images: list[VocImage], names: list[str]) -> dict:
    """The COCO document of `images` (ids 1..N in order) with categories 1..K in `names`' order."""
    category = {name: k + 1 for k, name in enumerate(names)}
    doc: dict = {"info": {"description": "converted from Pascal VOC"}, "images": [], "annotations": [],
                 "categories": [{"id": cid, "name": name} for name, cid in category.items()]}
    for image_id, image in enumerate(images, start=1):
        doc["images"].append({"id": image_id, "file_name": image.file_name, "width": image.width,
                              "height": image.height})
        for name, difficult, (x1, y1, x2, y2) in image.objects:
            w, h = x2 - x1 + 1, y2 - y1 + 1
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": image_id,
                                       "category_id": category[name], "bbox": [x1 - 1, y1 - 1, w, h],
                                       "area": max(w, 0) * max(h, 0), "iscrowd": int(difficult)})
    return doc


def read_voc(root: str | Path, split: str) -> Annotations:
    """The split `split` of the VOC folder `root` as a COCO document; a missing image is a
    `DataError` naming its XML."""
    ann_dir, img_dir, list_file = locate(root, split)
    ids = split_ids(list_file)
    for image_id in ids:
        if not (ann_dir / f"{image_id}.xml").is_file():
            raise DataError(f"{ann_dir / f'{image_id}.xml'}: annotation file missing (image '{image_id}' of "
                            f"{list_file})")
    parsed = parse_folder(ann_dir)
    for image_id in ids:
        if not (img_dir / parsed[image_id].file_name).is_file():
            raise DataError(f"{img_dir / parsed[image_id].file_name}: image file missing (named by "
                            f"{ann_dir / f'{image_id}.xml'})")
    sources = {k: ann_dir / f"{image_id}.xml" for k, image_id in enumerate(ids, start=1)}  # to_coco's ids
    return Annotations(to_coco([parsed[i] for i in ids], class_names(parsed)), list_file, img_dir, sources)
