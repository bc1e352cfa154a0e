"""COCO box metrics: convert detections to COCO results records and score them with COCOeval.

Two interchangeable backends compute the same twelve numbers:

* ``"pycocotools"`` -- the reference implementation (pure Python per-image matching);
* ``"faster"`` -- faster-coco-eval's ``COCOeval_faster``, whose matching and accumulation run in
  C++. On the same inputs it reproduces pycocotools' stats to floating-point round-off and is
  several times faster, so it is the default.

The rest of the project only ever holds a ``pycocotools.coco.COCO`` for the ground truth; the
faster backend rebuilds its own index from ``coco_gt.dataset``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ablate.errors import DataError
from ablate.paths import atomic_write

# The order of COCOeval.stats for iouType="bbox" with the default parameters.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

BACKENDS = ("faster", "pycocotools")


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a tensor, array or sequence (detached, on the CPU)."""
    if hasattr(x, "detach"):  # a torch.Tensor; checked by duck type so numpy callers need no torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(boxes, scores, labels, image_ids, category_ids: Sequence[int]) -> list[dict]:
    """COCO results records for N detections.

    Args:
        boxes: float [N, 4] x1y1x2y2 in the ORIGINAL image's pixels (tensor or array).
        scores: float [N].
        labels: int [N], contiguous class indices 0..K-1.
        image_ids: int [N], the COCO image id of each detection.
        category_ids: length K; ``category_ids[label]`` is the COCO category id of ``label``.

    Returns:
        N dicts ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``,
        plain Python numbers throughout so the list is JSON-serialisable as is.

    Raises:
        ValueError: on mismatched lengths or a label outside 0..K-1 (a caller bug, not user data).
    """
    # float64 so that w = x2 - x1 adds no rounding beyond what the float32 inputs already carry.
    xyxy = _to_numpy(boxes).astype(np.float64, copy=False).reshape(-1, 4)
    score = _to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    label = _to_numpy(labels).astype(np.int64, copy=False).reshape(-1)
    image = _to_numpy(image_ids).astype(np.int64, copy=False).reshape(-1)
    n = xyxy.shape[0]
    if not (score.shape[0] == label.shape[0] == image.shape[0] == n):
        raise ValueError(
            f"detections_to_coco: boxes {n}, scores {score.shape[0]}, labels {label.shape[0]} and "
            f"image_ids {image.shape[0]} must have the same length"
        )
    cat_lut = np.asarray(category_ids, dtype=np.int64).reshape(-1)
    if n and (label.min() < 0 or label.max() >= cat_lut.shape[0]):
        raise ValueError(
            f"detections_to_coco: labels span {label.min()}..{label.max()} but only "
            f"{cat_lut.shape[0]} category ids were given"
        )

    xywh = xyxy.copy()
    xywh[:, 2:] -= xyxy[:, :2]
    category = cat_lut[label]
    # One .tolist() per column turns numpy scalars into Python ints/floats in C, which is far
    # cheaper than converting element by element inside the comprehension.
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(image.tolist(), category.tolist(), xywh.tolist(), score.tolist())
    ]


def save_results(records: list[dict], path) -> None:
    """Write COCO results records (see `detections_to_coco`) as a JSON list to `path`.

    The parent folder is created if needed. The file is what ``COCO.loadRes(path)`` reads. Written
    atomically, as eval.json is: a full disk or a kill mid-write leaves the previous file whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(records).encode()))


def _check_records(coco_gt, records: list[dict]) -> None:
    """Raise `DataError` if a record names an image the ground truth does not have.

    Both libraries would otherwise stop on a bare ``AssertionError``; the usual cause is a
    results file evaluated against the wrong annotation file, which the user can fix.
    """
    known = coco_gt.imgs.keys()
    unknown = {r["image_id"] for r in records} - known
    if unknown:
        example = sorted(unknown)[:5]
        raise DataError(
            f"{len(unknown)} image id(s) in the detections are not in the ground truth "
            f"(e.g. {example}); were they evaluated against the wrong annotation file?"
        )


def _copy_records(records: list[dict]) -> list[dict]:
    """Shallow copies of `records`: both loadRes implementations add keys (id, area, iscrowd,
    segmentation) to the dicts they are given, and the caller's records must stay as they were."""
    return [dict(r) for r in records]


def _restrict(params, image_ids: Sequence[int] | None, category_ids: Sequence[int] | None) -> None:
    """Limit a COCOeval ``Params`` to the given image / category ids (None keeps them all)."""
    if image_ids is not None:
        params.imgIds = sorted(int(i) for i in image_ids)
    if category_ids is not None:
        params.catIds = sorted(int(c) for c in category_ids)


