"""Pascal VOC folders read through the COCO reader (ablate.data.voc), on a tiny VOCdevkit the tests write.

Expected boxes are computed by hand from the 1-based inclusive corners written in `_TINY_VOC`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ablate.data.coco import CocoDetection
from ablate.data.voc import read_voc
from ablate.errors import DataError
from conftest import write_tiny_image

# split -> [(image ID, (width, height), [(name, difficult, (xmin, ymin, xmax, ymax))])]
_TINY_VOC = {
    "train": [
        ("000005", (64, 48), [("dog", 0, (5, 7, 24, 16)), ("cat", 0, (31, 21, 46, 40)),
                              ("cat", 1, (1, 1, 10, 10))]),  # difficult: ignored
        ("000007", (40, 60), [("person", 0, (6, 6, 15, 35)), ("dog", 0, (11, 11, 10, 15))]),  # xmax < xmin
        ("000009", (64, 48), []),  # no object
    ],
    "val": [
        ("000012", (64, 48), [("bird", 0, (11, 11, 30, 30))]),  # a class only val has
        ("000016", (40, 60), [("dog", 0, (3, 4, 12, 13))]),
    ],
}


def _xml(image_id: str, size: tuple[int, int], objects) -> str:
    w, h = size
    body = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, difficult, (x1, y1, x2, y2) in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{body}</annotation>")


def write_tiny_voc(root: Path) -> Path:
    """VOCdevkit/VOC2007 under `root` (train: 3 images, val: 2); returns the VOC2007 folder."""
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for split, images in _TINY_VOC.items():
        for image_id, size, objects in images:
            write_tiny_image(voc / "JPEGImages" / f"{image_id}.jpg", size, "RGB", seed=int(image_id))
            (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size, objects))
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i, _, _ in images))
    return voc


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    return write_tiny_voc(tmp_path)


def _ds(voc: Path, split: str = "train") -> CocoDetection:
    return CocoDetection(read_voc(voc, split), split, min_size=48, max_size=1000)


def test_classes_are_every_xml_name_sorted_and_the_same_for_both_splits(tiny_voc):
    train, val = _ds(tiny_voc), _ds(tiny_voc, "val")
    assert train.category_names == val.category_names == ["bird", "cat", "dog", "person"]
    assert train.category_ids == [1, 2, 3, 4]
    assert val.image_ids == [1, 2]  # positions in val.txt


def test_boxes_labels_difficult_and_degenerate(tiny_voc):
    ds = _ds(tiny_voc)
    assert ds.stats.as_dict() == {"num_images": 3, "num_boxes": 3, "num_crowd": 1, "num_degenerate": 1,
                                  "num_empty_images": 1}
    image, target = ds[0]  # 000005: 64x48, short side 48 already
    assert image.shape == (3, 48, 64)
    # VOC (5, 7, 24, 16) 1-based inclusive -> COCO [4, 6, 20, 10] -> x1y1x2y2 [4, 6, 24, 16]
    assert target["boxes"].tolist() == [[4, 6, 24, 16], [30, 20, 46, 40]]
    assert target["labels"].tolist() == [2, 1]  # dog, cat (the difficult cat is ignored)
    _, target = ds[1]  # 000007: 40x60 -> 48x72, x1.2
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 5.0, 15.0, 35.0]]) * 1.2)
    assert target["labels"].tolist() == [3]
    assert ds[2][1]["boxes"].shape == (0, 4)


def test_difficult_boxes_are_crowd_for_evaluation(tiny_voc):
    ds = _ds(tiny_voc)
    anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[1]))
    assert [(a["bbox"], a["iscrowd"]) for a in anns] == [([4.0, 6.0, 20.0, 10.0], 0), ([30.0, 20.0, 16.0, 20.0], 0),
                                                         ([0.0, 0.0, 10.0, 10.0], 1)]


def test_missing_folders_name_what_is_expected(tiny_voc, tmp_path):
    with pytest.raises(DataError, match="not found.*VOCdevkit/VOC2007 folder"):
        read_voc(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match=r"ImageSets/Main/trainval.txt: not found"):
        read_voc(tiny_voc, "trainval")


def test_malformed_xml_names_the_file(tiny_voc):
    xml = tiny_voc / "Annotations" / "000007.xml"
    xml.write_text(xml.read_text()[:-30])
    with pytest.raises(DataError, match="malformed XML") as error:
        read_voc(tiny_voc, "train")
    assert str(error.value).startswith(f"{xml}: ") and "\n" not in str(error.value)


def test_object_without_its_box_names_file_and_object(tiny_voc):
    xml = tiny_voc / "Annotations" / "000005.xml"
    xml.write_text(xml.read_text().replace("<ymax>16</ymax>", ""))
    with pytest.raises(DataError, match=r"000005.xml: object #1: missing <ymax>"):
        read_voc(tiny_voc, "train")


def test_missing_image_names_its_xml(tiny_voc):
    (tiny_voc / "JPEGImages" / "000016.jpg").unlink()
    with pytest.raises(DataError, match=r"000016.jpg: image file missing \(named by .*000016.xml\)"):
        read_voc(tiny_voc, "val")


@pytest.mark.parametrize("name", ["../../secret.jpg", "/etc/passwd"])
def test_file_name_outside_the_image_folder_is_rejected(tiny_voc, name):
    xml = tiny_voc / "Annotations" / "000012.xml"
    xml.write_text(xml.read_text().replace("<filename>000012.jpg</filename>", f"<filename>{name}</filename>"))
    with pytest.raises(DataError, match="not a relative path inside JPEGImages") as error:
        read_voc(tiny_voc, "val")
    assert str(error.value).startswith(f"{xml}: ")


def test_cli_trains_on_a_voc_folder(tiny_voc, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", "smoke", "--data", f"voc:{tiny_voc}", "--out", str(out), "--no-progress",
                                      "--set", "train.iterations=2", "--set", "train.batch_size=2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["data"]["num_crowd"] == 1
    assert summary["data"]["root"] == str(tiny_voc)
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert (config["data"]["source"], config["data"]["root"]) == ("voc", str(tiny_voc))
    assert 0.0 <= summary["metrics"]["AP"] <= 1.0  # val has boxes: a score, not n/a


def test_an_id_without_its_xml_names_the_list(tiny_voc):
    (tiny_voc / "Annotations" / "000009.xml").unlink()
    with pytest.raises(DataError, match=r"000009.xml: annotation file missing \(image '000009' of .*train.txt\)"):
        read_voc(tiny_voc, "train")
