"""Speed and memory of ablate's hot path against torchvision 0.29's RetinaNet, in one run.

    .venv/bin/python benchmarks/bench.py                 # all cases, CPU
    .venv/bin/python benchmarks/bench.py --only loss,step-tiny --pairs 5
    .venv/bin/python benchmarks/bench.py --only loss,post --device cuda

Every measurement runs in its own fresh (spawned) process, so that one side's or case's memory
and warm caches do not flatter another's. A compared case (loss, post, step-tiny, step-r50) runs
its two sides in alternating processes, ours then torchvision's, `--pairs` times: one process per
side hides the spread between processes (the loss case once measured 2.6x, 3.8x and 5.1x in three
runs of one process per side). Within a process, a side's time is the median of `--repeats`
timings after one warm-up. A case's ratio is the median over the pairs of torchvision_i / ours_i,
with its min-max; each side's seconds are the median (min-max) over its processes. Peak memory is
a process's resident set sampled every 2 ms during the timed region, above what it held before; a
side's is the highest of its processes'. Every process runs `--threads` torch threads (default:
torch's default, printed). A table at the end gives each ratio against its goal. Cases:

  loss   matching + classification (focal) + box loss, forward and backward: 8 images of 600x600,
         80 classes (67,995 anchors each), 7 boxes per image (goal: 5x torchvision)
  post   post-processing of the same batch: threshold, top-k per level, decode, NMS, 100 per image
         (goal: 5x)
  step   a whole training step (network, loss, SGD) at the tiny preset (step-tiny, goal: 1.5x)
         and at ResNet-50-FPN 600 px (step-r50, half the repeats)
  over   the share of a tiny-preset training step spent outside the network's forward and backward
         (one process)
  eval   COCO evaluation of 5,000 images' detections: pycocotools against faster-coco-eval (one
         process, one timing each)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak MB above entry) of `fn` after one warm-up call."""
    fn()
    sync(device)
    times = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        return statistics.median(times), torch.cuda.max_memory_allocated(device) / 2**20
    return statistics.median(times), mem.mb


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- inputs


def dense_batch(device: torch.device, batch: int = 8, size: int = 600, classes: int = 80, boxes: int = 7):
    """Head outputs, anchors and ground truth as a 600 px ResNet-FPN RetinaNet sees them."""
    from ablate.model.anchors import AnchorGenerator, feature_sizes_for

    g = torch.Generator().manual_seed(0)
    anchors, per_level = AnchorGenerator()(feature_sizes_for(size, size))
    n = anchors.shape[0]
    logits = torch.randn(batch, n, classes, generator=g) * 0.5 - 4.6  # around the prior 0.01
    hot = torch.rand(batch, n, generator=g) < 0.002  # a few confident detections to keep
    logits[hot] += 6.0
    deltas = torch.randn(batch, n, 4, generator=g) * 0.1
    xy = torch.rand(batch, boxes, 2, generator=g) * (size - 150)
    wh = torch.rand(batch, boxes, 2, generator=g) * 140 + 10
    gt_boxes = torch.cat([xy, xy + wh], -1)
    gt_labels = torch.randint(0, classes, (batch, boxes), generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    return to(logits), to(deltas), to(anchors), per_level, to(gt_boxes), to(gt_labels)


def torchvision_model(classes: int, trunk: str = "resnet18", fpn: int = 64):
    from torchvision.models import resnet18
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    backbone = BackboneWithFPN(resnet18(), {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], fpn)
    return RetinaNet(backbone, classes)


# ----------------------------------------------------------------------------- cases


def case_loss(device: torch.device, repeats: int) -> dict:
    from ablate.criterion import DetectionLoss

    logits, deltas, anchors, _, gt_boxes, gt_labels = dense_batch(device)
    ours_loss = DetectionLoss(box_loss="l1")  # the paper's defaults with torchvision's default box loss
    tv = torchvision_model(80).to(device)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(gt_boxes, gt_labels)]
    head = {"cls_logits": logits.requires_grad_(), "bbox_regression": deltas.requires_grad_()}

    def ours():
        out = ours_loss(head["cls_logits"], head["bbox_regression"], anchors, gt_boxes, gt_labels)
        out["loss"].backward()
        head["cls_logits"].grad = head["bbox_regression"].grad = None

    def theirs():
        out = tv.compute_loss(targets, head, [anchors] * len(targets))
        (out["classification"] + out["bbox_regression"]).backward()
        head["cls_logits"].grad = head["bbox_regression"].grad = None

    return compare("loss path (8 x 600 px, 80 classes, fwd+bwd)", ours, theirs, device, repeats)


