"""One training run end to end, with its files: config, metrics, checkpoint, detections, COCO stats.

This is the edge where a run touches the disk, and it consumes a whole config: the builders turn it
into parts, the engine only computes. A run folder holds:
    config.json        the resolved config (nested) and its hash
    metrics.jsonl      one line per logged interval (a resumed run's: the whole run's, each once)
    checkpoint.pt      model weights + config + class names (and every N iterations: checkpoint_N.pt)
    detections.json    COCO results on the val split
    eval.json          COCO metrics
    summary.json       status (an Outcome), final metrics, timings, data statistics, resumed_from
and loss_curve.png, which the caller draws from metrics.jsonl (analysis.draw_loss_curve): training
imports no plotting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from ablate import builders, distributed, engine
from ablate.model import memory_format
from ablate.checkpoint import (ResumeSpec, atomic_write, load_resume, rng_states, save_checkpoint, save_resume,
                               set_rng_states)
from ablate.config import Config, config_hash, from_dict, to_dict
from ablate.errors import AblateError, DataError
from ablate.evaluation import save_results
from ablate.imbalance import anchor_balance
from ablate.paths import NAME_MAX, check_writable_folder
from ablate.runs import Outcome, RunRecord


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Phases:
    """Wall seconds spent in each phase of a run (data, setup, train, eval, write), for the grid's
    time breakdown: `with phases("data"): ...` adds the block's time to phase "data"."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # The folder's name holds the stamp, the name and a suffix: the name is cut to fit NAME_MAX bytes.
    name = os.fsencode(name)[:NAME_MAX - len(stamp) - 8].decode("utf-8", "ignore")
    path = Path(out_dir) / f"{stamp}-{name}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(out_dir) / f"{stamp}-{name}-{suffix}"
    path.mkdir(parents=True)
    return path


def write_json(path: Path, data: Any) -> None:
    """Atomic: an interrupted write never leaves half a file."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def run_training(cfg: Config, **kwargs) -> RunRecord:
    """Train, checkpoint and evaluate one config (see `train_and_evaluate` for the arguments), on
    one process or, under torchrun or with train.nproc > 1, as rank 0 of several (DDP: see
    ablate.distributed). Returns rank 0's record of the run."""
    launched = distributed.from_env()
    if launched is None and cfg.train.nproc == 1:
        return train_and_evaluate(cfg, **kwargs)
    if kwargs.get("on_eval") is not None:
        raise AblateError("train.nproc: evaluating during training (a search's pruning) runs on one process only")
    device = builders.resolve_device(cfg.train.device)
    backend = distributed.backend_for(cfg.train.backend, device)
    builders.fetch_weights(cfg)  # once, before the ranks start: they would all download it at once
    if launched is not None:  # one of torchrun's processes: only rank 0 speaks, writes and tracks
        if not launched.is_main:
            kwargs = quiet_rank_arguments(kwargs)
        with distributed.joined(launched, backend) as ranks:
            return train_and_evaluate(cfg, ranks=ranks, **kwargs)
    distributed.check_nproc(cfg.train.nproc, device)
    resume = kwargs.get("resume")
    other_ranks = (to_dict(cfg), (resume.path, resume.every) if resume else None)
    with distributed.spawned(cfg.train.nproc, backend, train_other_rank, other_ranks) as ranks:
        return train_and_evaluate(cfg, ranks=ranks, **kwargs)


def quiet_rank_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a rank other than 0 keeps of run_training's arguments: the resume file and the stop."""
    return {"resume": kwargs.get("resume"), "stop": kwargs.get("stop"), "show_progress": False}


def train_other_rank(rank: int, world_size: int, backend: str, init_method: str, cfg_dict: dict,
                     resume: tuple[str, int] | None) -> None:
    """A rank 1..N-1 that rank 0 started (`distributed.spawned`): trains its share of each batch."""
    cfg = from_dict(cfg_dict)
    spec = ResumeSpec(Path(resume[0]), resume[1]) if resume else None
    with distributed.joined(distributed.Ranks(rank, world_size, rank), backend, init_method) as ranks:
        train_and_evaluate(cfg, ranks=ranks, show_progress=False, resume=spec)


