"""The embedded procedural data set: determinism, caching, tight boxes, ranges, and that the COCO
reader takes it as it is."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ablate.builders import synth_spec
from ablate.config import Config, build_config
from ablate.data import synth
from ablate.data.coco import CocoDetection
from ablate.data.synth import SynthSpec, class_names, default_cache_dir, ensure_synth, synth_root, synth_stats
from ablate.errors import ConfigError


def _spec(**overrides) -> SynthSpec:
    """The config's synth defaults with `overrides`, through the builder."""
    return synth_spec(build_config("paper", {f"synth.{k}": v for k, v in overrides.items()}))


SMALL = _spec(num_train=20, num_val=5)
# Plain background and no distractors: every non-background pixel belongs to an object.
CLEAN = dataclasses.replace(SMALL, clutter=0.0, num_distractors=0)


def _json(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def _pixels(root: Path, split: str, image_id: int) -> np.ndarray:
    return np.asarray(Image.open(root / f"{split}2017" / f"{image_id:012d}.png"))


def _boxes_by_image(doc: dict) -> dict[int, list[list[int]]]:
    out: dict[int, list[list[int]]] = {im["id"]: [] for im in doc["images"]}
    for ann in doc["annotations"]:
        out[ann["image_id"]].append(ann["bbox"])
    return out


# ----------------------------------------------------------------------------- determinism, cache


def test_same_config_same_bytes_other_seed_differs(tmp_path):
    a = ensure_synth(SMALL, tmp_path / "a", progress=False)
    b = ensure_synth(SMALL, tmp_path / "b", progress=False)
    c = ensure_synth(dataclasses.replace(SMALL, seed=1), tmp_path / "c", progress=False)
    for split in ("train", "val"):
        ann = Path("annotations") / f"instances_{split}2017.json"
        assert (a / ann).read_bytes() == (b / ann).read_bytes()
        assert (a / ann).read_bytes() != (c / ann).read_bytes()
    for name in ("train2017/000000000001.png", "val2017/000000000005.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_image_renders_alone_as_in_the_set(tmp_path):
    root = ensure_synth(SMALL, tmp_path, progress=False)
    pixels, objects = synth.render_image(SMALL, "train", 7)  # image id 8
    assert np.array_equal(pixels, _pixels(root, "train", 8))
    written = [(a["category_id"], *a["bbox"]) for a in _json(root)["annotations"] if a["image_id"] == 8]
    assert [tuple(o) for o in objects] == written


def test_second_call_does_not_rewrite(tmp_path):
    root = ensure_synth(SMALL, tmp_path, progress=True)
    files = [root / "annotations" / "instances_train2017.json", root / "train2017" / "000000000003.png"]
    for f in files:
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))  # an mtime no rewrite could keep
    assert ensure_synth(SMALL, tmp_path, progress=False) == root
    assert [f.stat().st_mtime_ns for f in files] == [1_000_000_000] * 2
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left


def test_interrupted_generation_leaves_no_set(tmp_path, monkeypatch):
    calls = []

    def failing(spec, root, split, count, advance):
        calls.append(split)
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_split", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_synth(SMALL, tmp_path, progress=False)
    assert calls == ["train"]
    assert list(tmp_path.iterdir()) == []


