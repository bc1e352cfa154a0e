"""Checkpoints: a trained model's weights saved with the config and class names that rebuild it.

A checkpoint.pt holds {"model": state dict, "config": the nested config, "class_names",
"category_ids", "iteration"}; `load_checkpoint` rebuilds the model through the builders, so a
checkpoint written before a config key was renamed still loads (`config.from_dict`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ablate import builders
from ablate.config import Config, apply_overrides, from_dict, to_dict
from ablate.errors import AblateError
from ablate.model.retinanet import RetinaNet


def save_checkpoint(path: Path, model: torch.nn.Module, cfg: Config, class_names: list[str],
                    category_ids: list[int], iteration: int) -> None:
    """Write atomically: an interrupted save never leaves half a checkpoint under `path`."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "class_names": class_names,
                "category_ids": category_ids, "iteration": iteration}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[RetinaNet, Config, dict]:
    """(model on CPU in eval mode, its config with `overrides` applied, the raw checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise AblateError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = from_dict(ckpt["config"], f"{path} (config)")
    except AblateError:
        raise
    except Exception as e:
        raise AblateError(f"{path}: not an ablate checkpoint ({type(e).__name__})") from None
    cfg = apply_overrides(cfg, overrides or {}, "--set")
    cfg.model.weights = ""  # the checkpoint holds every weight already
    model = builders.build_model(cfg, len(ckpt["class_names"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt
