"""ablate.evaluation: both backends against pycocotools' own COCOeval on a small synthetic set."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ablate.errors import DataError
from ablate.evaluation import METRIC_NAMES, coco_evaluate, detections_to_coco, save_results

CATEGORY_IDS = (3, 7, 12)  # deliberately non-contiguous, as in COCO
EMPTY_IMAGE_ID = 112
CROWD_IMAGE_ID = 101


def _ground_truth() -> dict:
    """A dozen 640x480 images with small/medium/large boxes over 3 categories, one crowd box and
    one image with no annotations. Annotation ids start at 1 (0 means "unmatched" in COCOeval)."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    sides = (12, 20, 28, 45, 60, 80, 120, 200)  # straddles the 32 and 96 px area boundaries
    for image_id in range(101, 113):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        if image_id == EMPTY_IMAGE_ID:
            continue
        for _ in range(int(rng.integers(1, 6))):
            w = float(rng.choice(sides)) * float(rng.uniform(0.8, 1.2))
            h = float(rng.choice(sides)) * float(rng.uniform(0.8, 1.2))
            x = float(rng.uniform(0, 640 - w))
            y = float(rng.uniform(0, 480 - h))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": int(rng.choice(CATEGORY_IDS)), "bbox": [x, y, w, h],
                "area": w * h, "iscrowd": 0,
            })
    annotations.append({
        "id": len(annotations) + 1, "image_id": CROWD_IMAGE_ID, "category_id": CATEGORY_IDS[0],
        "bbox": [300.0, 200.0, 250.0, 200.0], "area": 250.0 * 200.0, "iscrowd": 1,
    })
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def _pycocotools_gt(dataset: dict) -> COCO:
    """A pycocotools COCO over a private deep copy of `dataset`, built without printing."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(dataset: dict) -> list[dict]:
    """Seeded results: most GT boxes jittered (some with the wrong class), a few duplicates, a hit on
    the crowd region, and random false positives, each with a random score."""
    rng = np.random.default_rng(1)
    records = []
    for ann in dataset["annotations"]:
        if rng.random() < 0.15:
            continue  # a miss
        x, y, w, h = ann["bbox"]
        for _ in range(1 + int(rng.random() < 0.2)):  # occasional duplicate
            jitter = rng.normal(0.0, 0.08, size=4) * np.array([w, h, w, h])
            category = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(CATEGORY_IDS))
            records.append({
                "image_id": ann["image_id"], "category_id": category,
                "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)],
                "score": float(rng.random()),
            })
    for image in dataset["images"]:
        for _ in range(int(rng.integers(0, 4))):
            w, h = rng.uniform(8, 150, size=2)
            records.append({
                "image_id": image["id"], "category_id": int(rng.choice(CATEGORY_IDS)),
                "bbox": [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), float(w), float(h)],
                "score": float(rng.random()),
            })
    # Convert numpy floats once so the records are exactly what detections_to_coco would give.
    return json.loads(json.dumps(records, default=float))


def _reference_stats(dataset: dict, records: list[dict], image_ids=None, category_ids=None) -> np.ndarray:
    """pycocotools' COCOeval run by hand on private copies: the numbers everything must match."""
    coco_gt = _pycocotools_gt(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(records))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        if category_ids is not None:
            evaluator.params.catIds = list(category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)


def _as_array(metrics: dict[str, float]) -> np.ndarray:
    assert tuple(metrics) == METRIC_NAMES
    return np.array([metrics[name] for name in METRIC_NAMES], dtype=np.float64)


@pytest.fixture(scope="module")
def dataset() -> dict:
    return _ground_truth()


@pytest.fixture(scope="module")
def records(dataset) -> list[dict]:
    return _detections(dataset)


