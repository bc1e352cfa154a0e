"""End-to-end runs of the CLI on the `smoke` experiment, and its handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    """Exit code 1, a single 'error:' line naming the culprit, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = invoke("train", "smoke", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(smoke_run: Path):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["iterations"] == 12
    assert set(summary["metrics"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
    assert all(-1.0 <= v <= 1.0 for k, v in summary["metrics"].items() if k != "infer_ms_per_img")
    assert summary["anchors"]["bg_per_fg"] > 100  # the lopsided anchor set the paper is about
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [4, 8, 12]
    assert all(m["loss_cls"] > 0 and m["num_fg"] > 0 for m in metrics)
    assert (smoke_run / "checkpoint.pt").is_file()
    detections = json.loads((smoke_run / "detections.json").read_text())
    assert isinstance(detections, list)
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["config"]["train"]["iterations"] == 12 and config["hash"] == summary["config_hash"]


@pytest.mark.slow
def test_eval_reproduces_the_training_metrics(smoke_run: Path, tmp_path: Path):
    result = invoke("eval", str(smoke_run / "checkpoint.pt"), "--out", str(tmp_path), "--no-progress")
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "eval.json").read_text())
    first = json.loads((smoke_run / "eval.json").read_text())
    for key in ("AP", "AP50", "AR100"):
        assert again[key] == pytest.approx(first[key], abs=1e-9)


@pytest.mark.slow
def test_infer_draws_png(smoke_run: Path, tmp_path: Path):
    image = tmp_path / "in.png"
    Image.new("RGB", (96, 80), (40, 90, 160)).save(image)
    result = invoke("infer", str(smoke_run / "checkpoint.pt"), str(image), "--out", str(tmp_path / "out"),
                    "--score-min", "0.0")
    assert result.exit_code == 0, result.output
    drawn = Image.open(tmp_path / "out" / "in.png")
    assert drawn.size[0] >= 96 and drawn.size[1] >= 80


@pytest.mark.slow
def test_same_seed_same_losses(tmp_path: Path):
    losses = []
    for name in ("a", "b"):
        result = invoke("train", "smoke", "--out", str(tmp_path / name), "--no-progress",
                        "--set", "train.iterations=4", "--set", "synth.num_val=4")
        assert result.exit_code == 0, result.output
        (run_dir,) = (tmp_path / name).iterdir()
        losses.append([json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_a_diverging_run_ends_cleanly(tmp_path: Path):
    # Plain CE without the prior at an absurd learning rate: the loss leaves the floats quickly.
    result = invoke("train", "smoke", "--out", str(tmp_path), "--no-progress", "--set", "loss.cls=ce",
                    "--set", "model.prior=none", "--set", "train.lr=1e6", "--set", "train.warmup_iters=1",
                    "--set", "train.iterations=40")
    assert result.exit_code == 3, result.output
    assert "diverged" in result.output and "Traceback" not in result.output
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at"] < 40
    assert not (run_dir / "checkpoint.pt").exists()


def test_unknown_set_key(tmp_path: Path):
    assert_one_line_error(invoke("train", "smoke", "--set", "loss.gama=1"), "loss.gama", "loss.gamma")


def test_wrong_type_in_set(tmp_path: Path):
    assert_one_line_error(invoke("train", "smoke", "--set", "train.iterations=many"), "train.iterations")


def test_unknown_experiment():
    assert_one_line_error(invoke("train", "no-such-experiment"), "no-such-experiment")


def test_bad_experiment_file(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('preset = "tiny"\n[config]\nloss.cls = 3\n')
    assert_one_line_error(invoke("train", str(path)), str(path), "loss.cls")
    path.write_text('preset = "tiny"\ngrids = 3\n')
    assert_one_line_error(invoke("train", str(path)), str(path), "grids")


def test_missing_data_folder(tmp_path: Path):
    missing = tmp_path / "nowhere"
    runs = tmp_path / "runs"
    assert_one_line_error(invoke("train", "smoke", "--data", f"coco:{missing}", "--no-progress", "--out", str(runs)),
                          str(missing))
    assert not runs.exists()  # bad input leaves no empty run folder behind


def test_malformed_json(tiny_coco: Path):
    ann = tiny_coco / "annotations" / "instances_train2017.json"
    ann.write_text(ann.read_text()[:-20])
    assert_one_line_error(invoke("train", "smoke", "--data", f"coco:{tiny_coco}", "--no-progress"), str(ann))


def test_corrupt_image_names_the_file(tiny_coco: Path):
    images = sorted((tiny_coco / "train2017").iterdir())
    images[0].write_bytes(b"not an image at all")
    result = invoke("train", "smoke", "--data", f"coco:{tiny_coco}", "--no-progress",
                    "--set", "data.num_workers=1", "--set", "train.batch_size=2")
    assert_one_line_error(result, images[0].name)


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "eval", "infer", "data"):
        assert command in result.output


def test_data_synth_prints_root_and_balance():
    result = invoke("data", "synth", "--no-progress", "--set", "synth.num_train=12", "--set", "synth.num_val=4")
    assert result.exit_code == 0, result.output
    root = next(line for line in result.output.splitlines() if "synth-" in line and line.startswith("/"))
    assert (Path(root) / "annotations" / "instances_train2017.json").is_file()
    assert "objects_per_image" in result.output
    assert "background" in result.output and "1:" in result.output


@pytest.mark.slow
def test_analyze_loss_cdf_writes_figure_4(smoke_run: Path, tmp_path: Path):
    result = invoke("analyze", "loss-cdf", str(smoke_run / "checkpoint.pt"), "--out", str(tmp_path),
                    "--gammas", "0,2")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "loss_cdf.png").size[0] > 500
    import csv

    rows = list(csv.DictReader(open(tmp_path / "loss_cdf.csv")))
    assert {(r["gamma"], r["side"]) for r in rows} == {("0.0", "positive"), ("0.0", "negative"),
                                                       ("2.0", "positive"), ("2.0", "negative")}
    last = [float(r["cumulative_loss"]) for r in rows if r["fraction"] == "1.0"]
    assert last and all(abs(v - 1.0) < 1e-9 for v in last)  # the CDFs end at the whole loss
