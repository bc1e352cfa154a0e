"""The training loop and evaluation. Both return plain metric dicts; what to do with them (files,
MLflow) is the caller's business, reached through the `on_log` / `on_checkpoint` callbacks.

Both take plain arguments and injected parts (model, criterion, post-processing); the runner
builds them from a config."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ablate.criterion import DetectionLoss
from ablate.data.coco import Batch, CocoDetection
from ablate.evaluation import coco_evaluate, detections_to_coco
from ablate.postprocess import Postprocess

LogFn = Callable[[int, dict[str, float]], None]


@dataclass
class TrainOutcome:
    status: str  # "finished", "diverged" or "pruned"
    iterations: int  # iterations completed
    seconds: float
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
          on_eval: Callable[[int], bool] | None = None) -> TrainOutcome:
    """Run `iterations` SGD steps. A non-finite loss stops the run with status "diverged"
    (before the step that would poison the weights); everything logged until then is kept.

    Every `log_every` iterations (and at the end) the interval's mean losses and counts go to
    `on_log(iteration, metrics)`; every `checkpoint_every` (0: never) `on_checkpoint(iteration)`
    is called before the end; every `eval_every` iterations `on_eval(iteration)` may stop the run
    early (status "pruned"). `amp`: bf16 autocast on CUDA; `channels_last`: NHWC input images.
    """
    model.train()
    sums: dict[str, float] = {}
    history: list[dict[str, float]] = []
    start = interval_start = time.perf_counter()
    data_seconds = 0.0
    images_in_interval = 0
    with progress_task(progress, "train", iterations, show_progress) as (bar, task):
        for it in range(iterations):
            t0 = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)
            data_seconds += time.perf_counter() - t0
            images = batch.images.contiguous(memory_format=torch.channels_last) if channels_last else batch.images
            with autocast(device, amp):
                cls_logits, box_deltas, anchors, _ = model(images)
            out = criterion(cls_logits, box_deltas, anchors, batch.gt_boxes, batch.gt_labels)
            loss = out["loss"]
            out["loss"] = loss.item()  # also the divergence check (one sync per step)
            if not math.isfinite(out["loss"]):
                return TrainOutcome("diverged", it, time.perf_counter() - start, diverged_at=it, history=history)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for key in ("loss", "loss_cls", "loss_box_reg", "num_fg", "num_bg", "num_ignored"):
                sums[key] = sums.get(key, 0.0) + float(out[key])
            images_in_interval += len(batch.images)
            done = it + 1
            if done % log_every == 0 or done == iterations:
                n = done - (history[-1]["iteration"] if history else 0)
                elapsed = time.perf_counter() - interval_start
                metrics = {"iteration": done, "lr": optimizer.param_groups[0]["lr"],
                           **{k: v / n for k, v in sums.items()},
                           "img_per_s": images_in_interval / elapsed, "data_fraction": data_seconds / elapsed}
                for key in ("num_fg", "num_bg", "num_ignored"):  # per image, not per batch
                    metrics[key] /= images_in_interval / n
                history.append(metrics)
                if on_log:
                    on_log(done, metrics)
                bar.update(task, completed=done, info=f"loss {metrics['loss']:.3f} "
                           f"({metrics['img_per_s']:.1f} img/s)")
                sums, images_in_interval, data_seconds = {}, 0, 0.0
                interval_start = time.perf_counter()
            if on_checkpoint and checkpoint_every and done % checkpoint_every == 0 and done < iterations:
                on_checkpoint(done)
            if on_eval and eval_every and done % eval_every == 0 and done < iterations:
                stop = on_eval(done)
                model.train()
                if stop:
                    return TrainOutcome("pruned", done, time.perf_counter() - start, history=history)
    return TrainOutcome("finished", iterations, time.perf_counter() - start, history=history)


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
