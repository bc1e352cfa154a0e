"""Checkpoints: a trained model's weights saved with the config and class names that rebuild it,
and the resume checkpoints from which a stopped run goes on as if it had never stopped.

A checkpoint.pt holds {"model": state dict, "config": the nested config, "class_names",
"category_ids", "iteration"}; `load_checkpoint` rebuilds the model through the builders, so a
checkpoint written before a config key was renamed still loads (`config.from_dict`).

A resume checkpoint (`ResumeSpec.path`, e.g. resume.pt) holds, besides the iteration, the config
and its hash and the caller's `meta`, whatever the runner needs to continue bit for bit (model,
optimiser, schedule, loss state, every RNG, the engine's state: see `runner`); a small sidecar
JSON beside it (resume.json) repeats the iteration, hash and meta for callers that should not
need torch to read them. Both are written atomically, the sidecar after the checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ablate import builders, lease
from ablate.config import Config, apply_overrides, from_dict, to_dict, trunk_norm
from ablate.errors import AblateError
from ablate.paths import atomic_write  # noqa: F401  (imported from here by the runner)
from ablate.model.retinanet import RetinaNet

RESUME_KIND = "ablate resume checkpoint, format 1"


def save_checkpoint(path: Path, model: torch.nn.Module, cfg: Config, class_names: list[str],
                    category_ids: list[int], iteration: int) -> None:
    """Write atomically: an interrupted save never leaves half a checkpoint under `path`."""
    atomic_write(path, lambda f: torch.save({"model": model.state_dict(), "config": to_dict(cfg),
                                             "class_names": class_names, "category_ids": category_ids,
                                             "iteration": iteration}, f))
    lease.advance()  # a checkpoint on disk is progress


def load_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[RetinaNet, Config, dict]:
    """(model on CPU in eval mode, its config with `overrides` applied, the raw checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise AblateError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AblateError(f"{path}: not an ablate checkpoint ({type(e).__name__})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise AblateError(f"{path}: not an ablate checkpoint (no '{missing[0]}' in it)")
    _check_class_names(path, ckpt["class_names"])
    cfg = from_dict(ckpt["config"], f"{path} (config)")
    cfg = apply_overrides(cfg, overrides or {}, "--set")
    if cfg.model.weights:  # the checkpoint holds every weight already; the norm it trained with stays
        cfg.model.trunk_norm = trunk_norm(cfg.model)
        cfg.model.weights = ""
    model = builders.build_model(cfg, len(ckpt["class_names"]))
    _load_weights(path, model, ckpt["model"])
    return model.eval(), cfg, ckpt


CHECKPOINT_KEYS = ("model", "config", "class_names")


def _check_class_names(path: Path, names: Any) -> None:
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise AblateError(f"{path}: 'class_names' must be a non-empty list of names, got {str(names)[:80]}")


def _load_weights(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`state` into `model`, or one AblateError naming the first weight that does not fit: the
    checkpoint was trained with another model config than the one asked for (--set model.*)."""
    own = model.state_dict()
    for key, tensor in own.items():
        theirs = state.get(key)
        if theirs is None:
            raise AblateError(f"{path}: the checkpoint has no weight '{key}': it was trained with another "
                              "model config (drop the --set model.* overrides)")
        if theirs.shape != tensor.shape:
            raise AblateError(f"{path}: weight '{key}' is {list(theirs.shape)} in the checkpoint, "
                              f"{list(tensor.shape)} in the model asked for (drop the --set model.* overrides)")
    extra = sorted(set(state) - set(own))
    if extra:
        raise AblateError(f"{path}: the checkpoint has a weight the model asked for lacks: '{extra[0]}' "
                          "(drop the --set model.* overrides)")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- resume checkpoints


@dataclass(frozen=True)
class ResumeSpec:
    """Where a run keeps its resume checkpoint and how often it writes one.

    path: the checkpoint file (its sidecar is path with .json); if it exists when the run starts,
    the run continues from it. every: iterations between checkpoints (0: only when stopped).
    meta: the caller's (JSON-able: e.g. {"run_id": ...}), saved in both files. on_saved(iteration):
    called once a checkpoint and its sidecar are on disk.
    """

    path: Path
    every: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    on_saved: Callable[[int], None] | None = None


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_resume(spec: ResumeSpec, iteration: int, config: Config, config_hash: str, parts: dict[str, Any]) -> None:
    """Write the resume checkpoint of `iteration` (`parts`: what the runner restores from), then its
    sidecar, both atomically; then tell `spec.on_saved`."""
    path = Path(spec.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"kind": RESUME_KIND, "iteration": iteration, "config_hash": config_hash, "meta": spec.meta}
    atomic_write(path, lambda f: torch.save({**head, "config": to_dict(config), **parts}, f))
    side = {**head, "checkpoint": path.name, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(side, indent=2).encode()))
    lease.advance()  # a checkpoint on disk is progress
    if spec.on_saved:
        spec.on_saved(iteration)


def load_resume(path: str | Path, config_hash: str) -> dict[str, Any]:
    """The resume checkpoint at `path`, on the CPU; refused (AblateError naming the file) when it
    is not one or belongs to another config than the one of hash `config_hash`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AblateError(f"{path}: no such resume checkpoint") from None
    except Exception as e:
        raise AblateError(f"{path}: not a resume checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != RESUME_KIND:
        raise AblateError(f"{path}: not a resume checkpoint of this version of ablate")
    if ckpt["config_hash"] != config_hash:
        raise AblateError(f"{path}: a resume checkpoint of config {ckpt['config_hash']}, not of this run's "
                          f"config {config_hash}; resume with the same experiment and --set overrides, or delete it")
    return ckpt


def discard_resume(path: str | Path) -> None:
    """Delete a resume checkpoint, its sidecar and any temporary file a killed writer left behind
    (once its run is over: finished or diverged). Missing files are fine."""
    path = Path(path)
    for p in (path, sidecar_path(path), path.with_name(path.name + ".tmp"),
              sidecar_path(path).with_name(sidecar_path(path).name + ".tmp")):
        p.unlink(missing_ok=True)


def rng_states() -> dict[str, Any]:
    """Every RNG a training run draws from: Python's, NumPy's, torch's (CPU, and CUDA's where
    available), in a form `torch.load(weights_only=True)` reads back."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    states = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    numpy["state"]["key"] = numpy["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
