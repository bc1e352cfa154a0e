"""A trained checkpoint at work: `ablate infer` (detection on image files: decode, resize as in
training, detect, draw, save) and `ablate eval` (COCO metrics on the val split).

Both are edges like the runner: they take a checkpoint's whole config and have the builders make
the device, data and post-processing from it, as training did."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ablate import builders
from ablate.config import Config
from ablate.data.coco import collate, decode_image, make_transform, thin_image_error, too_thin
from ablate.engine import predict
from ablate.errors import ConfigError
from ablate.paths import output_paths
from ablate.visualize import draw_detections, save_png


def check_score_min(score_min: float) -> None:
    """--score-min is a score, in [0, 1]; NaN drew nothing and said nothing."""
    if not 0.0 <= score_min <= 1.0:
        raise ConfigError(f"--score-min: must be a score in [0, 1], got {score_min}")


def detect_files(model: torch.nn.Module, cfg: Config, class_names: Sequence[str], paths: Sequence[Path],
                 out_dir: Path, score_min: float) -> Iterator[tuple[Path, int]]:
    """For each image: write out_dir/<stem>.png with its detections drawn (see `output_paths`);
    yield (path, count drawn)."""
    outputs = output_paths(paths, out_dir)
    device = builders.resolve_device(cfg.train.device)
    model = model.to(device)
    resize = make_transform(cfg.data.min_size, cfg.data.max_size, 0.0)
    postprocess = builders.build_postprocess(cfg)
    for path, out_path in zip(paths, outputs):
        original = decode_image(Path(path))
        if too_thin(*original.shape[-2:], cfg.data.max_size):
            raise thin_image_error(path, *original.shape[-2:], cfg.data.max_size)
        resized = resize(original)
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 0,
                  "orig_size": tuple(original.shape[-2:])}
        (det,) = predict(model, collate([(resized, target)]), postprocess, device, cfg.train.amp)
        det = {k: v.cpu() for k, v in det.items()}
        drawn = draw_detections(original, det["boxes"], det["labels"], det["scores"], class_names,
                                score_min=score_min)
        save_png(drawn, out_path)
        yield out_path, int((det["scores"] >= score_min).sum())


def evaluate_checkpoint(checkpoint: Path, overrides: dict, out: Path, progress: bool) -> dict[str, float]:
    """COCO metrics of a checkpoint on the val split its config (and `overrides`) name, with the
    builders and evaluation training uses; writes out/detections.json and out/eval.json."""
    from ablate import engine
    from ablate.checkpoint import load_checkpoint
    from ablate.evaluation import save_results
    from ablate.paths import atomic_write

    model, cfg, ckpt = load_checkpoint(checkpoint, overrides)
    device = builders.resolve_device(cfg.train.device)
    val_set, loader = builders.build_val_loader(cfg, builders.data_root(cfg, progress=progress), progress=progress)
    builders.check_same_classes(ckpt["class_names"], val_set, f"the checkpoint {checkpoint}")
    metrics, records = engine.evaluate(model.to(device), loader, val_set, builders.build_postprocess(cfg), device,
                                       amp=cfg.train.amp, show_progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    save_results(records, out / "detections.json")
    atomic_write(out / "eval.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))  # as runner.write_json
    return metrics