def _stats_pycocotools(coco_gt, records, image_ids, category_ids) -> np.ndarray:
    """COCOeval.stats (float64 [12]) from pycocotools' own implementation."""
    from pycocotools.cocoeval import COCOeval

    coco_dt = coco_gt.loadRes(_copy_records(records))
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    _restrict(evaluator.params, image_ids, category_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)


def _stats_faster(coco_gt, records, image_ids, category_ids) -> np.ndarray:
    """COCOeval.stats (float64 [12]) from faster-coco-eval's C++ evaluator on the same data."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    def quiet(*_args, **_kwargs) -> None:
        """Drop faster-coco-eval's progress and summary lines (it logs them at INFO by default)."""

    dataset = coco_gt.dataset
    # Evaluation writes an "ignore" flag into each ground-truth annotation dict; copying the dicts
    # keeps the caller's pycocotools object untouched. Shallow copies suffice (nothing nested is
    # mutated), and cost milliseconds even for the full COCO val set.
    gt_dict = {**dataset, "annotations": [dict(a) for a in dataset.get("annotations", [])]}
    faster_gt = FasterCOCO(gt_dict, print_function=quiet)
    faster_dt = faster_gt.loadRes(_copy_records(records))
    evaluator = COCOeval_faster(faster_gt, faster_dt, iouType="bbox", print_function=quiet)
    _restrict(evaluator.params, image_ids, category_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # Default params give exactly the 12 pycocotools stats; `all_stats` holds extra ones (AR50...).
    return np.asarray(evaluator.stats, dtype=np.float64)[: len(METRIC_NAMES)]


def has_ground_truth(coco_gt, image_ids: Sequence[int] | None = None,
                     category_ids: Sequence[int] | None = None) -> bool:
    """Whether any box that COCOeval scores (not crowd) lies in the given images and categories."""
    images = None if image_ids is None else {int(i) for i in image_ids}
    categories = None if category_ids is None else {int(c) for c in category_ids}
    return any(not a.get("iscrowd", 0) and (images is None or a["image_id"] in images)
               and (categories is None or a["category_id"] in categories)
               for a in coco_gt.dataset.get("annotations", []))


def coco_evaluate(
    coco_gt,
    records: list[dict],
    *,
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
    backend: str = "faster",
) -> dict[str, float]:
    """COCO box AP/AR of `records` against `coco_gt`.

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` holding the ground truth. Not modified.
        records: COCO results records (``detections_to_coco``). Not modified.
        image_ids: evaluate only these images (COCOeval ``params.imgIds``); None = all of them.
        category_ids: evaluate only these COCO category ids (``params.catIds``); None = all.
        backend: ``"faster"`` (faster-coco-eval, C++) or ``"pycocotools"`` (the reference).

    Returns:
        ``{name: value}`` for `METRIC_NAMES`, as fractions in [0, 1] (not percent), and -1 where
        COCOeval reports -1 (no ground truth in that area range).

        No ground truth to find (an empty val split, or one of images without boxes, crowd and
        difficult ones aside) gives -1 for every metric, i.e. n/a, as COCOeval does for an empty
        area range: a score of 0 would claim the model missed something. Otherwise, empty
        `records` return 0.0 for every metric without running either library (pycocotools'
        ``loadRes`` cannot load an empty list): zero is what a model that found nothing has earned.

    Raises:
        DataError: a record names an image id absent from the ground truth.
        ValueError: an unknown backend.

    Both libraries' stdout prints are swallowed; the caller prints what it wants.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected one of {BACKENDS}")
    if not has_ground_truth(coco_gt, image_ids, category_ids):
        return {name: -1.0 for name in METRIC_NAMES}
    if not records:
        return {name: 0.0 for name in METRIC_NAMES}
    _check_records(coco_gt, records)

    run = _stats_faster if backend == "faster" else _stats_pycocotools
    # pycocotools prints progress and the summary table unconditionally.
    with contextlib.redirect_stdout(io.StringIO()):
        stats = run(coco_gt, records, image_ids, category_ids)
    if stats.shape[0] != len(METRIC_NAMES):
        raise RuntimeError(f"COCOeval returned {stats.shape[0]} stats, expected {len(METRIC_NAMES)}")
    return {name: float(value) for name, value in zip(METRIC_NAMES, stats)}
