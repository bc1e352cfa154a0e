"""COCO-format files as annotation tools export them (a file and an image folder per split), through
`--data coco:train=FILE[@IMAGES],val=...`; and what the reader says about empty splits.

The exports are the tiny set of conftest.py moved into each tool's layout, so every box is the one
test_data_coco.py checks by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate import builders
from ablate.config import build_config
from ablate.errors import ConfigError, DataError
from ablate.evaluation import coco_evaluate
from ablate.data.source import DataSource
from cli import app


def roboflow_export(tiny_coco: Path, out: Path) -> Path:
    """Roboflow's COCO export: {train,valid}/_annotations.coco.json beside the images."""
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(tiny_coco / f"{split}2017", out / folder)
        shutil.copy(tiny_coco / "annotations" / f"instances_{split}2017.json", out / folder / "_annotations.coco.json")
    return out


def cvat_export(tiny_coco: Path, out: Path, split: str) -> Path:
    """CVAT's COCO 1.0 export of one task: annotations/instances_default.json and images/."""
    shutil.copytree(tiny_coco / f"{split}2017", out / "images")
    (out / "annotations").mkdir()
    shutil.copy(tiny_coco / "annotations" / f"instances_{split}2017.json", out / "annotations" / "instances_default.json")
    return out


def _train(data: str, out: Path, *extra: str):
    args = ["train", "smoke", "--data", data, "--out", str(out), "--no-progress", "--set", "train.iterations=2",
            "--set", "train.batch_size=2", *extra]
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    return line


# ----------------------------------------------------------------------------- --data


def test_cli_says_a_bad_form_in_one_line_with_its_brackets(tmp_path):
    line = _one_error_line(_train("coco:train=a.json,test=b.json", tmp_path / "runs"))
    assert "expected train=FILE.json[@IMAGES],val=FILE.json[@IMAGES] after 'coco:'" in line


def test_help_shows_every_form():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    for form in ("'coco:PATH'", "'coco:train=FILE,val=FILE'", "FILE@IMAGES", "'voc:PATH'"):
        assert form in text, form


# ----------------------------------------------------------------------------- the exports


def _split(data: str, split: str):
    cfg = build_config("tiny", {**DataSource.parse(data, "--data").overrides(), "data.min_size": 48,
                                "data.max_size": 1000})
    return builders.build_dataset(cfg.data, builders.data_root(cfg), split, train=False)


def test_roboflow_export_reads_like_the_2017_layout(tiny_coco, tmp_path):
    ds = roboflow_export(tiny_coco, tmp_path / "rf")
    train = _split(f"coco:train={ds}/train/_annotations.coco.json,val={ds}/valid/_annotations.coco.json", "train")
    reference = builders.build_dataset(build_config("tiny", {"data.source": "coco", "data.root": str(tiny_coco),
                                                             "data.min_size": 48}).data, tiny_coco, "train", train=False)
    assert train.img_dir == ds / "train"  # the images beside the file
    assert train.stats == reference.stats and train.category_names == reference.category_names
    for i in range(len(train)):
        assert train[i][1]["boxes"].tolist() == reference[i][1]["boxes"].tolist()


def test_cvat_export_names_its_image_folder(tiny_coco, tmp_path):
    train, val = cvat_export(tiny_coco, tmp_path / "t", "train"), cvat_export(tiny_coco, tmp_path / "v", "val")
    data = (f"coco:train={train}/annotations/instances_default.json@{train}/images,"
            f"val={val}/annotations/instances_default.json@{val}/images")
    ds = _split(data, "val")
    assert ds.ann_file == val / "annotations" / "instances_default.json" and ds.img_dir == val / "images"
    assert ds.image_ids == [10, 11] and ds[1][0].shape[0] == 3
    # without @images the folder is the file's own, where the images are not: one line naming one
    data = f"coco:train={train}/annotations/instances_default.json,val={val}/annotations/instances_default.json"
    with pytest.raises(DataError, match=r"000000000001.png: image file missing \(image id 1 in .*instances_default"):
        _split(data, "train")


def test_missing_file_or_folder_is_named(tiny_coco, tmp_path):
    ds = roboflow_export(tiny_coco, tmp_path / "rf")
    with pytest.raises(DataError, match=r"nope.json: annotation file not found"):
        _split(f"coco:train={ds}/nope.json,val={ds}/valid/_annotations.coco.json", "train")
    with pytest.raises(DataError, match=r"imgs: image folder not found \(the images of .*_annotations.coco.json\)"):
        _split(f"coco:train={ds}/train/_annotations.coco.json@{ds}/imgs,val={ds}/valid/_annotations.coco.json", "train")


def test_one_split_file_without_a_root_names_the_other_key(tiny_coco):
    cfg = build_config("tiny", {"data.source": "coco", "data.train_annotations": str(tiny_coco / "x.json")})
    with pytest.raises(ConfigError, match="data.val_annotations: not set, and no data.root"):
        builders.build_dataset(cfg.data, builders.data_root(cfg), "val", train=False)


def test_annotation_ids_from_zero_still_score_perfect_detections(tiny_coco, tmp_path):
    # Roboflow numbers annotations from 0, which COCOeval reads as "unmatched"; renumbered for evaluation.
    ds = roboflow_export(tiny_coco, tmp_path / "rf")
    ann = ds / "valid" / "_annotations.coco.json"
    doc = json.loads(ann.read_text())
    for k, a in enumerate(doc["annotations"]):
        a["id"] = k
    ann.write_text(json.dumps(doc))
    val = _split(f"coco:train={ds}/train/_annotations.coco.json,val={ann}", "val")
    assert sorted(a["id"] for a in val.coco.dataset["annotations"]) == [1, 2]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in doc["annotations"]]
    assert coco_evaluate(val.coco, perfect, backend="pycocotools")["AP"] == pytest.approx(1.0)


@pytest.mark.slow
def test_cli_trains_on_a_roboflow_export(tiny_coco, tmp_path):
    ds = roboflow_export(tiny_coco, tmp_path / "rf")
    out = tmp_path / "runs"
    result = _train(f"coco:train={ds}/train/_annotations.coco.json,val={ds}/valid/_annotations.coco.json", out)
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["data"]["num_images"] == 4
    data = json.loads((run_dir / "config.json").read_text())["config"]["data"]
    assert data["val_annotations"] == f"{ds}/valid/_annotations.coco.json" and data["root"] == ""
    detections = json.loads((run_dir / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= {10, 11}


# ----------------------------------------------------------------------------- bad and empty splits


@pytest.mark.parametrize("name", ["../train2017/000000000001.png", "/etc/hostname", "a/../../b.png"])
def test_file_name_leaving_the_image_folder_is_one_line(tiny_coco, tmp_path, name):
    ann = tiny_coco / "annotations" / "instances_val2017.json"
    doc = json.loads(ann.read_text())
    doc["images"][0]["file_name"] = name
    ann.write_text(json.dumps(doc))
    line = _one_error_line(_train(f"coco:{tiny_coco}", tmp_path / "runs"))
    assert str(ann) in line and "image id 10" in line and "not a relative path inside the image folder" in line
    assert not (tmp_path / "runs").exists()


def test_categories_differing_between_splits_are_one_line(tiny_coco, tmp_path):
    ann = tiny_coco / "annotations" / "instances_val2017.json"
    doc = json.loads(ann.read_text())
    doc["categories"] = [c for c in doc["categories"] if c["name"] != "dog"]
    ann.write_text(json.dumps(doc))
    line = _one_error_line(_train(f"coco:{tiny_coco}", tmp_path / "runs"))
    assert str(ann) in line and "differ from those of the train split" in line


@pytest.mark.slow
@pytest.mark.parametrize("empty", ["no images", "no boxes"])
def test_an_empty_val_split_scores_n_a_not_zero(tiny_coco, tmp_path, empty):
    ann = tiny_coco / "annotations" / "instances_val2017.json"
    doc = json.loads(ann.read_text())
    if empty == "no images":
        doc["images"] = []
    doc["annotations"] = []
    ann.write_text(json.dumps(doc))
    out = tmp_path / "runs"
    result = _train(f"coco:{tiny_coco}", out)
    assert result.exit_code == 0, result.output
    assert "AP n/a  AP50 n/a" in result.output
    (run_dir,) = out.iterdir()
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert metrics["AP"] == metrics["AP50"] == metrics["AR100"] == -1.0


@pytest.mark.slow
def test_a_train_split_without_boxes_warns(tiny_coco, tmp_path):
    ann = tiny_coco / "annotations" / "instances_train2017.json"
    doc = json.loads(ann.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["iscrowd"]]  # only the crowd box is left
    ann.write_text(json.dumps(doc))
    result = _train(f"coco:{tiny_coco}", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert str(ann) in warning and "no boxes" in warning and "1 crowd" in warning
    assert "anchors per image" in result.output  # the usual lines are still there
    # Quiet (a grid worker has no console): the warning goes through `warnings`.
    from ablate.runner import run_training

    cfg = build_config("tiny", {**DataSource.parse(f"coco:{tiny_coco}", "t").overrides(), "train.iterations": 1,
                                "train.batch_size": 2, "train.out_dir": str(tmp_path / "quiet")})
    with pytest.warns(UserWarning, match="the train split has no boxes to learn from"):
        assert run_training(cfg, console=None, show_progress=False).outcome == "finished"