def train_and_evaluate(cfg: Config, *, name: str = "train", run_dir: Path | None = None,
                       console: Console | None = None, show_progress: bool = True, progress=None,
                       on_log: Callable[[int, dict[str, float]], None] | None = None, eval_every: int = 0,
                       on_eval: Callable[[int, dict[str, float]], bool] | None = None,
                       resume: ResumeSpec | None = None, stop: Callable[[], bool] | None = None,
                       ranks: distributed.Ranks = distributed.SINGLE) -> RunRecord:
    """Train, checkpoint and evaluate one config; returns its record (also in summary.json).

    `console` None keeps it quiet (grid workers); `progress` is a display to add the bars to.
    Every `eval_every` iterations the val metrics go to `on_eval(iteration, metrics)`, which may stop
    the run by returning True (the search's pruner): the run then ends PRUNED.

    `resume`: where the run keeps its resume checkpoint; if that file exists the run continues from
    it (in the run folder it was written from, when that still exists), and one is written every
    `resume.every` iterations. `stop()`, asked once per iteration, ends the run INTERRUPTED
    after writing the resume checkpoint (if `resume`), without evaluating. On CPU a resumed run's
    losses, weights and metrics equal an uninterrupted run's bit for bit (with data.num_workers 0;
    with workers, its images and their order, but not its flips: see builders.build_loader).

    The run's folder gets no plot: the caller draws loss_curve.png from its metrics.jsonl
    (analysis.draw_loss_curve), so that training never imports the plotting stack.
    """
    if run_dir is None:  # before any work: a run that cannot write its folder should not train first
        check_writable_folder(cfg.train.out_dir, "train.out_dir")
    saved = load_resume(resume.path, config_hash(cfg)) if resume and Path(resume.path).exists() else None
    check_world_size(saved, ranks, resume)
    set_seed(cfg.train.seed)
    phases = Phases()
    device = distributed.rank_device(builders.resolve_device(cfg.train.device), ranks)
    bars = show_progress and progress is None  # a display of the caller's already holds the terminal
    with phases("data"):
        root = builders.data_root(cfg, progress=bars)
        train_set = builders.build_dataset(cfg.data, root, cfg.data.train_split, train=True, progress=bars)
        check_trainable(train_set)
        if not ranks.is_main:  # ranks other than 0 only train: no files, no evaluation
            return train_other_share(cfg, train_set, device, ranks, saved, resume, stop)
        val_set, val_loader = builders.build_val_loader(cfg, root, progress=bars)
        builders.check_same_classes(train_set.category_names, val_set, f"the train split ({train_set.ann_file})")
    builders.fetch_weights(cfg)
    # The run folder only once the data and weights are known good: bad input leaves no empty run behind.
    run_dir = open_run_dir(cfg, run_dir, saved, name)
    with phases("setup"):
        balance = anchor_balance(train_set, builders.build_anchor_generator(cfg), builders.build_matcher(cfg))
    if console:
        say_data(console, cfg, root, train_set, val_set, balance, ranks)
    with phases("setup"):
        parts, state, loader = build_training_parts(cfg, train_set, device, ranks, saved)
    check_parts(cfg, train_set, parts.model, device, console, saved, loader, resume)
    net = distributed.unwrap(parts.model)  # what is saved and evaluated
    if saved:  # the lines logged before the checkpoint, each once (a killed run may have logged more)
        write_metrics(run_dir / "metrics.jsonl", state.history)

    def evaluate() -> tuple[dict[str, float], list[dict]]:
        return engine.evaluate(net, val_loader, val_set, builders.build_postprocess(cfg), device,
                               amp=cfg.train.amp, show_progress=show_progress, progress=progress)

    asked = engine.TrainHooks(log=on_log, evaluate=(lambda it: on_eval(it, evaluate()[0])) if on_eval else None,
                              eval_every=eval_every, stop=stop, progress=progress, show_progress=show_progress)
    hooks = folder_hooks(asked, cfg, run_dir, parts, train_set, len(loader), resume, ranks)
    start_rngs(cfg, saved, ranks)
    if saved and console:
        console.print(escape(f"resuming from {resume.path} at iteration {state.iteration}"))
    with phases("train"), out_of_memory_names_keys(cfg):
        outcome = engine.train(parts, builders.forever(loader), train_plan(cfg, device), hooks=hooks, state=state,
                               ranks=ranks)
    record = RunRecord(outcome.status, iterations=outcome.iterations, diverged_at=outcome.diverged_at,
                       train_seconds=outcome.seconds, resumed_from=saved["iteration"] if saved else None,
                       processes=ranks.world_size, config_hash=config_hash(cfg), run_dir=str(run_dir),
                       data={"root": str(root or train_set.ann_file), **train_set.stats.as_dict()}, anchors=balance)
    if outcome.status is Outcome.INTERRUPTED:
        record.resume_checkpoint = str(resume.path) if resume else None
    save_and_evaluate(record, outcome, cfg, run_dir, net, train_set, evaluate, phases)
    record.phase_seconds = phases.seconds
    write_json(run_dir / "summary.json", record.summary_json())
    return record


