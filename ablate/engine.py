"""The training loop and evaluation. Both return plain metric dicts; what to do with them (files,
MLflow) is the caller's business, reached through the `on_log` / `on_checkpoint` callbacks.

Both take plain arguments and injected parts (model, criterion, post-processing); the runner
builds them from a config."""

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


def train(model: torch.nn.Module, criterion: DetectionLoss, batches: Iterator[Batch],
          optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          device: torch.device, *, iterations: int, log_every: int = 10, amp: bool = True,
          channels_last: bool = True, checkpoint_every: int = 0, on_log: LogFn | None = None,
          on_checkpoint: Callable[[int], None] | None = None, show_progress: bool = True,
          progress: Progress | None = None, eval_every: int = 0,
          on_eval: Callable[[int], bool] | None = None, state: TrainState | None = None,
          stop: Callable[[], bool] | None = None, save_every: int = 0,
          save_state: Callable[[TrainState], None] | None = None, ranks: Ranks = SINGLE) -> TrainOutcome:
    """Run SGD steps until `iterations` are done. A non-finite loss stops the run as DIVERGED
    (before the step that would poison the weights); everything logged until then is kept.

    Every `log_every` iterations (and at the end) the interval's mean losses and counts go to
    `on_log(iteration, metrics)`; every `checkpoint_every` (0: never) `on_checkpoint(iteration)`
    is called before the end; every `eval_every` iterations `on_eval(iteration)` may stop the run
    early (PRUNED). `amp`: bf16 autocast on CUDA; `channels_last`: NHWC input images, where
    `ablate.model.memory_format` finds it safe.

    Resuming: `state` is where a stopped run got to (iteration, history, the interval's sums); the
    model, optimiser, schedule, loss and `batches` must be at that point too. `stop()` is asked
    once per iteration: True ends the run as INTERRUPTED. `save_state(state)` is called every
    `save_every` iterations (0: never) and when stopped, before the end, to write a resume point.

    `ranks`: this process's place in a run on several processes (DDP: `model` wrapped, `batches`
    this rank's share). The logged figures are the global batch's; every rank stops, diverges or
    saves at the same iteration (a stop asked on any rank stops all).
    """
    model.train()
    images_format = memory_format(model, device, channels_last)  # NCHW where oneDNN's NHWC kernel is faulty
    state = state or TrainState()
    start = interval_start = time.perf_counter()
    seconds_before = state.seconds

    def clock() -> None:  # bring the state's timers up to now
        nonlocal interval_start
        now = time.perf_counter()
        state.seconds = seconds_before + now - start
        state.interval_seconds += now - interval_start
        interval_start = now

    with progress_task(progress, "train", iterations, show_progress) as (bar, task):
        bar.update(task, completed=state.iteration)
        for it in range(state.iteration, iterations):
            t0 = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)
            state.data_seconds += time.perf_counter() - t0
            images = batch.images.contiguous(memory_format=images_format)
            with autocast(device, amp):
                cls_logits, box_deltas, anchors, _ = model(images)
            out = criterion(cls_logits, box_deltas, anchors, batch.gt_boxes, batch.gt_labels)
            loss = out["loss"]
            # The step's figures, summed over the ranks in one go with the stop flag: one sync per
            # step (also the divergence check), and every rank decides to stop at the same step.
            stop_here = stop is not None and stop()
            step = ranks.all_sum(torch.stack([out[key].detach().double() for key in LOGGED]
                                             + [loss.new_tensor(float(stop_here), dtype=torch.float64)]))
            summed = step.tolist()
            values = dict(zip(LOGGED, summed))
            for key in LOSSES:  # each rank's loss is its share times world_size (DDP averages)
                values[key] /= ranks.world_size
            if not math.isfinite(values["loss"]):
                clock()
                return TrainOutcome(Outcome.DIVERGED, it, state.seconds, diverged_at=it, history=state.history)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for key in LOGGED:
                state.sums[key] = state.sums.get(key, 0.0) + values[key]
            state.images += len(batch.images) * ranks.world_size
            state.iteration = done = it + 1
            if done % log_every == 0 or done == iterations:
                clock()
                metrics = interval_metrics(state, optimizer.param_groups[0]["lr"])
                state.history.append(metrics)
                if on_log:
                    on_log(done, metrics)
                bar.update(task, completed=done, info=f"loss {metrics['loss']:.3f} "
                           f"({metrics['img_per_s']:.1f} img/s)")
                state.sums, state.images, state.interval_seconds, state.data_seconds = {}, 0, 0.0, 0.0
            if done == iterations:
                break
            if on_checkpoint and checkpoint_every and done % checkpoint_every == 0:
                on_checkpoint(done)
            if on_eval and eval_every and done % eval_every == 0:
                pruned = on_eval(done)
                model.train()
                if pruned:
                    clock()
                    return TrainOutcome(Outcome.PRUNED, done, state.seconds, history=state.history)
            stopping = summed[-1] > 0  # the stop flag, summed over the ranks with the figures
            if save_state and (stopping or (save_every and done % save_every == 0)):
                clock()
                save_state(state)
            if stopping:
                clock()
                return TrainOutcome(Outcome.INTERRUPTED, done, state.seconds, history=state.history)
    clock()
    return TrainOutcome(Outcome.FINISHED, iterations, state.seconds, history=state.history)


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
    with progress_task(progress, "eval", len(loader), show_progress) as (bar, task):
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
    metrics = coco_evaluate(dataset.coco, records, image_ids=dataset.image_ids, category_ids=dataset.category_ids)
    metrics["infer_ms_per_img"] = 1000 * seconds / max(1, num_images)
    return metrics, records