def case_post(device: torch.device, repeats: int) -> dict:
    from ablate.postprocess import postprocess

    logits, deltas, anchors, per_level, *_ = dense_batch(device)
    # Scores of a detector in training: about a quarter of all (anchor, class) pairs above the 0.05
    # threshold, so that the top-k and NMS have real work (a net at its 0.01 prior has almost none).
    logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(device) - 3.5
    sizes = torch.tensor([[600, 600]] * len(logits), device=device)
    tv = torchvision_model(80).to(device)
    tv.detections_per_img = 100  # the paper's (and COCO's) 100; torchvision defaults to 300
    split = lambda t: list(t.split(per_level, dim=1))  # noqa: E731
    head = {"cls_logits": split(logits), "bbox_regression": split(deltas)}
    level_anchors = [list(anchors.split(per_level))] * len(logits)

    def ours():
        return postprocess(logits, deltas, anchors, per_level, sizes)

    def theirs():
        return tv.postprocess_detections(head, level_anchors, [(600, 600)] * len(logits))

    with torch.no_grad():
        result = compare("post-processing (8 x 600 px, 80 classes)", ours, theirs, device, repeats)
        if SIDE["only"] == "ours" and SIDE["first"]:  # the check needs both: once, in ours' first process
            a, b = ours(), theirs()
            result["identical detections"] = all(
                torch.equal(x["labels"], y["labels"]) and torch.equal(x["scores"], y["scores"])
                and torch.allclose(x["boxes"], y["boxes"], atol=1e-3) for x, y in zip(a, b))
            result["detections per image"] = sum(len(x["scores"]) for x in a) / len(a)
    return result


# Set per process by run_case(): the side it times ("ours" or "torchvision"; None: both here) and
# whether it is the case's first process of that side (one-off checks run there only).
SIDE = {"only": None, "first": True}


def compare(name: str, ours, theirs, device: torch.device, repeats: int) -> dict:
    """Time the side this process is for; run_case() runs the sides in alternating fresh processes
    and merges, so that neither side's allocations (or warm caches) flatter the other's peak memory
    or time."""
    result = {"case": name}
    for side, fn in (("ours", ours), ("torchvision", theirs)):
        if SIDE["only"] in (None, side):
            result[f"{side}_s"], result[f"{side}_peak_mb"] = timed(fn, repeats, device)
    return result


def step_models(preset: str, device: torch.device, classes: int):
    """Our model and torchvision's RetinaNet with the same trunk, FPN and head weights' shapes."""
    from torchvision.models.detection import RetinaNet as TvRetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchors

    from ablate.builders import build_criterion, build_model, build_optimizer
    from ablate.config import build_config

    overrides = {"model.trunk": "resnet50", "data.min_size": 600, "data.max_size": 600} if preset == "r50" else {}
    overrides["model.weights"] = ""  # random init, trained BatchNorm: what the recorded timings measured, offline
    cfg = build_config("tiny" if preset == "tiny" else "paper", overrides)
    ours = build_model(cfg, classes).to(device)
    size = cfg.model.anchor_size
    sizes = tuple((size * 2**i, size * 2**i * 2 ** (1 / 3), size * 2**i * 2 ** (2 / 3)) for i in range(5))
    tv = TvRetinaNet(ours.backbone, classes, min_size=cfg.data.min_size, max_size=cfg.data.max_size,
                     anchor_generator=TvAnchors(sizes, ((0.5, 1.0, 2.0),) * 5))
    # The same head (depth, width, norm) as ours, in torchvision's wrapper.
    for tv_sub, sub in ((tv.head.classification_head, "cls_subnet"), (tv.head.regression_head, "box_subnet")):
        theirs = __import__("copy").deepcopy(getattr(ours, sub))
        tv_sub.conv = theirs.tower
        setattr(tv_sub, "cls_logits" if sub == "cls_subnet" else "bbox_reg", theirs.out)
    tv = tv.to(device)
    return cfg, ours, build_criterion(cfg), build_optimizer(ours, cfg.train), tv, build_optimizer(tv, cfg.train)


