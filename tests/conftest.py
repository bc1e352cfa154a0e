"""Shared fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image



# The files of the end-to-end tests, longest first (measured: docs/tests.md), then the rest in their
# usual order. Under `pytest -n 2` each file goes whole to the first free process in this order; a
# long file started last would leave the other core idle at the end.
LONGEST_FIRST = ("test_liveness.py", "test_scale.py", "test_grid.py", "test_distributed.py", "test_bad_input.py",
                 "test_resume.py", "test_adaptive.py", "test_ui_browser.py", "test_memory_format.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


@pytest.fixture(autouse=True)
def one_worker_by_default(monkeypatch):
    """Grids in tests run in the test's own process unless a test asks for workers (--jobs N, or
    ABLATE_JOBS unset): their monkeypatches must reach the runs, and a worker process's start-up
    would cost each end-to-end test seconds. The machine's default is tested on its own."""
    monkeypatch.setenv("ABLATE_JOBS", "1")


@pytest.fixture(autouse=True)
def no_tracking_uri_from_another_test(monkeypatch):
    """MLflow's set_tracking_uri (tracking.init_store) writes MLFLOW_TRACKING_URI into this
    process's environment, and a grid worker its client's retry bounds, where every later test's
    subprocesses would inherit them: each test starts without them, restored afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # what a grid run in this process bounds (tracking.CLIENT_RETRIES)


# ----------------------------------------------------------------------------- tiny_coco

# Non-contiguous category ids, listed out of order: labels must follow the sorted ids
# (3 cat -> 0, 7 dog -> 1, 12 bird -> 2).
_TINY_CATEGORIES = [{"id": 12, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]

# split -> [(image id, file name, (width, height), PIL mode, [(ann id, cat id, bbox, iscrowd)])]
_TINY_IMAGES = {
    "train": [
        (1, "000000000001.png", (64, 48), "RGB", [
            (1, 3, [4, 6, 20, 10], 0),
            (2, 7, [30, 20, 16, 20], 0),
            (3, 3, [0, 0, 10, 10], 1),  # crowd: ignored
        ]),
        (2, "000000000002.jpg", (40, 60), "RGB", [
            (4, 12, [5, 5, 10, 30], 0),
            (5, 7, [10, 10, 0, 5], 0),  # zero width: degenerate
            (6, 3, [30, 50, 20, 20], 0),  # runs off the image: clipped to [30, 50, 40, 60]
        ]),
        (3, "000000000003.png", (64, 48), "L", [(7, 7, [8, 8, 16, 16], 0)]),  # grayscale
        (5, "000000000005.png", (40, 60), "RGB", []),  # no box: pure background
    ],
    "val": [
        (10, "000000000010.png", (64, 48), "RGB", [(8, 3, [10, 10, 20, 20], 0)]),
        (11, "000000000011.png", (40, 60), "RGBA", [(9, 12, [2, 3, 10, 10], 0)]),
    ],
}


def write_tiny_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """A random image (blocky, so JPEG keeps it recognisable) of `size` (w, h) in `mode`."""
    w, h = size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 4), dtype=np.uint8)
    pixels = np.kron(coarse, np.ones((4, 4, 1), np.uint8))[:h, :w]
    Image.fromarray(pixels, "RGBA").convert(mode).save(path)


def write_tiny_coco(root: Path) -> Path:
    """Write a tiny COCO 2017-layout set (train: 4 images, val: 2) under `root`; return root."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, images in _TINY_IMAGES.items():
        folder = root / f"{split}2017"
        folder.mkdir(exist_ok=True)
        doc = {"info": {"description": "tiny"}, "images": [], "annotations": [],
               "categories": _TINY_CATEGORIES}
        for image_id, name, (w, h), mode, anns in images:
            write_tiny_image(folder / name, (w, h), mode, seed=image_id)
            doc["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
            for ann_id, cat, bbox, crowd in anns:
                doc["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat,
                                           "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd})
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc, indent=1))
    return root


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store, created (its schema migrated) once per session."""
    from ablate import tracking

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    tracking.init_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def fresh_mlflow_store(_migrated_mlflow_db, tmp_path: Path):
    """`fresh_mlflow_store(folder)`: the URI of a new, empty sqlite store at FOLDER/mlflow.db,
    opened with tracking.init_store. A copy of the session's migrated one: MLflow's schema
    migration takes ~0.9 s per store, the copy ~0.03 s."""
    import shutil

    from ablate import tracking

    def make(folder: Path = tmp_path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_mlflow_db, folder / "mlflow.db")
        return tracking.init_store(f"sqlite:///{folder / 'mlflow.db'}")

    return make


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    """Root of a freshly written tiny COCO-format set (see `write_tiny_coco`)."""
    return write_tiny_coco(tmp_path / "tiny_coco")


# ----------------------------------------------------------------------------- isolation


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Synth sets generated by tests go to a session folder, never to the user's cache."""
    import os

    old = os.environ.get("ABLATE_CACHE")
    os.environ["ABLATE_CACHE"] = str(tmp_path_factory.mktemp("ablate-cache"))
    yield
    if old is None:
        os.environ.pop("ABLATE_CACHE", None)
    else:
        os.environ["ABLATE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _cli_zygotes():
    """The zygotes that fork the tests' command-line processes (tests/cli_zygote.py) end with the session."""
    yield
    import cli_zygote

    cli_zygote.close_all()