def save_and_evaluate(record: RunRecord, outcome: engine.TrainOutcome, cfg: Config, run_dir: Path,
                      net: torch.nn.Module, train_set, evaluate: Callable[[], tuple[dict[str, float], list[dict]]],
                      phases: Phases) -> None:
    """A finished run's model (checkpoint.pt), then its detections and COCO metrics on the val split
    (detections.json, eval.json), the metrics into `record`; nothing for a run that did not finish."""
    with phases("write"):
        if outcome.status is Outcome.FINISHED:
            save_checkpoint(run_dir / "checkpoint.pt", net, cfg, train_set.category_names, train_set.category_ids,
                            outcome.iterations)
    if outcome.status is not Outcome.FINISHED:
        return
    with phases("eval"):
        metrics, records = evaluate()
        save_results(records, run_dir / "detections.json")
        write_json(run_dir / "eval.json", metrics)
    record.metrics, record.eval_seconds = metrics, phases.seconds["eval"]


def open_run_dir(cfg: Config, run_dir: Path | None, saved: dict[str, Any] | None, name: str) -> Path:
    """The run's folder (`run_dir`, else a resumed run's when it is still there, else a new one),
    with its config.json."""
    if run_dir is None and saved and Path(saved["run_dir"]).is_dir():
        run_dir = Path(saved["run_dir"])
    run_dir = run_dir or new_run_dir(cfg.train.out_dir, name)
    write_json(run_dir / "config.json", {"hash": config_hash(cfg), "config": to_dict(cfg)})
    return run_dir


def say_data(console: Console, cfg: Config, root: Path | None, train_set, val_set, balance: dict[str, float],
             ranks: distributed.Ranks) -> None:
    """The data, its anchor imbalance and the processes, as the run starts."""
    console.print(escape(f"data {root or train_set.ann_file}: {len(train_set)} train / {len(val_set)} val images, "
                         f"{len(train_set.category_names)} classes; train stats {train_set.stats.as_dict()}"))
    console.print(f"anchors per image {balance['anchors_per_image']:.0f}: foreground "
                  f"{balance['fg_per_image']:.1f}, background {balance['bg_per_image']:.0f} "
                  f"(1:{balance['bg_per_fg']:.0f}), ignored {balance['ignored_per_image']:.1f}")
    if ranks.distributed:
        console.print(f"training on {ranks.world_size} processes ({dist_backend()}): "
                      f"{cfg.train.batch_size // ranks.world_size} images each per batch of {cfg.train.batch_size}")


def check_parts(cfg: Config, train_set, model: torch.nn.Module, device: torch.device, console: Console | None,
                saved: dict[str, Any] | None, loader, resume: ResumeSpec | None) -> None:
    """Before the first step: a train split without boxes and a model kept in NCHW said loudly, and
    a resumed run's data position checked."""
    if train_set.stats.num_boxes == 0:
        warn_no_boxes(train_set, console)
    unsafe = memory_format.unsafe_convolutions(model) if device.type == "cpu" else []
    if console and cfg.train.channels_last and unsafe:
        console.print(escape(f"note: {unsafe[0]} is a strided 1x1 convolution of fewer than "
                             f"{memory_format.ONEDNN_MIN_SAFE_CHANNELS} input channels: training in NCHW, not "
                             "channels_last (oneDNN issue 6035 hangs or corrupts it on CPU)"), style="yellow")
    check_data_position(saved, loader, resume)


def train_plan(cfg: Config, device: torch.device) -> engine.TrainPlan:
    t = cfg.train
    return engine.TrainPlan(device, t.iterations, log_every=t.log_every, amp=t.amp, channels_last=t.channels_last)