def test_fixture_exercises_every_case(dataset, records):
    """Guards the fixture itself: all area ranges, a crowd box, an empty image, enough detections."""
    areas = [a["area"] for a in dataset["annotations"] if not a["iscrowd"]]
    assert min(areas) < 32**2 and any(32**2 < a < 96**2 for a in areas) and max(areas) > 96**2
    assert sum(a["iscrowd"] for a in dataset["annotations"]) == 1
    assert EMPTY_IMAGE_ID not in {a["image_id"] for a in dataset["annotations"]}
    assert len(records) > 40


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_backend_matches_reference(dataset, records, backend):
    expected = _reference_stats(dataset, records)
    coco_gt = _pycocotools_gt(dataset)
    before_gt = copy.deepcopy(coco_gt.dataset)
    before_records = copy.deepcopy(records)
    got = _as_array(coco_evaluate(coco_gt, records, backend=backend))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # A sanity range: imperfect detections, real scores, no percent scaling.
    assert 0.05 < got[0] < 0.95 and np.all(got <= 1.0)
    assert records == before_records, "the caller's records were modified"
    if backend == "faster":  # pycocotools itself writes "ignore" flags into the GT; faster must not
        assert coco_gt.dataset == before_gt, "the caller's ground truth was modified"


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_restriction_matches_reference(dataset, records, backend):
    image_ids = [101, 103, 104, 108, EMPTY_IMAGE_ID]
    category_ids = [3, 12]
    expected = _reference_stats(dataset, records, image_ids=image_ids, category_ids=category_ids)
    unrestricted = _reference_stats(dataset, records)
    assert not np.allclose(expected, unrestricted), "the restriction should change the numbers"
    got = _as_array(coco_evaluate(_pycocotools_gt(dataset), records, image_ids=image_ids,
                                  category_ids=category_ids, backend=backend))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # Each restriction on its own, too.
    for kwargs in ({"image_ids": image_ids}, {"category_ids": category_ids}):
        expected = _reference_stats(dataset, records, **kwargs)
        got = _as_array(coco_evaluate(_pycocotools_gt(dataset), records, backend=backend, **kwargs))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_detections_score_one(dataset, backend):
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in dataset["annotations"] if not a["iscrowd"]
    ]
    metrics = coco_evaluate(_pycocotools_gt(dataset), perfect, backend=backend)
    # pycocotools computes precision as tp / (tp + fp + eps), so a category whose only hit is a
    # single detection scores 1 - 2**-52, not 1.0; hence the 1e-12 tolerance.
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == pytest.approx(1.0, rel=0, abs=1e-12), name


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_empty_records_give_zeros(dataset, backend):
    metrics = coco_evaluate(_pycocotools_gt(dataset), [], backend=backend)
    assert metrics == {name: 0.0 for name in METRIC_NAMES}


def test_unknown_image_id_is_a_data_error(dataset, records):
    bad = records + [{"image_id": 999, "category_id": 3, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.5}]
    with pytest.raises(DataError, match="999"):
        coco_evaluate(_pycocotools_gt(dataset), bad)


def test_unknown_backend_is_rejected(dataset, records):
    with pytest.raises(ValueError, match="backend"):
        coco_evaluate(_pycocotools_gt(dataset), records, backend="detectron")


@pytest.mark.parametrize("as_tensor", [True, False])
def test_detections_to_coco_hand_computed(as_tensor):
    boxes = [[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.5, 2.25], [100.0, 50.0, 101.0, 50.5]]
    scores = [0.9, 0.25, 0.5]
    labels = [1, 0, 2]
    image_ids = [42, 42, 7]
    convert = (lambda x, dt: torch.tensor(x, dtype=dt)) if as_tensor else (lambda x, dt: np.array(x))
    records = detections_to_coco(
        convert(boxes, torch.float32), convert(scores, torch.float32),
        convert(labels, torch.int64), convert(image_ids, torch.int64), category_ids=[3, 7, 12],
    )
    assert records == [
        {"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 3, "bbox": [0.0, 0.0, 5.5, 2.25], "score": 0.25},
        {"image_id": 7, "category_id": 12, "bbox": [100.0, 50.0, 1.0, 0.5], "score": 0.5},
    ]
    # Plain Python numbers, so json.dumps works without a custom encoder.
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in records)
    assert all(type(r["score"]) is float and all(type(v) is float for v in r["bbox"]) for r in records)
    json.dumps(records)


