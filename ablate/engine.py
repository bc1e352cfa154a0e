"""The training loop and evaluation. Both return plain metric dicts; what to do with them (files,
MLflow) is the caller's business, reached through the loop's hooks (`TrainHooks`).

Both take injected parts (model, criterion, optimiser and schedule: `TrainParts`; post-processing)
and plain settings (`TrainPlan`); the runner builds them from a config."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ablate.criterion import DetectionLoss
from ablate.data.coco import Batch, CocoDetection
from ablate.distributed import SINGLE, Ranks
from ablate.evaluation import coco_evaluate, detections_to_coco
from ablate.model.memory_format import memory_format
from ablate.postprocess import Postprocess
from ablate import lease
from ablate.runs import Outcome

LogFn = Callable[[int, dict[str, float]], None]
LOGGED = ("loss", "loss_cls", "loss_box_reg", "num_fg", "num_bg", "num_ignored")  # summed per interval
LOSSES = ("loss", "loss_cls", "loss_box_reg")


@dataclass
class TrainState:
    """How far a run got: what the loop needs, besides the model, optimiser, schedule and loss, to
    go on from there (a resume checkpoint holds it). `sums`, `images`, `interval_seconds` and
    `data_seconds` are the running totals of the log interval under way, so that a logged line
    spanning a stop and a resume averages the same iterations as without one."""

    iteration: int = 0  # iterations done
    history: list[dict[str, float]] = field(default_factory=list)  # every line logged so far
    seconds: float = 0.0  # training time over every attempt
    sums: dict[str, float] = field(default_factory=dict)  # losses and counts summed over the interval
    images: int = 0
    interval_seconds: float = 0.0
    data_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainOutcome:
    status: Outcome  # FINISHED, DIVERGED, PRUNED or INTERRUPTED
    iterations: int  # iterations completed
    seconds: float  # training time, over every attempt of a resumed run
    diverged_at: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled)


@contextlib.contextmanager
def progress_task(progress: Progress | None, description: str, total: int, enabled: bool):
    """A task in `progress` (a grid's display) or, without one, in a display of its own."""
    if progress is None:
        with progress_bar(enabled) as bar:
            yield bar, bar.add_task(description, total=total, info="")
        return
    task = progress.add_task(description, total=total, info="")
    try:
        yield progress, task
    finally:
        progress.remove_task(task)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TrainParts:
    """What is trained and what trains it: the model (already on the plan's device; DDP-wrapped on
    several ranks), the detection loss, the optimiser and its schedule."""

    model: torch.nn.Module
    criterion: DetectionLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass(frozen=True)
class TrainPlan:
    """Where and how long: `iterations` SGD steps on `device`, the interval's line logged every
    `log_every` (and at the end). `amp`: bf16 autocast on CUDA; `channels_last`: NHWC input images,
    where `ablate.model.memory_format` finds it safe."""

    device: torch.device
    iterations: int
    log_every: int = 10
    amp: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class TrainHooks:
    """What the loop calls out to (files, MLflow, a pruner, a signal): each optional, and a hook
    with a period runs only when both are set (a period of 0: never)."""

    log: LogFn | None = None  # (iteration, the interval's metrics), every plan.log_every and at the end
    checkpoint: Callable[[int], None] | None = None  # (iteration), every checkpoint_every, before the end
    checkpoint_every: int = 0
    evaluate: Callable[[int], bool] | None = None  # (iteration), every eval_every; True ends the run PRUNED
    eval_every: int = 0
    save_state: Callable[[TrainState], None] | None = None  # a resume point: every save_every, and when stopped
    save_every: int = 0
    stop: Callable[[], bool] | None = None  # asked once per iteration; True ends the run INTERRUPTED
    progress: Progress | None = None  # a display to add the bar to (a grid's); None: one of its own
    show_progress: bool = True


class _Clock:
    """Brings a state's timers up to now: the run's seconds over every attempt, and the interval's."""

    def __init__(self, state: TrainState):
        self.state, self.seconds_before = state, state.seconds
        self.start = self.interval_start = time.perf_counter()

    def __call__(self) -> None:
        now = time.perf_counter()
        self.state.seconds = self.seconds_before + now - self.start
        self.state.interval_seconds += now - self.interval_start
        self.interval_start = now


def train(parts: TrainParts, batches: Iterator[Batch], plan: TrainPlan, *, hooks: TrainHooks = TrainHooks(),
          state: TrainState | None = None, ranks: Ranks = SINGLE) -> TrainOutcome:
    """Run SGD steps until `plan.iterations` are done. A non-finite loss stops the run as DIVERGED
    (before the step that would poison the weights); everything logged until then is kept. The
    hooks are called in this order after a step: log, checkpoint, evaluate, save_state, stop.

    Resuming: `state` is where a stopped run got to (iteration, history, the interval's sums); the
    parts and `batches` must be at that point too. None: a new run.

    `ranks`: this process's place in a run on several processes (DDP: the model wrapped, `batches`
    this rank's share). The logged figures are the global batch's; every rank stops, diverges or
    saves at the same iteration (a stop asked on any rank stops all).
    """
    parts.model.train()
    images_format = memory_format(parts.model, plan.device, plan.channels_last)  # NCHW where oneDNN's NHWC is faulty
    state = state or TrainState()
    clock = _Clock(state)

    def end(status: Outcome, iterations: int, diverged_at: int | None = None) -> TrainOutcome:
        clock()
        return TrainOutcome(status, iterations, state.seconds, diverged_at=diverged_at, history=state.history)

    # Judged by the run's lease: every iteration is progress, and none for its stall timeout is a stall.
    with progress_task(hooks.progress, "train", plan.iterations, hooks.show_progress) as (bar, task), lease.judged():
        bar.update(task, completed=state.iteration)
        for it in range(state.iteration, plan.iterations):
            t0 = time.perf_counter()
            batch = next(batches).to(plan.device, non_blocking=True)
            state.data_seconds += time.perf_counter() - t0
            loss, values, stopping = forward(parts, batch.images.contiguous(memory_format=images_format), batch,
                                             plan, hooks.stop, ranks)
            if not math.isfinite(values["loss"]):
                return end(Outcome.DIVERGED, it, diverged_at=it)
            parts.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parts.optimizer.step()
            parts.scheduler.step()
            for key in LOGGED:
                state.sums[key] = state.sums.get(key, 0.0) + values[key]
            state.images += len(batch.images) * ranks.world_size
            state.iteration = done = it + 1
            lease.advance()
            lease.hang_here_if_asked(done, ranks.rank)
            if done % plan.log_every == 0 or done == plan.iterations:
                clock()
                log_interval(state, parts.optimizer.param_groups[0]["lr"], hooks.log, bar, task)
            if done == plan.iterations:
                break
            if hooks.checkpoint and hooks.checkpoint_every and done % hooks.checkpoint_every == 0:
                hooks.checkpoint(done)
            if hooks.evaluate and hooks.eval_every and done % hooks.eval_every == 0:
                pruned = hooks.evaluate(done)
                parts.model.train()
                if pruned:
                    return end(Outcome.PRUNED, done)
            if hooks.save_state and (stopping or (hooks.save_every and done % hooks.save_every == 0)):
                clock()
                hooks.save_state(state)
            if stopping:
                return end(Outcome.INTERRUPTED, done)
    return end(Outcome.FINISHED, plan.iterations)


def forward(parts: TrainParts, images: torch.Tensor, batch: Batch, plan: TrainPlan, stop: Callable[[], bool] | None,
            ranks: Ranks) -> tuple[torch.Tensor, dict[str, float], bool]:
    """One step's loss (to backpropagate), its figures (LOGGED) summed over the ranks and whether
    any rank asked to stop. One sync per step carries both (it is also the divergence check), so
    that every rank decides to stop at the same step."""
    with autocast(plan.device, plan.amp):
        cls_logits, box_deltas, anchors, _ = parts.model(images)
    out = parts.criterion(cls_logits, box_deltas, anchors, batch.gt_boxes, batch.gt_labels)
    loss = out["loss"]
    stop_here = stop is not None and stop()
    step = ranks.all_sum(torch.stack([out[key].detach().double() for key in LOGGED]
                                     + [loss.new_tensor(float(stop_here), dtype=torch.float64)]))
    summed = step.tolist()
    values = dict(zip(LOGGED, summed))
    for key in LOSSES:  # each rank's loss is its share times world_size (DDP averages)
        values[key] /= ranks.world_size
    return loss, values, summed[-1] > 0


def log_interval(state: TrainState, lr: float, log: LogFn | None, bar: Progress, task) -> None:
    """The interval ending now into the history, the `log` hook and the bar; the next one starts."""
    metrics = interval_metrics(state, lr)
    state.history.append(metrics)
    if log:
        log(state.iteration, metrics)
    bar.update(task, completed=state.iteration, info=f"loss {metrics['loss']:.3f} ({metrics['img_per_s']:.1f} img/s)")
    state.sums, state.images, state.interval_seconds, state.data_seconds = {}, 0, 0.0, 0.0


def interval_metrics(state: TrainState, lr: float) -> dict[str, float]:
    """The logged line of the interval ending at `state.iteration`: mean losses, counts per image,
    throughput and the fraction of the time spent waiting for data."""
    n = state.iteration - (state.history[-1]["iteration"] if state.history else 0)
    metrics = {"iteration": state.iteration, "lr": lr, **{k: v / n for k, v in state.sums.items()},
               "img_per_s": state.images / state.interval_seconds,
               "data_fraction": state.data_seconds / state.interval_seconds}
    for key in ("num_fg", "num_bg", "num_ignored"):  # per image, not per batch
        metrics[key] /= state.images / n
    return metrics


@torch.no_grad()
def predict(model: torch.nn.Module, batch: Batch, postprocess: Postprocess, device: torch.device,
            amp: bool = True) -> list[dict[str, torch.Tensor]]:
    """Detections of one batch (`postprocess` applied to the model's outputs), boxes in the
    ORIGINAL image pixels (undoing the resize)."""
    model.eval()
    batch = batch.to(device)
    images = batch.images
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        cls_logits, box_deltas, anchors, per_level = model(images)
    dets = postprocess(cls_logits, box_deltas, anchors, per_level, batch.image_sizes)
    scale = (batch.orig_sizes / batch.image_sizes).float()  # [B, 2] (h, w)
    for det, (sy, sx) in zip(dets, scale.tolist()):
        det["boxes"] = det["boxes"] * det["boxes"].new_tensor([sx, sy, sx, sy])
    return dets


def evaluate(model: torch.nn.Module, loader, dataset: CocoDetection, postprocess: Postprocess,
             device: torch.device, *, amp: bool = True, show_progress: bool = True,
             progress: Progress | None = None) -> tuple[dict[str, float], list[dict]]:
    """COCO metrics of `model` on `dataset` and the detections as COCO result records.

    Adds `infer_ms_per_img`: network plus post-processing time per image.
    """
    records: list[dict] = []
    seconds, num_images = 0.0, 0
    with progress_task(progress, "eval", len(loader), show_progress) as (bar, task), lease.judged():
        for batch in loader:
            t0 = time.perf_counter()
            dets = predict(model, batch, postprocess, device, amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            num_images += len(dets)
            counts = [len(d["scores"]) for d in dets]
            records += detections_to_coco(
                torch.cat([d["boxes"] for d in dets]).cpu(), torch.cat([d["scores"] for d in dets]).cpu(),
                torch.cat([d["labels"] for d in dets]).cpu(),
                torch.repeat_interleave(batch.image_ids, torch.tensor(counts)), dataset.category_ids)
            bar.advance(task)
            lease.advance()
    metrics = coco_evaluate(dataset.coco, records, image_ids=dataset.image_ids, category_ids=dataset.category_ids)
    metrics["infer_ms_per_img"] = 1000 * seconds / max(1, num_images)
    return metrics, records