def folder_hooks(asked: engine.TrainHooks, cfg: Config, run_dir: Path, parts: engine.TrainParts, train_set,
                 batches_per_epoch: int, resume: ResumeSpec | None, ranks: distributed.Ranks) -> engine.TrainHooks:
    """The caller's hooks (`asked`) with the run folder's: each logged line appended to metrics.jsonl
    (then `asked.log`), a model checkpoint every train.checkpoint_every, and with `resume` a resume
    checkpoint every resume.every iterations and when stopped."""
    net = distributed.unwrap(parts.model)

    def log(step: int, metrics: dict[str, float]) -> None:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if asked.log:
            asked.log(step, metrics)

    def checkpoint(iteration: int) -> None:
        save_checkpoint(run_dir / f"checkpoint_{iteration}.pt", net, cfg, train_set.category_names,
                        train_set.category_ids, iteration)

    def save_state(state: engine.TrainState) -> None:
        rngs = ranks.gather(rng_states())  # every rank's, for each to go on with its own
        saved = resume_parts(net, parts.optimizer, parts.scheduler, parts.criterion, state, batches_per_epoch,
                             run_dir, rngs)
        save_resume(resume, state.iteration, cfg, config_hash(cfg), saved)

    return dataclasses.replace(asked, log=log, checkpoint=checkpoint, checkpoint_every=cfg.train.checkpoint_every,
                               save_state=save_state if resume else None, save_every=resume.every if resume else 0)


@contextlib.contextmanager
def out_of_memory_names_keys(cfg: Config):
    """An allocation that fails while training (the allocator's traceback, or CUDA's out of memory)
    as one AblateError naming the keys that set a step's memory, for the user to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "alloc" not in str(e):
            raise
        raise AblateError(f"out of memory while training ({type(e).__name__}); lower data.max_size "
                          f"({cfg.data.max_size}), train.batch_size ({cfg.train.batch_size}) or the anchors per "
                          f"location (model.num_scales {cfg.model.num_scales} x {len(cfg.model.aspect_ratios)} "
                          "model.aspect_ratios)") from None


def check_trainable(train_set) -> None:
    """A training split with images and classes: without either there is no model to fit (an empty
    val split is fine: its AP is n/a)."""
    if len(train_set) == 0:
        raise DataError(f"{train_set.ann_file}: no images to train on ('images' is empty)")
    if train_set.num_classes == 0:
        raise DataError(f"{train_set.ann_file}: no classes to train ('categories' is empty, or "
                        "data.categories keeps none)")


def warn_no_boxes(train_set, console: Console | None) -> None:
    """A train split without a single box trains a model that only ever says background: legal (the
    run still goes), but almost always a wrong file or category filter, so it is said loudly."""
    message = (f"warning: {train_set.ann_file}: the train split has no boxes to learn from "
               f"({train_set.stats.num_crowd} crowd/difficult, {train_set.stats.num_degenerate} degenerate, "
               "category filter data.categories applied); the model will learn background only")
    if console:
        console.print(escape(message), style="yellow", soft_wrap=True)
    else:
        warnings.warn(message, stacklevel=2)


def resume_spec(cfg: Config, path: Path | None, every: int) -> ResumeSpec | None:
    """The resume checkpoint of `ablate train`: `path` (which must exist) to continue from, else one
    per config in train.out_dir (resume-HASH.pt) when `every` > 0, continued from if a stopped run
    left it; None for neither (a stopped run then keeps only its logged metrics)."""
    if path is not None:
        if not path.is_file():
            raise AblateError(f"{path}: no such resume checkpoint")
        return ResumeSpec(path, every)
    if every:
        return ResumeSpec(Path(cfg.train.out_dir) / f"resume-{config_hash(cfg)}.pt", every)
    return None


def resume_parts(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, criterion, state: engine.TrainState,
                 batches_per_epoch: int, run_dir: Path, rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a resume checkpoint holds besides its head (iteration, config, hash, meta): every part
    whose state the next iteration depends on. The data position is the iteration itself (the
    loader starts at that batch); the batches per epoch are kept to check that the data is the same.
    `rngs`: each rank's RNG states (default: this process's); `rng` is rank 0's, as before DDP."""
    # No AMP GradScaler to save: autocast runs in bf16 (engine.autocast), which needs no loss scaling.
    # The model's state is the same on every rank (DDP), and so are the optimiser's and schedule's;
    # the EMA normaliser is rank 0's (each rank keeps its own; see criterion).
    rngs = rngs or [rng_states()]
    parts = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "criterion": criterion.state_dict(), "rng": rngs[0], "train": state.as_dict(),
             "data": {"batches_per_epoch": batches_per_epoch}, "run_dir": str(run_dir)}
    if len(rngs) > 1:
        parts["rng_ranks"] = rngs
    return parts


