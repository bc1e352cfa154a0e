"""Mid-run resume: a run stopped (or killed) and resumed from its resume checkpoint equals an
uninterrupted run bit for bit on CPU; the data order resumes at any batch; checkpoints are written
atomically and refused for another config; SIGTERM asks for a polite stop (ablate.signals); and
`ablate train` end to end: SIGTERM, exit 130, --resume, the same AP."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import cli_zygote
from ablate import builders, checkpoint, signals
from ablate.checkpoint import ResumeSpec, discard_resume, load_resume, save_resume
from ablate.config import build_config, config_hash
from ablate.errors import AblateError
from ablate.runner import run_training
from ablate.runs import Outcome, RunRecord

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("iteration", "lr", "loss", "loss_cls", "loss_box_reg", "num_fg", "num_bg", "num_ignored")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path: Path, **overrides):
    """24 iterations of 8 images of a 64-image synth set, logged every 4: a few seconds."""
    return build_config("tiny", {"synth.num_train": 64, "synth.num_val": 16, "train.batch_size": 8,
                                 "train.iterations": 24, "train.warmup_iters": 4, "train.log_every": 4,
                                 "train.out_dir": str(tmp_path / "runs"), **overrides})


def train(cfg, **kwargs) -> RunRecord:
    return run_training(cfg, name="t", console=None, show_progress=False, **kwargs)


def stop_after(n: int):
    """A stop() that says stop once `n` iterations are done (it is asked once per iteration)."""
    calls = itertools.count(1)
    return lambda: next(calls) == n


def logged(run_dir: str | Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: m[k] for k in LOSSES} for m in map(json.loads, lines)]


def assert_same_run(resumed: RunRecord, full: RunRecord) -> None:
    assert resumed.outcome is full.outcome is Outcome.FINISHED
    assert logged(resumed.run_dir) == logged(full.run_dir)  # every logged step, exactly
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert resumed.metrics[key] == full.metrics[key]
    detections = [(Path(s.run_dir) / "detections.json").read_bytes() for s in (resumed, full)]
    assert detections[0] == detections[1]


# ----------------------------------------------------------------------------- stop and resume


@pytest.mark.slow
@pytest.mark.parametrize("normalizer", ["batch", "ema"])
def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, one_thread, normalizer):
    cfg = tiny(tmp_path, **{"loss.normalizer": normalizer})
    full = train(cfg)
    saved = []
    spec = ResumeSpec(tmp_path / "ck" / "resume.pt", every=4, meta={"run_id": "r1"}, on_saved=saved.append)
    stopped = train(cfg, resume=spec, stop=stop_after(10))
    assert (stopped.outcome, stopped.iterations, stopped.resume_checkpoint) == (
        Outcome.INTERRUPTED, 10, str(spec.path))
    assert stopped.metrics == {} and saved == [4, 8, 10]  # every 4, and when stopped
    sidecar = json.loads(spec.path.with_suffix(".json").read_text())
    assert (sidecar["iteration"], sidecar["config_hash"], sidecar["meta"]) == (10, config_hash(cfg), {"run_id": "r1"})
    assert [m["iteration"] for m in logged(stopped.run_dir)] == [4, 8]

    resumed = train(cfg, resume=spec)
    assert resumed.resumed_from == 10 and full.resumed_from is None
    assert resumed.run_dir == stopped.run_dir  # the run goes on in its folder
    assert saved == [4, 8, 10, 12, 16, 20]
    assert_same_run(resumed, full)  # the interval 9-12 spans the stop: its means still match
    assert resumed.train_seconds >= stopped.train_seconds


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, one_thread):
    """Killed at iteration 12 after logging it, with the last checkpoint at 8: the resumed run
    repeats 9-12 and its metrics.jsonl holds each line once."""
    cfg = tiny(tmp_path, **{"loss.normalizer": "ema"})
    full = train(cfg)
    spec = ResumeSpec(tmp_path / "ck" / "resume.pt", every=8)

    def die_at_12(step, metrics):
        if step == 12:
            raise SystemExit("killed")  # stands for SIGKILL: nothing of the run's handles it

    with pytest.raises(SystemExit):
        train(cfg, resume=spec, on_log=die_at_12)
    assert json.loads(spec.path.with_suffix(".json").read_text())["iteration"] == 8
    assert_same_run(train(cfg, resume=spec), full)


def test_stop_without_a_resume_spec_ends_interrupted_without_a_checkpoint(tmp_path, one_thread):
    cfg = tiny(tmp_path, **{"train.iterations": 6})
    run = train(cfg, stop=stop_after(2))
    assert (run.outcome, run.iterations, run.resume_checkpoint) == (Outcome.INTERRUPTED, 2, None)
    assert json.loads((Path(run.run_dir) / "summary.json").read_text())["status"] == Outcome.INTERRUPTED


def test_a_resume_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = tiny(tmp_path)
    path = tmp_path / "ck" / "resume.pt"
    save_resume(ResumeSpec(path), 3, cfg, "0123456789ab", {})
    with pytest.raises(AblateError) as err:
        train(cfg, resume=ResumeSpec(path))
    message = str(err.value)
    assert str(path) in message and "0123456789ab" in message and "\n" not in message
    assert not (tmp_path / "runs").exists()  # refused before any run folder


def test_a_file_that_is_no_resume_checkpoint_is_refused(tmp_path):
    path = tmp_path / "resume.pt"
    path.write_bytes(b"not torch")
    with pytest.raises(AblateError, match="not a resume checkpoint"):
        load_resume(path, "x")


# ----------------------------------------------------------------------------- atomic writes


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    spec = ResumeSpec(tmp_path / "resume.pt", meta={"run_id": "r"})
    save_resume(spec, 4, cfg, config_hash(cfg), {"weights": torch.arange(1000.0)})

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_resume(spec, 8, cfg, config_hash(cfg), {"weights": torch.zeros(1000)})
    monkeypatch.undo()
    ckpt = load_resume(spec.path, config_hash(cfg))
    assert ckpt["iteration"] == 4 and torch.equal(ckpt["weights"], torch.arange(1000.0))
    assert json.loads(spec.path.with_suffix(".json").read_text())["iteration"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.json", "resume.pt"]  # no temporary file
    discard_resume(spec.path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- data order


def batches_of(loader: DataLoader, n: int) -> list[list[int]]:
    return list(itertools.islice(builders.forever(loader), n))


@pytest.mark.parametrize(("num_samples", "batch_size", "workers"), [(20, 8, 0), (24, 8, 0), (21, 4, 2)])
def test_shuffled_batches_give_the_old_dataloader_order(num_samples, batch_size, workers):
    data = list(range(num_samples))
    old = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=list,
                     num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(3))
    new = DataLoader(data, collate_fn=list, num_workers=workers, persistent_workers=workers > 0,
                     batch_sampler=builders.ShuffledBatches(num_samples, batch_size, 3,
                                                            seed_draw_every_epoch=workers == 0))
    assert batches_of(new, 30) == batches_of(old, 30)  # several epochs


@pytest.mark.parametrize("every_epoch", [True, False])
@pytest.mark.parametrize("start", [0, 1, 4, 5, 11, 17])
def test_shuffled_batches_started_at_k_give_the_tail_of_the_sequence(start, every_epoch):
    def loader(start: int) -> DataLoader:
        sampler = builders.ShuffledBatches(21, 4, 7, start=start, seed_draw_every_epoch=every_epoch)
        return DataLoader(list(range(21)), collate_fn=list, batch_sampler=sampler)

    assert batches_of(loader(start), 30 - start) == batches_of(loader(0), 30)[start:]


# ----------------------------------------------------------------------------- signals


def test_graceful_stop_turns_the_first_sigterm_into_a_flag_and_the_second_into_an_interrupt():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with signals.graceful_stop() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once; never reached
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_graceful_stop_takes_sigint_too():
    with signals.graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()


def test_graceful_stop_outside_the_main_thread_never_stops():
    seen = []

    def body():
        with signals.graceful_stop() as stop:
            seen.append(stop())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [False]


# ----------------------------------------------------------------------------- ablate train, end to end


def cli(*args: str, out: Path) -> list[str]:
    """The arguments of `python cli.py train smoke ...` (run from the zygote, tests/cli_zygote.py)."""
    return ["train", "smoke", "--out", str(out), "--no-progress", "--set", "train.iterations=30",
            "--set", "synth.num_val=8", "--set", "data.min_size=64", "--set", "data.max_size=64", *args]


def run_folder_of(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


@pytest.mark.slow
def test_ablate_train_stopped_by_sigterm_resumes_to_the_same_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = cli_zygote.start(cli("--checkpoint-every", "5", out=tmp_path / "a"), ROOT, env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "a").glob("resume-*.json")):  # the first checkpoint: training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "interrupted at iteration" in output and "Traceback" not in output
    (path,) = (tmp_path / "a").glob("resume-*.pt")
    stopped_at = json.loads(path.with_suffix(".json").read_text())["iteration"]
    assert 5 <= stopped_at < 30

    resumed = cli_zygote.run(cli("--resume", str(path), out=tmp_path / "a"), ROOT, env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not path.exists() and not path.with_suffix(".json").exists()  # a finished run's are discarded
    full = cli_zygote.run(cli(out=tmp_path / "b"), ROOT, env, timeout=300)
    assert full.returncode == 0, full.stderr

    runs = [run_folder_of(tmp_path / name) for name in ("a", "b")]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["resumed_from"] == stopped_at
    evals = [json.loads((run / "eval.json").read_text()) for run in runs]
    assert {k: evals[0][k] for k in ("AP", "AP50", "AP75")} == {k: evals[1][k] for k in ("AP", "AP50", "AP75")}
    assert logged(runs[0]) == logged(runs[1])
    assert (runs[0] / "detections.json").read_bytes() == (runs[1] / "detections.json").read_bytes()
