"""CocoDetection, its transforms and collate, on the tiny COCO-format set of conftest.py.

Expected boxes are computed by hand from the bboxes written in `write_tiny_coco`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ablate.data.coco import Batch, CocoDetection, collate
from ablate.errors import DataError


def _ds(root: Path, split: str = "train", **kw) -> CocoDetection:
    kw.setdefault("min_size", 48)
    kw.setdefault("max_size", 1000)
    return CocoDetection(root, split, **kw)


def _sample(ds: CocoDetection, image_id: int):
    return ds[ds.image_ids.index(image_id)]


def _edit_json(root: Path, split: str, edit) -> Path:
    path = root / "annotations" / f"instances_{split}2017.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def _assert_one_line(error: pytest.ExceptionInfo, path: Path, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for part in parts:
        assert part in message, message


# ----------------------------------------------------------------------------- contents


def test_labels_are_contiguous_in_category_id_order(tiny_coco):
    ds = _ds(tiny_coco)
    assert ds.category_ids == [3, 7, 12]
    assert ds.category_names == ["cat", "dog", "bird"]
    _, target = _sample(ds, 1)
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [0, 1]
    assert [ds.category_ids[k] for k in _sample(ds, 2)[1]["labels"].tolist()] == [12, 3]


def test_stats_count_crowd_degenerate_and_empty(tiny_coco):
    ds = _ds(tiny_coco)
    assert ds.image_ids == [1, 2, 3, 5]
    assert len(ds) == 4
    assert ds.stats.as_dict() == {"num_images": 4, "num_boxes": 5, "num_crowd": 1,
                                  "num_degenerate": 1, "num_empty_images": 1}


def test_boxes_are_xyxy_clipped_without_crowd_or_degenerate(tiny_coco):
    ds = _ds(tiny_coco, min_size=40, max_size=1000)  # both images' short side is 40 or 48
    _, t1 = _sample(CocoDetection(tiny_coco, "train", min_size=48, max_size=1000), 1)
    assert t1["boxes"].dtype == torch.float32
    assert t1["boxes"].tolist() == [[4, 6, 24, 16], [30, 20, 46, 40]]
    image, t2 = _sample(ds, 2)
    assert image.shape == (3, 60, 40)
    assert t2["boxes"].tolist() == [[5, 5, 15, 35], [30, 50, 40, 60]]
    assert t2["orig_size"] == (60, 40) and t2["image_id"] == 2


def test_empty_image_stays_with_no_box(tiny_coco):
    image, target = _sample(_ds(tiny_coco), 5)
    assert image.shape == (3, 72, 48)  # 40x60 (w x h) file, short side 40 -> 48
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_grayscale_and_rgba_become_rgb(tiny_coco):
    image, _ = _sample(_ds(tiny_coco, min_size=48), 3)
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert image.float().std() > 0  # not a blank image
    image, _ = _sample(_ds(tiny_coco, "val", min_size=40), 11)
    assert image.shape == (3, 60, 40)


# ----------------------------------------------------------------------------- transforms


def test_resize_scales_shorter_side_and_boxes(tiny_coco):
    image, target = _sample(_ds(tiny_coco, min_size=96, max_size=1000), 1)  # 64x48, x2
    assert image.shape == (3, 96, 128)
    assert target["boxes"].tolist() == [[8, 12, 48, 32], [60, 40, 92, 80]]
    assert target["orig_size"] == (48, 64)


def test_resize_caps_longer_side_at_max_size(tiny_coco):
    # 40x60 (w x h): short 40 -> 20 makes the long side 30 > 25, so long -> 25 and short ->
    # int(25 * 20 / 30) = 16; x scales by 16/40, y by 25/60.
    image, target = _sample(_ds(tiny_coco, min_size=20, max_size=25), 2)
    assert image.shape == (3, 25, 16)
    sx, sy = 16 / 40, 25 / 60
    expected = torch.tensor([[5 * sx, 5 * sy, 15 * sx, 35 * sy], [30 * sx, 50 * sy, 40 * sx, 60 * sy]])
    torch.testing.assert_close(target["boxes"], expected)


def test_equal_min_and_max_size(tiny_coco):
    ds = _ds(tiny_coco, min_size=64, max_size=64)
    image, target = _sample(ds, 1)  # 64x48: already fits, a no-op
    assert image.shape == (3, 48, 64)
    assert target["boxes"].tolist() == [[4, 6, 24, 16], [30, 20, 46, 40]]
    image, target = _sample(ds, 2)  # 40x60: long side 60 -> 64, short int(64 * 40 / 60) = 42
    assert image.shape == (3, 64, 42)
    torch.testing.assert_close(target["boxes"][0], torch.tensor([5 * 42 / 40, 5 * 64 / 60,
                                                                 15 * 42 / 40, 35 * 64 / 60]))


def test_hflip_mirrors_image_and_boxes(tiny_coco):
    plain, _ = _sample(_ds(tiny_coco, min_size=64, max_size=64), 1)
    image, target = _sample(_ds(tiny_coco, min_size=64, max_size=64, hflip_prob=1.0), 1)
    assert torch.equal(image, plain.flip(-1))
    # x1' = W - x2, x2' = W - x1 with W = 64
    assert target["boxes"].tolist() == [[40, 6, 60, 16], [18, 20, 34, 40]]
    assert target["labels"].tolist() == [0, 1]


# ----------------------------------------------------------------------------- subsets


def test_max_images_keeps_first_ids(tiny_coco):
    ds = _ds(tiny_coco, max_images=2)
    assert ds.image_ids == [1, 2] and len(ds) == 2
    assert ds.stats.as_dict() == {"num_images": 2, "num_boxes": 4, "num_crowd": 1,
                                  "num_degenerate": 1, "num_empty_images": 0}
    assert sorted(ds.coco.getImgIds()) == [1, 2]


def test_category_filter(tiny_coco):
    ds = _ds(tiny_coco, categories=["bird", "cat"])
    assert ds.category_ids == [3, 12] and ds.category_names == ["cat", "bird"]
    assert _sample(ds, 1)[1]["labels"].tolist() == [0]
    assert _sample(ds, 2)[1]["labels"].tolist() == [1, 0]
    assert len(ds) == 4  # image 3 (a dog only) keeps its place, empty
    assert _sample(ds, 3)[1]["boxes"].shape == (0, 4)
    assert ds.stats.as_dict() == {"num_images": 4, "num_boxes": 3, "num_crowd": 1,
                                  "num_degenerate": 0, "num_empty_images": 2}
    assert sorted(ds.coco.getCatIds()) == [3, 12]


def test_unknown_category_name(tiny_coco):
    with pytest.raises(DataError) as e:
        _ds(tiny_coco, categories=["cat", "zebra"])
    _assert_one_line(e, tiny_coco / "annotations" / "instances_train2017.json", "zebra")


def test_ground_truth_for_evaluation(tiny_coco):
    ds = _ds(tiny_coco)
    assert sorted(ds.coco.getImgIds()) == ds.image_ids
    assert sorted(ds.coco.getCatIds()) == [3, 7, 12]
    assert len(ds.coco.getAnnIds()) == 7  # crowd and degenerate stay, unclipped
    assert ds.coco.anns[6]["bbox"] == [30, 50, 20, 20]
    # The degenerate box is ignored by COCOeval (as a crowd region), the others are not.
    assert {a["id"] for a in ds.coco.dataset["annotations"] if a["iscrowd"]} == {3, 5}


# ----------------------------------------------------------------------------- collate


def test_collate_pads_images_and_boxes(tiny_coco):
    ds = _ds(tiny_coco, min_size=50, max_size=100)
    # image 1 (64x48) -> 66x50 (w x h); image 5 (40x60) -> 50x75.
    samples = [_sample(ds, 1), _sample(ds, 5)]
    batch = collate(samples, size_divisible=32)
    assert batch.images.shape == (2, 3, 96, 96) and batch.images.dtype == torch.uint8
    assert batch.image_sizes.tolist() == [[50, 66], [75, 50]]
    assert torch.equal(batch.images[0, :, :50, :66], samples[0][0])
    assert batch.images[0, :, 50:].eq(0).all() and batch.images[0, :, :, 66:].eq(0).all()
    assert batch.images[1, :, 75:].eq(0).all() and batch.images[1, :, :, 50:].eq(0).all()
    assert batch.gt_boxes.shape == (2, 2, 4) and batch.gt_boxes.dtype == torch.float32
    assert torch.equal(batch.gt_boxes[0], samples[0][1]["boxes"])
    assert batch.gt_boxes[1].eq(0).all()
    assert batch.gt_labels.tolist() == [[0, 1], [-1, -1]]
    assert batch.image_ids.tolist() == [1, 5]
    assert batch.orig_sizes.tolist() == [[48, 64], [60, 40]]
    assert batch.image_sizes.dtype == batch.orig_sizes.dtype == batch.image_ids.dtype == torch.int64


def test_collate_without_boxes_keeps_one_padding_row(tiny_coco):
    batch = collate([_sample(_ds(tiny_coco), 5)], size_divisible=1)
    assert batch.gt_boxes.shape == (1, 1, 4) and batch.gt_labels.tolist() == [[-1]]
    assert batch.images.shape == (1, 3, 72, 48)  # 48 x 72 unpadded with size_divisible=1


def test_dataloader_with_collate(tiny_coco):
    ds = _ds(tiny_coco, min_size=32, max_size=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    batches = list(loader)
    assert [b.images.shape[0] for b in batches] == [3, 1]
    assert all(isinstance(b, Batch) for b in batches)
    moved = batches[0].to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.gt_labels, batches[0].gt_labels)


# ----------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        CocoDetection(tmp_path / "nowhere", "train", min_size=32, max_size=64)
    _assert_one_line(e, tmp_path / "nowhere", "not found")


def test_missing_annotation_file(tiny_coco):
    ann = tiny_coco / "annotations" / "instances_val2017.json"
    ann.unlink()
    with pytest.raises(DataError) as e:
        _ds(tiny_coco, "val")
    _assert_one_line(e, ann, "not found")


def test_malformed_json(tiny_coco):
    ann = tiny_coco / "annotations" / "instances_train2017.json"
    ann.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError) as e:
        _ds(tiny_coco)
    _assert_one_line(e, ann, "malformed JSON", "line 2")


@pytest.mark.parametrize("field", ["images", "annotations", "categories"])
def test_missing_top_level_field(tiny_coco, field):
    ann = _edit_json(tiny_coco, "train", lambda d: d.pop(field))
    with pytest.raises(DataError) as e:
        _ds(tiny_coco)
    _assert_one_line(e, ann, f"'{field}'")


@pytest.mark.parametrize("field", ["bbox", "image_id", "category_id"])
def test_annotation_missing_field(tiny_coco, field):
    ann = _edit_json(tiny_coco, "train", lambda d: d["annotations"][3].pop(field))
    with pytest.raises(DataError) as e:
        _ds(tiny_coco)
    _assert_one_line(e, ann, "annotation id 4", f"'{field}'")


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, "3", 4], [1, None, 3, 4]])
def test_bbox_not_four_numbers(tiny_coco, bbox):
    def edit(d):
        d["annotations"][1]["bbox"] = bbox

    ann = _edit_json(tiny_coco, "train", edit)
    with pytest.raises(DataError) as e:
        _ds(tiny_coco)
    _assert_one_line(e, ann, "annotation id 2", "'bbox'")


@pytest.mark.parametrize("field,value", [("image_id", 99), ("category_id", 4)])
def test_unknown_image_or_category_id(tiny_coco, field, value):
    def edit(d):
        d["annotations"][0][field] = value

    ann = _edit_json(tiny_coco, "train", edit)
    with pytest.raises(DataError) as e:
        _ds(tiny_coco)
    _assert_one_line(e, ann, "annotation id 1", f"'{field}'", str(value))


def test_missing_image_file_found_at_init(tiny_coco):
    image = tiny_coco / "train2017" / "000000000003.png"
    image.unlink()
    with pytest.raises(DataError) as e:
        _ds(tiny_coco)
    _assert_one_line(e, image, "image file missing", "image id 3", "instances_train2017.json")
    assert len(_ds(tiny_coco, max_images=2)) == 2  # only kept images are checked


@pytest.mark.parametrize("name", ["../val2017/000000000010.png", "/tmp/x.png", "sub/../../x.png", "..\\x.png",
                                  "C:\\data\\x.png", ""])
def test_file_name_outside_the_image_folder(tiny_coco, name):
    ann = _edit_json(tiny_coco, "train", lambda doc: doc["images"][1].update(file_name=name))
    with pytest.raises(DataError) as e:
        _ds(tiny_coco)
    _assert_one_line(e, ann, "image id 2", "file_name", "not a relative path inside the image folder")


def test_file_name_in_a_subfolder_is_fine(tiny_coco):
    # Label Studio writes "images/NAME" relative to its export folder.
    (tiny_coco / "train2017" / "sub").mkdir()
    (tiny_coco / "train2017" / "000000000002.jpg").rename(tiny_coco / "train2017" / "sub" / "000000000002.jpg")
    _edit_json(tiny_coco, "train", lambda doc: doc["images"][1].update(file_name="sub/000000000002.jpg"))
    assert _sample(_ds(tiny_coco), 2)[0].shape == (3, 72, 48)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_found_on_read(tiny_coco, damage):
    image = tiny_coco / "train2017" / "000000000001.png"
    data = image.read_bytes()
    image.write_bytes(b"this is not an image" if damage == "garbage" else data[: len(data) // 2])
    ds = _ds(tiny_coco)  # init only lists files
    with pytest.raises(DataError) as e:
        ds[0]
    _assert_one_line(e, image, "cannot decode image")
    ds[1]  # the other images still read


def test_batch_pins_through_the_dataloader_hook(tiny_coco, monkeypatch):
    # No accelerator here to pin for real: stand in for Tensor.pin_memory and check that the
    # DataLoader's pinning step reaches every field and gives back a Batch.
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = collate([_sample(_ds(tiny_coco), 1)])
    out = pin_memory(batch)
    assert isinstance(out, Batch) and len(pinned) == 6
    assert torch.equal(out.gt_boxes, batch.gt_boxes) and out.gt_boxes is not batch.gt_boxes


def test_decode_converts_modes_and_bit_depths(tmp_path):
    import numpy as np
    from PIL import Image

    from ablate.data.coco import decode_image

    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    # palette PNG, CMYK JPEG, BMP (PIL fallback), grayscale PNG
    for name, mode in [("p.png", "P"), ("c.jpg", "CMYK"), ("b.bmp", "RGB"), ("g.png", "L")]:
        Image.fromarray(rgb).convert(mode).save(tmp_path / name)
        reference = np.array(Image.open(tmp_path / name).convert("RGB"))
        expected = torch.from_numpy(reference).permute(2, 0, 1)
        out = decode_image(tmp_path / name)
        assert out.dtype == torch.uint8 and out.shape == (3, 6, 5), name
        assert (out.int() - expected.int()).abs().max() <= 1, name
    Image.fromarray(np.full((4, 3), 65535, np.uint16)).save(tmp_path / "16.png")
    assert decode_image(tmp_path / "16.png").eq(255).all()