def build_training_parts(cfg: Config, train_set, device: torch.device, ranks: distributed.Ranks,
                         saved: dict[str, Any] | None) -> tuple[engine.TrainParts, engine.TrainState, Any]:
    """The parts (model DDP-wrapped on several ranks, criterion, optimiser, schedule), the loop's
    state (a resumed run's) and this rank's loader, from `cfg`; every rank builds the same."""
    model = builders.build_model(cfg, len(train_set.category_names))
    if ranks.distributed:
        model = distributed.global_batchnorm(model, device)
    model = model.to(device)
    # NHWC: faster convolutions on CUDA and on CPU (oneDNN) alike, measured; NCHW where oneDNN's
    # NHWC kernel is faulty (ablate/model/memory_format.py), and the loop follows the model.
    if memory_format.use_channels_last(model, device, cfg.train.channels_last):
        model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    optimizer = builders.build_optimizer(model, t)
    scheduler = builders.build_scheduler(optimizer, t)
    criterion = builders.build_criterion(cfg, ranks)
    state = restore(saved, model, optimizer, scheduler, criterion) if saved else engine.TrainState()
    model = distributed.wrap(model, device, ranks)
    loader = builders.build_loader(train_set, t.batch_size, cfg.data.num_workers, shuffle=True, seed=t.seed,
                                   pin_memory=device.type == "cuda", start=state.iteration, ranks=ranks)
    return engine.TrainParts(model, criterion, optimizer, scheduler), state, loader


def train_other_share(cfg: Config, train_set, device: torch.device, ranks: distributed.Ranks,
                      saved: dict[str, Any] | None, resume: ResumeSpec | None, stop) -> RunRecord:
    """A rank other than 0: the same parts and loop as rank 0, on its share of each batch; it
    joins rank 0's resume checkpoints (its RNG states) and writes nothing itself."""
    parts, state, loader = build_training_parts(cfg, train_set, device, ranks, saved)

    def save_state(state: engine.TrainState) -> None:
        ranks.gather(rng_states())

    start_rngs(cfg, saved, ranks)
    hooks = engine.TrainHooks(save_state=save_state if resume else None, save_every=resume.every if resume else 0,
                              stop=stop, show_progress=False)
    outcome = engine.train(parts, builders.forever(loader), train_plan(cfg, device), hooks=hooks, state=state,
                           ranks=ranks)
    return RunRecord(outcome.status, iterations=outcome.iterations, rank=ranks.rank)


def start_rngs(cfg: Config, saved: dict[str, Any] | None, ranks: distributed.Ranks) -> None:
    """The RNGs as the loop starts: a resumed run's where each rank left them; a new run's seeded
    per rank (rank 0 as on one process, the others distinctly: their flips differ). Last, because
    building the parts drew from the RNGs."""
    if saved:
        set_rng_states(saved["rng_ranks"][ranks.rank] if ranks.distributed else saved["rng"])
    elif not ranks.is_main:
        set_seed(distributed.rank_seed(cfg.train.seed, ranks.rank))


class WorldSizeMismatch(AblateError):
    """A resume checkpoint of another number of processes: it stays for a worker with that many."""


def check_world_size(saved: dict[str, Any] | None, ranks: distributed.Ranks, resume: ResumeSpec | None) -> None:
    """A resume checkpoint goes on with as many processes as wrote it (each rank's RNGs are in it)."""
    written = len(saved.get("rng_ranks", [None])) if saved else ranks.world_size
    if written != ranks.world_size:
        raise WorldSizeMismatch(f"{resume.path}: written by {written} process(es), resumed on {ranks.world_size}; "
                                f"resume with --nproc {written}")


def dist_backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else "one process"


def restore(saved: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, criterion) -> engine.TrainState:
    """Put the parts back where a resume checkpoint left them; returns the engine's state."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    criterion.load_state_dict(saved["criterion"])
    return engine.TrainState(**saved["train"])


def check_data_position(saved: dict[str, Any] | None, loader, resume: ResumeSpec | None) -> None:
    """The data order resumes at the iteration's batch only if an epoch still has as many batches."""
    if saved and saved["data"]["batches_per_epoch"] != len(loader):
        raise AblateError(f"{resume.path}: written with {saved['data']['batches_per_epoch']} batches per epoch, "
                          f"the training set now gives {len(loader)}; the data changed since")


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """metrics.jsonl holding exactly `history` (empty for a new run), written atomically."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(m) + "\n" for m in history).encode()))
