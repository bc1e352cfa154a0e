"""What a resume checkpoint costs: its size on disk and the time to write one (atomically, flushed
to disk: what a run pays every `--checkpoint-every` iterations and in a SIGTERM's grace period)
and to read it back into the parts.

    .venv/bin/python benchmarks/checkpoint_cost.py            # the tiny preset and ResNet-50-FPN
    .venv/bin/python benchmarks/checkpoint_cost.py --dir /mnt/shared/ckpt   # on the disk you will use

Each case builds the model of a preset (tiny: 20 classes as the embedded set; paper: ResNet-50-FPN
with 80 classes), its SGD optimiser and schedule, takes one step on a tiny batch (so that the
momentum buffers exist, as in any checkpoint after the first iteration), and saves the resume
checkpoint exactly as `run_training` does, with a full run's logged history (the worst case: the
last checkpoint of a run). Times are medians of the repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ablate import builders, engine  # noqa: E402
from ablate.checkpoint import ResumeSpec, load_resume, save_resume  # noqa: E402
from ablate.config import build_config, config_hash  # noqa: E402
from ablate.data.coco import collate  # noqa: E402
from ablate.runner import restore, resume_parts  # noqa: E402

CASES = {"tiny": ("tiny", 20), "paper": ("paper", 80)}
COCO_BATCHES = 117_266 // 16  # batches per epoch of train2017 (only recorded, never read here)


def one_step(cfg, num_classes: int):
    """The parts of a run after its first SGD step on one 128 px image with one box."""
    torch.manual_seed(0)
    model = builders.build_model(cfg, num_classes)
    optimizer = builders.build_optimizer(model, cfg.train)
    scheduler = builders.build_scheduler(optimizer, cfg.train)
    criterion = builders.build_criterion(cfg)
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    batch = collate([(image, {"boxes": torch.tensor([[16.0, 16.0, 80.0, 64.0]]), "labels": torch.tensor([1]),
                              "image_id": 1, "orig_size": (128, 128)})])
    cls_logits, box_deltas, anchors, _ = model(batch.images)
    criterion(cls_logits, box_deltas, anchors, batch.gt_boxes, batch.gt_labels)["loss"].backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler, criterion


def full_history(cfg) -> list[dict[str, float]]:
    """A whole run's logged lines (one per log_every iterations), with the engine's keys."""
    line = {"iteration": 0, "lr": 0.01, **{k: 1.0 for k in engine.LOGGED}, "img_per_s": 1.0, "data_fraction": 0.1}
    t = cfg.train
    return [dict(line, iteration=i) for i in range(t.log_every, t.iterations + 1, t.log_every)]


def measure(name: str, folder: Path, repeats: int) -> dict[str, float]:
    preset, num_classes = CASES[name]
    cfg = build_config(preset, {"model.weights": ""})  # random init, trained BatchNorm: as recorded, offline
    model, optimizer, scheduler, criterion = one_step(cfg, num_classes)
    state = engine.TrainState(iteration=cfg.train.iterations - 1, history=full_history(cfg))
    spec = ResumeSpec(folder / name / "resume.pt", every=1, meta={"run_id": "0" * 32})
    writes, reads = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        parts = resume_parts(model, optimizer, scheduler, criterion, state, COCO_BATCHES, folder)
        save_resume(spec, state.iteration, cfg, config_hash(cfg), parts)
        writes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        restore(load_resume(spec.path, config_hash(cfg)), model, optimizer, scheduler, criterion)
        reads.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {"params_M": params / 1e6, "size_MB": spec.path.stat().st_size / 1e6,
            "history_lines": len(state.history), "write_s": statistics.median(writes[1:]),
            "read_s": statistics.median(reads[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--only", default=",".join(CASES), help="cases: " + ",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{'case':6} {'params':>9} {'size':>9} {'history':>8} {'write':>8} {'read':>8}   (torch {torch.__version__})")
        for name in args.only.split(","):
            r = measure(name, Path(tmp), args.repeats)
            print(f"{name:6} {r['params_M']:8.1f}M {r['size_MB']:7.1f}MB {r['history_lines']:8d} "
                  f"{r['write_s']:7.3f}s {r['read_s']:7.3f}s")


if __name__ == "__main__":
    main()
