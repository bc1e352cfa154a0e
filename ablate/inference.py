"""Detection on image files for `ablate infer`: decode, resize as in training, detect, draw, save.

`detect_files` is an edge like the runner: it takes a checkpoint's whole config and has the
builders make the device and post-processing from it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ablate import builders
from ablate.config import Config
from ablate.data.coco import collate, decode_image, make_transform
from ablate.engine import predict
from ablate.errors import DataError
from ablate.visualize import draw_detections, save_png


def output_paths(images: Sequence[Path], out_dir: Path) -> list[Path]:
    """out_dir/<stem>.png for each input image, checked before anything is decoded: no output may
    be one of the inputs (--out set to the images' own folder) or another input's output (two
    inputs with one stem). A previous run's drawings in out_dir are replaced, as a rerun should."""
    outputs = [out_dir / f"{Path(image).stem}.png" for image in images]
    inputs = {_identity(Path(image)): Path(image) for image in images}
    for image, output in zip(images, outputs):
        if not Path(image).is_file():
            raise DataError(f"{image}: no such image file")
        overwritten = inputs.get(_identity(output))
        if overwritten is not None:
            raise DataError(f"--out: writing {output} would overwrite the input image {overwritten}; "
                            "choose another --out folder")
    seen: dict[Path, Path] = {}
    for image, output in zip(images, outputs):
        first = seen.setdefault(_identity(output), Path(image))
        if first != Path(image):
            raise DataError(f"{first} and {image} would both be drawn to {output} (same file name); "
                            "infer them in two runs with different --out folders")
    return outputs


def _identity(path: Path) -> Path:
    """One name per file whatever the spelling (relative, '..', symlinks)."""
    return path.expanduser().resolve()


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
        resized = resize(original)
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 0,
                  "orig_size": tuple(original.shape[-2:])}
        (det,) = predict(model, collate([(resized, target)]), postprocess, device, cfg.train.amp)
        det = {k: v.cpu() for k, v in det.items()}
        drawn = draw_detections(original, det["boxes"], det["labels"], det["scores"], class_names,
                                score_min=score_min)
        save_png(drawn, out_path)
        yield out_path, int((det["scores"] >= score_min).sum())
