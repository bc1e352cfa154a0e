"""ablate.runner: a run's folder and files, the resume checkpoint it continues from, the checks
before training (a trainable split, as many processes as wrote the checkpoint, the same batches per
epoch), an allocation failure as one line naming the keys, a failing plot that never costs the
checkpoint, and training that imports no plotting (the run folder's plot is drawn by its caller)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablate import runner
from ablate.checkpoint import ResumeSpec
from ablate.config import build_config, config_hash
from ablate.distributed import Ranks
from ablate.errors import AblateError, DataError
from ablate.paths import NAME_MAX
from ablate.runs import Outcome
from conftest import write_tiny_coco


def test_run_folders_hold_the_name_and_never_collide(tmp_path):
    first = runner.new_run_dir(tmp_path, "focal g=2 s0")
    second = runner.new_run_dir(tmp_path, "focal g=2 s0")
    assert first.is_dir() and second.is_dir() and first != second
    assert first.name.endswith("-focal g=2 s0") and second.name == f"{first.name}-2"
    long = runner.new_run_dir(tmp_path, "é" * 300)  # 600 bytes of name: cut to fit a file name
    assert len(long.name.encode()) <= NAME_MAX - 6 and long.name.endswith("é")


def test_write_json_and_write_metrics_round_trip(tmp_path):
    runner.write_json(tmp_path / "s.json", {"status": "finished", "AP": 0.25})
    assert json.loads((tmp_path / "s.json").read_text()) == {"status": "finished", "AP": 0.25}
    history = [{"iteration": 10, "loss": 1.5}, {"iteration": 20, "loss": 1.25}]
    runner.write_metrics(tmp_path / "metrics.jsonl", history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    runner.write_metrics(tmp_path / "metrics.jsonl", [])  # a new run: the file exists and is empty
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_phases_add_up_each_named_block():
    phases = runner.Phases()
    for name in ("data", "train", "data"):
        with phases(name):
            pass
    assert sorted(phases.seconds) == ["data", "train"] and all(s >= 0 for s in phases.seconds.values())
    with pytest.raises(KeyError), phases("eval"):  # a block that raises still counts
        raise KeyError("x")
    assert "eval" in phases.seconds


def test_resume_spec_from_a_path_per_config_or_none(tmp_path):
    cfg = build_config("tiny", {"train.out_dir": str(tmp_path / "runs")})
    with pytest.raises(AblateError, match="no such resume checkpoint"):
        runner.resume_spec(cfg, tmp_path / "missing.pt", 0)
    given = tmp_path / "r.pt"
    given.write_bytes(b"")
    assert runner.resume_spec(cfg, given, 5) == ResumeSpec(given, 5)
    assert runner.resume_spec(cfg, None, 50) == ResumeSpec(tmp_path / "runs" / f"resume-{config_hash(cfg)}.pt", 50)
    assert runner.resume_spec(cfg, None, 0) is None


def test_a_resume_checkpoint_goes_on_with_as_many_processes_as_wrote_it(tmp_path):
    resume = ResumeSpec(tmp_path / "r.pt", 10)
    one, two = Ranks(rank=0, world_size=1), Ranks(rank=0, world_size=2)
    runner.check_world_size(None, two, resume)  # nothing saved: nothing to match
    runner.check_world_size({"rng_ranks": [1, 2]}, two, resume)
    with pytest.raises(runner.WorldSizeMismatch, match="written by 2 process\\(es\\), resumed on 1; resume with --nproc 2"):
        runner.check_world_size({"rng_ranks": [1, 2]}, one, resume)
    runner.check_world_size({}, one, resume)  # an old checkpoint without rng_ranks: one process


def test_the_data_position_resumes_only_with_as_many_batches_per_epoch(tmp_path):
    resume = ResumeSpec(tmp_path / "r.pt", 10)
    saved = {"data": {"batches_per_epoch": 4}}
    runner.check_data_position(saved, [0] * 4, resume)
    runner.check_data_position(None, [0] * 3, resume)
    with pytest.raises(AblateError, match="written with 4 batches per epoch, the training set now gives 3"):
        runner.check_data_position(saved, [0] * 3, resume)


def test_a_split_without_images_or_classes_is_not_trainable():
    with pytest.raises(DataError, match="a.json: no images to train on"):
        runner.check_trainable(_Split(0, 2))
    with pytest.raises(DataError, match="a.json: no classes to train"):
        runner.check_trainable(_Split(3, 0))
    runner.check_trainable(_Split(3, 2))


class _Split:
    """The two things check_trainable reads of a data set: its length and its classes."""

    def __init__(self, images: int, classes: int):
        self.ann_file, self.num_classes, self._images = "a.json", classes, images

    def __len__(self) -> int:
        return self._images


@pytest.mark.slow
def test_a_failing_plot_never_costs_the_checkpoint(tmp_path: Path, monkeypatch):
    """The loss-curve plot raised (a non-UTF-8 experiment name broke matplotlib's font code) before
    checkpoint.pt was written: the plot is now drawn after the run returns (by the edge that ran it,
    from metrics.jsonl), and its failure is a warning."""
    from ablate import analysis

    def broken_plot(*args, **kwargs):
        raise RuntimeError("FT2Font: cannot draw this title")

    monkeypatch.setattr(analysis, "loss_curve_png", broken_plot)
    root = write_tiny_coco(tmp_path / "tiny")
    cfg = build_config("tiny", {"data.source": "coco", "data.root": str(root), "data.cache_images": False,
                                "data.min_size": 64, "data.max_size": 64, "train.batch_size": 2,
                                "train.iterations": 2, "train.log_every": 1, "train.out_dir": str(tmp_path / "runs")})
    run = runner.run_training(cfg, name="plot", console=None, show_progress=False)
    with pytest.warns(UserWarning, match="loss_curve.png not drawn"):
        analysis.draw_loss_curve(run.run_dir, "plot")
    assert run.outcome is Outcome.FINISHED
    assert (Path(run.run_dir) / "checkpoint.pt").is_file()
    assert (Path(run.run_dir) / "eval.json").is_file()


def test_running_out_of_memory_names_the_keys_to_lower():
    """An allocation that fails while training (within the bounds: a big batch at 8192 px) is one
    line naming data.max_size, train.batch_size and the anchor keys; other errors pass unchanged."""
    cfg = build_config("tiny", {"data.max_size": 4096, "train.batch_size": 64})
    for error in (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
                  torch.OutOfMemoryError("CUDA out of memory")):
        with pytest.raises(AblateError, match=r"out of memory .*data.max_size \(4096\), train.batch_size \(64\)"):
            with runner.out_of_memory_names_keys(cfg):
                raise error
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with runner.out_of_memory_names_keys(cfg):
            raise RuntimeError("shape mismatch")


NO_PLOTTING = """
import sys
{before}
plotting = sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "seaborn")
                  or m.startswith(("ablate.report", "ablate.analysis")))