def test_detections_to_coco_empty_and_bad_label():
    empty = torch.zeros((0, 4))
    assert detections_to_coco(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, dtype=torch.int64), [3, 7]) == []
    with pytest.raises(ValueError, match="labels"):
        detections_to_coco(torch.zeros((1, 4)), torch.ones(1), torch.tensor([2]), torch.tensor([5]), [3, 7])
    with pytest.raises(ValueError, match="same length"):
        detections_to_coco(torch.zeros((2, 4)), torch.ones(1), torch.tensor([0]), torch.tensor([5]), [3, 7])


def test_save_results_round_trips_through_load_res(dataset, records, tmp_path):
    path = tmp_path / "nested" / "results.json"
    save_results(records, path)
    coco_gt = _pycocotools_gt(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco_gt.loadRes(str(path))
    anns = [loaded.anns[i] for i in sorted(loaded.anns)]
    assert len(anns) == len(records)
    for ann, record in zip(anns, records):
        assert ann["image_id"] == record["image_id"] and ann["category_id"] == record["category_id"]
        assert ann["bbox"] == record["bbox"] and ann["score"] == record["score"]
    # Scoring the file gives the same numbers as scoring the in-memory records.
    with open(path) as f:
        from_file = json.load(f)
    assert coco_evaluate(_pycocotools_gt(dataset), from_file) == coco_evaluate(_pycocotools_gt(dataset), records)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_minus_one_where_no_ground_truth_in_range(backend):
    """An area range with no ground truth is -1 (as COCOeval reports), not 0."""
    dataset = {
        "images": [{"id": 1, "width": 640, "height": 480}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10.0, 10.0, 200.0, 150.0],
                         "area": 30000.0, "iscrowd": 0}],
        "categories": [{"id": 5, "name": "only"}],
    }
    records = [{"image_id": 1, "category_id": 5, "bbox": [10.0, 10.0, 200.0, 150.0], "score": 0.8}]
    metrics = coco_evaluate(_pycocotools_gt(dataset), records, backend=backend)
    assert metrics["APs"] == metrics["APm"] == metrics["ARs"] == metrics["ARm"] == -1.0
    for name in ("AP", "APl", "AR1"):  # 1 - 2**-52 from pycocotools (see the test above)
        assert metrics[name] == pytest.approx(1.0, rel=0, abs=1e-12), name
    np.testing.assert_allclose(_as_array(metrics), _reference_stats(dataset, records), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_no_ground_truth_at_all_is_n_a_not_zero(dataset, records, backend):
    """An empty val split (or only crowd boxes, or images without boxes) scores -1 everywhere, as
    pycocotools' own COCOeval does, detections or not; 0 would say the model missed something."""
    crowd_only = {**dataset, "annotations": [a for a in dataset["annotations"] if a["iscrowd"]]}
    on_crowd = [r for r in records if r["image_id"] == CROWD_IMAGE_ID]
    assert on_crowd  # detections exist, yet there is nothing to find
    for gt, dets in ((crowd_only, on_crowd), (crowd_only, []), ({**dataset, "annotations": []}, [])):
        assert coco_evaluate(_pycocotools_gt(gt), dets, backend=backend) == {name: -1.0 for name in METRIC_NAMES}
    np.testing.assert_array_equal(_reference_stats(crowd_only, on_crowd), np.full(len(METRIC_NAMES), -1.0))
    # restricted to the empty image only: n/a as well; with its boxes back: a score again
    gt = _pycocotools_gt(dataset)
    assert coco_evaluate(gt, [], image_ids=[EMPTY_IMAGE_ID])["AP"] == -1.0
    assert coco_evaluate(gt, [])["AP"] == 0.0
