"""Trunk weights by torchvision name (ablate.model.pretrained), with the network cut off.

Every test runs with TORCH_HOME in a temporary folder and every socket refused: a test that tried
to download would fail with the offline error instead of reaching download.pytorch.org.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d
from typer.testing import CliRunner

from ablate import builders
from ablate.config import build_config
from ablate.errors import ConfigError
from ablate.model import pretrained
from ablate.model.retinanet import build_trunk
from cli import app

RESNET18_FILE = "resnet18-f37072fd.pth"  # the name in ResNet18_Weights.IMAGENET1K_V1's URL


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> Path:
    """An empty torch hub folder, and no network: every connection attempt fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable (cut off by the tests)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def cached_resnet18(offline: Path) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict (seeded random init standing in for ImageNet's) placed in the cache
    under the file name torchvision's weights API looks for."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18(weights=None).state_dict()
    offline.mkdir(parents=True)
    torch.save(state, offline / RESNET18_FILE)
    return state


def test_names_and_paths_are_told_apart():
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"):
        assert pretrained.is_weights_name(name), name
    for path in ("r50.pth", "/w/IMAGENET1K_V1.pth", "weights/IMAGENET1K_V1", "imagenet1k_v1", ""):
        assert not pretrained.is_weights_name(path), path


def test_cache_file_follows_torch_home(offline):
    weights = pretrained.resolve("resnet18", "IMAGENET1K_V1")
    assert weights is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert pretrained.cached_file(weights) == offline / RESNET18_FILE
    assert pretrained.resolve("resnet50", "DEFAULT") is torchvision.models.ResNet50_Weights.IMAGENET1K_V2


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_cached_weights_load_into_the_trunk_with_frozen_batchnorm(cached_resnet18, name):
    cfg = build_config("tiny", {"model.trunk": "resnet18", "model.weights": name})
    model = builders.build_model(cfg, 3)
    body = model.backbone.body
    torch.testing.assert_close(body.conv1.weight, cached_resnet18["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(body.layer4[1].bn2.running_var, cached_resnet18["layer4.1.bn2.running_var"],
                               rtol=0, atol=0)
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # model.trunk_norm "auto" with weights
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())


def test_trunk_norm_bn_still_trains_batchnorm_over_named_weights(cached_resnet18):
    trunk, _ = build_trunk("resnet18", "bn", weights="IMAGENET1K_V1")
    assert isinstance(trunk.bn1, torch.nn.BatchNorm2d)
    torch.testing.assert_close(trunk.bn1.weight.detach(), cached_resnet18["bn1.weight"], rtol=0, atol=0)


def test_offline_without_the_file_is_one_line(offline):
    with pytest.raises(ConfigError) as error:
        build_trunk("resnet18", "frozen_bn", weights="IMAGENET1K_V1")
    message = str(error.value)
    assert "\n" not in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"copy it into {offline}/" in message and "model.weights=PATH" in message
    assert not (offline / RESNET18_FILE).exists()


@pytest.mark.parametrize("trunk, name, message", [
    ("resnet18", "IMAGENET1K_V9", r"'IMAGENET1K_V9' is no weights name of resnet18 \(known: IMAGENET1K_V1, DEFAULT\)"),
    ("resnet18", "ResNet50_Weights.IMAGENET1K_V1", r"are not weights of model.trunk=resnet18 \(ResNet18_Weights\)"),
    ("tiny", "IMAGENET1K_V1", "which model.trunk=tiny has none of"),
])
def test_wrong_names_are_config_errors(trunk, name, message):
    with pytest.raises(ConfigError, match=message):
        pretrained.resolve(trunk, name)


def test_a_local_state_dict_loads_too_with_its_classifier(tmp_path):
    # A whole ImageNet classifier saved with torch.save(model.state_dict(), PATH): its fc is left out.
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    cfg = build_config("tiny", {"model.trunk": "resnet18", "model.weights": str(tmp_path / "r18.pth")})
    body = builders.build_model(cfg, 3).backbone.body
    torch.testing.assert_close(body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"], rtol=0, atol=0)
    assert isinstance(body.bn1, FrozenBatchNorm2d)


def test_a_missing_path_mentions_the_names():
    with pytest.raises(ConfigError, match="no such file 'nowhere.pth' \\(nor a torchvision weights name"):
        build_trunk("resnet18", weights="nowhere.pth")


def test_a_checkpoint_reloads_without_the_weights_and_with_its_frozen_norm(cached_resnet18, tmp_path):
    from ablate.checkpoint import load_checkpoint, save_checkpoint

    cfg = build_config("tiny", {"model.trunk": "resnet18", "model.weights": "IMAGENET1K_V1"})
    model = builders.build_model(cfg, 3)
    save_checkpoint(tmp_path / "c.pt", model, cfg, ["a", "b", "c"], [1, 2, 3], 5)
    (tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE).unlink()  # not needed any more
    loaded, loaded_cfg, _ = load_checkpoint(tmp_path / "c.pt")
    assert loaded_cfg.model.weights == "" and loaded_cfg.model.trunk_norm == "frozen_bn"
    assert isinstance(loaded.backbone.body.bn1, FrozenBatchNorm2d)


# ----------------------------------------------------------------------------- end to end


def test_the_paper_experiment_offline_is_one_line_and_no_run_folder(tiny_coco, tmp_path, offline):
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", "paper", "--data", f"coco:{tiny_coco}", "--out", str(out),
                                      "--no-progress", "--set", "train.iterations=1"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "resnet50-0676ba61.pth" in line and "model.weights=PATH" in line
    assert not out.exists()


@pytest.mark.slow
def test_training_from_cached_weights_offline(cached_resnet18, tiny_coco, tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", "smoke", "--data", f"coco:{tiny_coco}", "--out", str(out), "--no-progress",
                                      "--set", "model.trunk=resnet18", "--set", "model.weights=IMAGENET1K_V1",
                                      "--set", "train.iterations=2", "--set", "train.batch_size=2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())["config"]["model"]
    assert (config["weights"], config["trunk_norm"]) == ("IMAGENET1K_V1", "auto")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    # frozen: the trunk's BN statistics are still the cached file's after training
    torch.testing.assert_close(state["backbone.body.bn1.running_mean"], cached_resnet18["bn1.running_mean"],
                               rtol=0, atol=0)