assert not plotting, plotting[:5]
"""


def _check_no_plotting(code: str, cwd: Path) -> None:
    """Run `code` in a fresh interpreter, then fail if any plotting module was imported."""
    result = subprocess.run([sys.executable, "-c", NO_PLOTTING.format(before=code)], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_training_run_imports_no_plotting(tmp_path: Path, tiny_coco: Path):
    """Importing training (runner, engine, imbalance) and running it to the end (train, checkpoint,
    evaluate, write): still no plotting module; the edge that ran it draws loss_curve.png from
    metrics.jsonl afterwards. (One fresh interpreter for both: each costs ~3 s of imports.)"""
    overrides = {"data.source": "coco", "data.root": str(tiny_coco), "data.cache_images": False,
                 "data.min_size": 64, "data.max_size": 64, "train.batch_size": 2, "train.iterations": 2,
                 "train.log_every": 1, "train.out_dir": str(tmp_path / "runs")}
    code = ("import ablate.runner, ablate.engine, ablate.imbalance\n"
            "from ablate.config import build_config\nfrom ablate.runner import run_training\n"
            f"run = run_training(build_config('tiny', {overrides!r}), name='t', console=None, show_progress=False)\n"
            f"open({str(tmp_path / 'run_dir.txt')!r}, 'w').write(run.run_dir)")
    _check_no_plotting(code, tmp_path)
    run_dir = Path((tmp_path / "run_dir.txt").read_text())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert not (run_dir / "loss_curve.png").exists()
    from ablate.analysis import draw_loss_curve

    draw_loss_curve(run_dir, "t")
    assert (run_dir / "loss_curve.png").stat().st_size > 0