def test_root_naming_and_cache_dir(tmp_path, monkeypatch):
    assert synth_root(SMALL, tmp_path) == synth_root(_spec(num_train=20, num_val=5), tmp_path)
    assert synth_root(SMALL, tmp_path) != synth_root(CLEAN, tmp_path)
    assert synth_root(SMALL, tmp_path).name.startswith("synth-")
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    assert synth_root(SMALL).parent == tmp_path / "cache"
    assert synth_root(SMALL, "") == synth_root(SMALL)  # DataConfig.cache_dir's empty default
    monkeypatch.delenv("ABLATE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "ablate"


def test_the_spec_is_the_configs_synth_section_and_keeps_existing_cache_folders():
    # Every synth.* key reaches the spec, and the folder names of sets generated before the spec
    # existed (hashed from the config section) are unchanged, so those sets are reused.
    assert dataclasses.asdict(_spec()) == dataclasses.asdict(Config().synth)
    assert synth_root(_spec(), "/cache").name == "synth-ff641f5c6c"
    assert synth_root(SMALL, "/cache").name == "synth-432f351e40"
    assert _spec(seed=3, clutter=0.25) == dataclasses.replace(_spec(), seed=3, clutter=0.25)


def test_bad_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="synth.num_shapes"):
        ensure_synth(dataclasses.replace(SMALL, num_shapes=9), tmp_path)
    with pytest.raises(ConfigError, match="synth.min_objects"):
        ensure_synth(dataclasses.replace(SMALL, min_objects=5, max_objects=4), tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- content


def _foreground(pixels: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels that differ from the (uniform) background, taken as the most
    common colour."""
    flat = pixels.reshape(-1, 3)
    colors, counts = np.unique(flat, axis=0, return_counts=True)
    return (pixels != colors[counts.argmax()]).any(-1)


def test_boxes_are_the_tight_extent_of_drawn_pixels(tmp_path):
    root = ensure_synth(CLEAN, tmp_path, progress=False)
    doc = _json(root)
    checked = 0
    for image_id, boxes in _boxes_by_image(doc).items():
        fg = _foreground(_pixels(root, "train", image_id))
        covered = np.zeros_like(fg)
        for x, y, w, h in boxes:
            inside = fg[y : y + h, x : x + w]
            # Every side of the box has a drawn pixel on it: the box is not too large.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y : y + h, x : x + w] = True
            checked += 1
        # Every drawn pixel is inside some box: no box is too small.
        assert not (fg & ~covered).any(), f"image {image_id}"
    assert checked >= 20


def test_single_object_box_equals_pixel_extent(tmp_path):
    spec = dataclasses.replace(CLEAN, min_objects=1, max_objects=1, num_shapes=8, num_colors=8)
    root = ensure_synth(spec, tmp_path, progress=False)
    for image_id, [(x, y, w, h)] in _boxes_by_image(_json(root)).items():
        fg = _foreground(_pixels(root, "train", image_id))
        rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
        assert (x, y, w, h) == (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)


@pytest.mark.parametrize("spec", [
    SMALL,
    dataclasses.replace(SMALL, image_size=256, num_shapes=8, num_colors=8, min_objects=3,
                        max_objects=9, min_object_size=12, max_object_size=48, num_distractors=6),
])
def test_objects_within_configured_ranges(tmp_path, spec):
    root = ensure_synth(spec, tmp_path, progress=False)
    k = spec.num_shapes * spec.num_colors
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        doc = _json(root, split)
        assert [im["id"] for im in doc["images"]] == list(range(1, count + 1))
        assert all(im["width"] == im["height"] == spec.image_size for im in doc["images"])
        assert [c["id"] for c in doc["categories"]] == list(range(1, k + 1))
        assert [c["name"] for c in doc["categories"]] == class_names(spec)
        for boxes in _boxes_by_image(doc).values():
            assert spec.min_objects <= len(boxes) <= spec.max_objects
        bb = np.array([a["bbox"] for a in doc["annotations"]], dtype=float)
        side = np.sqrt(bb[:, 2] * bb[:, 3])
        # Whole pixels: up to half a pixel of rounding per side, plus a dropped thin tip.
        assert side.min() >= spec.min_object_size - 1.5 and side.max() <= spec.max_object_size + 1
        assert (bb[:, :2] >= 0).all() and (bb[:, :2] + bb[:, 2:] <= spec.image_size).all()
        aspect = bb[:, 3] / bb[:, 2]
        assert aspect.min() >= 0.4 and aspect.max() <= 2.5
        assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0
                   for a in doc["annotations"])
    assert _pixels(root, "val", 1).shape == (spec.image_size, spec.image_size, 3)


def test_class_names_and_palette():
    names = class_names(_spec(num_shapes=8, num_colors=8))
    assert len(names) == len(set(names)) == 64
    assert class_names(SMALL)[:2] == ["red ellipse", "green ellipse"]
    # Distractor tones stay far from every class colour: colour is what makes them negatives.
    cls = np.array(list(synth.CLASS_COLORS.values()), float)
    dull = np.array(synth.DULL_COLORS, float)
    gap = np.linalg.norm(cls[:, None] - dull[None], axis=-1).min()
    # Even jittered the furthest towards each other, the two stay clearly apart.
    assert gap - np.sqrt(3) * (synth.OBJECT_JITTER + synth.DULL_JITTER) > 50


def test_clutter_changes_background_not_objects(tmp_path):
    plain, objects = synth.render_image(CLEAN, "train", 3)
    busy, busy_objects = synth.render_image(dataclasses.replace(CLEAN, clutter=1.0, num_distractors=5),
                                            "train", 3)
    assert objects == busy_objects
    assert len(np.unique(plain.reshape(-1, 3), axis=0)) < len(np.unique(busy.reshape(-1, 3), axis=0))


def test_coco_reader_takes_the_synth_set(tmp_path):
    root = ensure_synth(SMALL, tmp_path, progress=False)
    ds = CocoDetection(root, "train", min_size=128, max_size=128)
    assert len(ds) == SMALL.num_train
    assert ds.num_classes == SMALL.num_shapes * SMALL.num_colors == len(ds.category_names)
    assert ds.category_names == class_names(SMALL)
    assert ds.stats.num_crowd == ds.stats.num_degenerate == ds.stats.num_empty_images == 0
    image, target = ds[0]
    assert image.shape == (3, 128, 128)
    assert target["labels"].min() >= 0 and target["labels"].max() < ds.num_classes
    assert len(CocoDetection(root, "val", min_size=64, max_size=64)) == SMALL.num_val


def test_stats_summary(tmp_path):
    root = ensure_synth(SMALL, tmp_path, progress=False)
    stats = synth_stats(root)
    assert stats["images"] == {"train": 20, "val": 5}
    assert stats["num_classes"] == 20
    per_image = stats["objects_per_image"]
    assert SMALL.min_objects <= per_image["min"] <= per_image["mean"] <= per_image["max"]
    assert per_image["max"] <= SMALL.max_objects
    side = stats["object_side"]
    assert side["min"] <= side["median"] <= side["max"] <= SMALL.max_object_size + 1
    total = sum(len(_json(root, s)["annotations"]) for s in ("train", "val"))
    assert stats["num_objects"] == total