def case_step(device: torch.device, repeats: int, preset: str) -> dict:
    classes = 20 if preset == "tiny" else 80  # the embedded set's classes; COCO's
    cfg, ours, criterion, opt, tv, tv_opt = step_models(preset, device, classes)
    batch = 16 if preset == "tiny" else 2
    size = cfg.data.min_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    xy = torch.rand(batch, 4, 2, generator=g) * size * 0.7
    gt_boxes = torch.cat([xy, xy + size * 0.05 + torch.rand(batch, 4, 2, generator=g) * size * 0.2], -1).to(device)
    gt_labels = torch.randint(0, classes, (batch, 4), generator=g).to(device)
    tv_images = [im.float() / 255 for im in images]
    if SIDE["only"] == "ours" and cfg.train.channels_last:  # as our trainer runs it (torchvision's: NCHW)
        ours.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    tv_targets = [{"boxes": b, "labels": lab} for b, lab in zip(gt_boxes, gt_labels)]
    ours.train()
    tv.train()

    def ours_step():
        cls_logits, deltas, anchors, _ = ours(images)
        out = criterion(cls_logits, deltas, anchors, gt_boxes, gt_labels)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def tv_step():
        losses = tv(tv_images, tv_targets)
        tv_opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        tv_opt.step()

    label = "tiny preset (batch 16, 128 px)" if preset == "tiny" else "ResNet-50-FPN (batch 2, 600 px)"
    return {**compare(f"training step, {label}", ours_step, tv_step, device, repeats), "images": batch}


def case_overhead(device: torch.device, repeats: int) -> dict:
    """Full tiny-preset steps from the real data loader against the network's forward+backward alone."""
    from ablate import builders
    from ablate.config import build_config

    cfg = build_config("tiny")
    root = builders.data_root(cfg, progress=False)
    train_set = builders.build_dataset(cfg.data, root, "train", train=True)
    loader = builders.build_loader(train_set, 16, cfg.data.num_workers, shuffle=True, pin_memory=device.type == "cuda")
    batches = builders.forever(loader)
    model = builders.build_model(cfg, train_set.num_classes).to(device).train()
    if cfg.train.channels_last:  # as the trainer runs it
        model = model.to(memory_format=torch.channels_last)
    criterion, opt = builders.build_criterion(cfg), builders.build_optimizer(model, cfg.train)
    fixed = next(batches).to(device)
    fixed.images = fixed.images.contiguous(memory_format=torch.channels_last)
    waits = []

    def full_step():
        t0 = time.perf_counter()
        batch = next(batches).to(device)
        waits.append(time.perf_counter() - t0)
        cls_logits, deltas, anchors, _ = model(batch.images.contiguous(memory_format=torch.channels_last))
        out = criterion(cls_logits, deltas, anchors, batch.gt_boxes, batch.gt_labels)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def network_only():
        cls_logits, deltas, _, _ = model(fixed.images)
        (cls_logits.sum() * 0 + deltas.sum() * 0).backward()  # the network's own backward, a trivial loss
        model.zero_grad(set_to_none=True)

    t_net, _ = timed(network_only, repeats, device)
    t_full, _ = timed(full_step, repeats, device)
    return {"case": "overhead at the tiny preset (batch 16)", "step_s": t_full, "network_fwd_bwd_s": t_net,
            "overhead_share": 1 - t_net / t_full, "data_wait_share": statistics.median(waits[1:]) / t_full}


