"""ablate.checkpoint: save and reload a model with its config; old checkpoints still load."""

from __future__ import annotations

import pytest
import torch

from ablate import builders
from ablate.checkpoint import load_checkpoint, save_checkpoint
from ablate.config import build_config, config_hash, to_dict
from ablate.errors import AblateError

SMALL = {"model.tiny_widths": [4, 8, 8, 8, 8], "model.fpn_channels": 8, "model.head_channels": 8,
         "model.head_convs": 1}


def _saved(tmp_path, overrides=None):
    cfg = build_config("tiny", {**SMALL, **(overrides or {})})
    torch.manual_seed(0)
    model = builders.build_model(cfg, 3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, cfg, ["a", "b", "c"], [1, 2, 5], 7)
    return path, model, cfg


def test_round_trip_gives_the_same_model_config_and_classes(tmp_path):
    path, model, cfg = _saved(tmp_path, {"model.box_weights": [10.0, 10.0, 5.0, 5.0]})
    loaded, loaded_cfg, ckpt = load_checkpoint(path)
    assert loaded_cfg == cfg and config_hash(loaded_cfg) == config_hash(cfg)
    assert (ckpt["class_names"], ckpt["category_ids"], ckpt["iteration"]) == (["a", "b", "c"], [1, 2, 5], 7)
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not loaded.training
    assert builders.build_box_coder(loaded_cfg).weights == (10.0, 10.0, 5.0, 5.0)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_overrides_apply_on_load(tmp_path):
    path, _, _ = _saved(tmp_path)
    _, cfg, _ = load_checkpoint(path, {"infer.score_thresh": 0.3})
    assert cfg.infer.score_thresh == 0.3


def test_a_checkpoint_from_before_box_weights_moved_loads(tmp_path):
    path, model, cfg = _saved(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    old = to_dict(cfg)
    del old["model"]["box_weights"]
    old["loss"]["box_weights"] = [10.0, 10.0, 5.0, 5.0]
    ckpt["config"] = old
    torch.save(ckpt, path)
    loaded, loaded_cfg, _ = load_checkpoint(path)
    assert loaded_cfg.model.box_weights == [10.0, 10.0, 5.0, 5.0]
    assert torch.equal(loaded.cls_subnet.out.weight, model.cls_subnet.out.weight)


def test_missing_or_foreign_files_are_named(tmp_path):
    with pytest.raises(AblateError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AblateError, match="junk.pt: not an ablate checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