def case_eval(device: torch.device, repeats: int) -> dict:
    import numpy as np
    from pycocotools.coco import COCO

    from ablate.evaluation import coco_evaluate

    rng = np.random.default_rng(0)
    images, annotations, records = [], [], []
    for image_id in range(1, 5001):
        images.append({"id": image_id, "width": 640, "height": 480})
        for _ in range(int(rng.integers(1, 12))):
            x, y = rng.uniform(0, 500), rng.uniform(0, 380)
            w, h = rng.uniform(8, 140), rng.uniform(8, 100)
            cat = int(rng.integers(1, 81))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            for _ in range(2):  # a near hit and a false positive per object, at random scores
                jitter = rng.normal(0, 4, 4)
                records.append({"image_id": image_id, "category_id": cat, "score": float(rng.uniform()),
                                "bbox": [x + jitter[0], y + jitter[1], abs(w + jitter[2]), abs(h + jitter[3])]})
                records.append({"image_id": image_id, "category_id": int(rng.integers(1, 81)),
                                "score": float(rng.uniform(0, 0.5)),
                                "bbox": [rng.uniform(0, 500), rng.uniform(0, 380), 30.0, 30.0]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(1, 81)]}
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        gt.createIndex()
    results = {}
    for backend in ("pycocotools", "faster"):
        t0 = time.perf_counter()
        results[backend] = coco_evaluate(gt, records, backend=backend)
        results[f"{backend}_s"] = time.perf_counter() - t0
    same = all(abs(results["faster"][k] - results["pycocotools"][k]) < 1e-12 for k in results["faster"])
    return {"case": f"COCO eval, 5,000 images, {len(records):,} detections", "pycocotools_s": results["pycocotools_s"],
            "faster_s": results["faster_s"], "speedup": results["pycocotools_s"] / results["faster_s"],
            "identical numbers": same, "AP": results["faster"]["AP"]}


COMPARED = {"loss", "post", "step-tiny", "step-r50"}
CASES = {"loss": case_loss, "post": case_post,
         "step-tiny": lambda d, r: case_step(d, r, "tiny"), "step-r50": lambda d, r: case_step(d, max(1, r // 2), "r50"),
         "over": case_overhead, "eval": case_eval}
# The speed-up over torchvision each compared case should reach (the median of its pairs' ratios);
# a case missing here has no goal.
GOALS = {"loss": 5.0, "post": 5.0, "step-tiny": 1.5}


def _run_case(name: str, side: str | None, first: bool, device: str, repeats: int, threads: int, out) -> None:
    torch.manual_seed(0)
    SIDE["only"], SIDE["first"] = side, first
    torch.set_num_threads(threads)
    out.put(CASES[name](torch.device(device), repeats))


def run_process(ctx, name: str, side: str | None, first: bool, args) -> dict:
    """The result of one fresh process running case `name` for `side` (None: an uncompared case)."""
    out = ctx.Queue()
    proc = ctx.Process(target=_run_case, args=(name, side, first, args.device, args.repeats, args.threads, out))
    proc.start()
    while True:  # a process that dies (killed for memory, an exception) must not hang the run
        try:
            result = out.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                try:
                    result = out.get(timeout=1.0)  # put just before it ended
                    break
                except queue.Empty:
                    raise RuntimeError(f"case {name} ({side or 'one process'}) ended without a result, "
                                       f"exit code {proc.exitcode}") from None
    proc.join()
    return result


def spread(values: list[float]) -> tuple[float, list[float]]:
    """(median, [min, max]) of a side's or a ratio's values over the pairs."""
    return statistics.median(values), [min(values), max(values)]


def run_compared(ctx, name: str, args) -> dict:
    """A compared case over `args.pairs` pairs of fresh processes, ours then torchvision's in each.

    Alternating the sides spreads slow phases of the machine (other load, frequency) over both;
    a ratio per pair compares processes that ran next to each other.
    """
    merged: dict = {}
    pairs = []
    for i in range(args.pairs):
        pair = {}
        for side in ("ours", "torchvision"):
            result = run_process(ctx, name, side, i == 0, args)
            pair[f"{side}_s"], pair[f"{side}_peak_mb"] = result.pop(f"{side}_s"), result.pop(f"{side}_peak_mb")
            for key, value in result.items():  # the case's name, image count, one-off checks
                merged.setdefault(key, value)
        pair["speedup"] = pair["torchvision_s"] / pair["ours_s"]
        pairs.append(pair)
        print(f"  {name} pair {i + 1}/{args.pairs}: ours {pair['ours_s']:.4g} s, "
              f"torchvision {pair['torchvision_s']:.4g} s, {pair['speedup']:.2f}x", flush=True)
    for side in ("ours", "torchvision"):
        merged[f"{side}_s"], merged[f"{side}_s_range"] = spread([p[f"{side}_s"] for p in pairs])
        merged[f"{side}_peak_mb"] = max(p[f"{side}_peak_mb"] for p in pairs)
        if merged.get("images"):
            merged[f"{side}_img_per_s"] = merged["images"] / merged[f"{side}_s"]
    merged["speedup"], merged["speedup_range"] = spread([p["speedup"] for p in pairs])
    if name in GOALS:
        merged["goal"] = GOALS[name]
        merged["goal_met"] = merged["speedup"] >= GOALS[name]
        merged["pairs_meeting_goal"] = sum(p["speedup"] >= GOALS[name] for p in pairs)
    merged["pairs"] = pairs
    return merged


def run_case(ctx, name: str, args) -> dict:
    """One case: paired processes for a comparison, a single process otherwise."""
    result = run_compared(ctx, name, args) if name in COMPARED else run_process(ctx, name, None, True, args)
    return {"name": name, **result}


def summary(results: list[dict]) -> str:
    """The table printed at the end: per case with a speed-up, both sides' median seconds (min-max),
    the median ratio [min-max] and its goal. COCO eval's sides are faster-coco-eval and pycocotools."""
    def seconds(r: dict, side: str) -> str:
        low, high = r.get(f"{side}_s_range", [None, None])
        return f"{r[f'{side}_s']:.3g}" + (f" ({low:.3g}-{high:.3g})" if low is not None else "")

    rows = [("case", "ours s", "torchvision s", "ratio [min-max]", "goal", "met?")]
    for r in results:
        if "speedup" not in r:
            continue
        if r["name"] == "eval":
            ours, theirs = f"{r['faster_s']:.3g}", f"{r['pycocotools_s']:.3g} (pycocotools)"
        else:
            ours, theirs = seconds(r, "ours"), seconds(r, "torchvision")
        low, high = r.get("speedup_range", [None, None])
        ratio = f"{r['speedup']:.2f}x" + (f" [{low:.2f}-{high:.2f}]" if low is not None else " (1 run)")
        goal = f">= {r['goal']:g}x" if "goal" in r else "-"
        met = (f"{'yes' if r['goal_met'] else 'no'} ({r['pairs_meeting_goal']}/{len(r['pairs'])} pairs)"
               if "goal" in r else "-")
        rows.append((r["name"], ours, theirs, ratio, goal, met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def machine(device: str, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else ""
    return (f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB{gpu}; "
            f"torch {torch.__version__}, {threads} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timings per process after its warm-up (median)")
    parser.add_argument("--pairs", type=int, default=5,
                        help="fresh processes per side of a compared case, alternating ours and torchvision's")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads in every process (default: %(default)s, torch's default here)")
    parser.add_argument("--json", type=Path, help="also write the results here, with every pair's figures")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown or args.pairs < 1 or args.repeats < 1 or args.threads < 1:
        parser.error(f"unknown case(s) {unknown}" if unknown else "--pairs, --repeats and --threads must be >= 1")
    ctx = mp.get_context("spawn")
    load_before = os.getloadavg()
    print(f"machine: {machine(args.device, args.threads)}")
    print(f"pairs {args.pairs}, repeats {args.repeats}, threads {args.threads}; "
          f"load average {load_before[0]:.2f} (1 min) before")
    results = []
    for name in names:
        result = run_case(ctx, name, args)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "pairs"}, indent=1, default=float), flush=True)
    load_after = os.getloadavg()
    print(f"\nload average {load_after[0]:.2f} (1 min) after; "
          f"a load above {args.threads} while measuring means other work shared the cores\n")
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine(args.device, args.threads), "threads": args.threads, "pairs": args.pairs,
            "repeats": args.repeats, "load_average_1min": [load_before[0], load_after[0]], "results": results,
        }, indent=1))


if __name__ == "__main__":
    main()
