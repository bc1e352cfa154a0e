"""ablate.model.memory_format: oneDNN's faulty NHWC kernel (strided 1x1 convolution, few input
channels) is never reached on CPU, and the shipped experiments keep channels_last (same AP).

The narrow model of the engine tests hung (2 threads), crashed (1 thread) or gave wrong gradients
in NHWC on this machine; it trains here in a subprocess with a timeout, so a regression is a red
test with the subprocess's output, never a hung suite."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ablate.builders import build_model
from ablate.experiments import list_experiments, load_experiment
from ablate.model.memory_format import ONEDNN_MIN_SAFE_CHANNELS, memory_format, unsafe_convolutions, use_channels_last
from ablate.model.retinanet import RetinaNet

NARROW = dict(trunk="tiny", tiny_widths=(4, 8, 8, 8, 8), fpn_channels=8, head_convs=1, head_channels=8)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # the rule only reads the device's type


def test_the_narrow_trunks_strided_1x1_convolutions_are_found():
    model = RetinaNet(3, **NARROW)
    # layer1 goes 4 -> 8 channels, layer2..4 8 -> 8: every downsample has fewer than 16 inputs.
    assert unsafe_convolutions(model) == [f"backbone.body.layer{i}.downsample.0" for i in (1, 2, 3, 4)]
    assert not use_channels_last(model, CPU) and memory_format(model, CPU) is torch.contiguous_format


def test_the_rule_applies_on_cpu_only_and_only_when_channels_last_is_asked():
    narrow, wide = RetinaNet(3, **NARROW), RetinaNet(3, **{**NARROW, "tiny_widths": (16, 16, 16, 16, 16)})
    assert use_channels_last(narrow, CUDA)  # cuDNN is not oneDNN
    assert use_channels_last(wide, CPU) and memory_format(wide, CPU) is torch.channels_last
    assert not use_channels_last(wide, CPU, wanted=False)


def test_the_boundary_is_one_avx512_channel_block():
    def downsample(in_channels: int, stride: int = 2, kernel: int = 1) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 32, kernel, stride))
    assert unsafe_convolutions(downsample(ONEDNN_MIN_SAFE_CHANNELS - 1)) == ["0"]
    assert unsafe_convolutions(downsample(1)) == ["0"]
    assert unsafe_convolutions(downsample(ONEDNN_MIN_SAFE_CHANNELS)) == []
    assert unsafe_convolutions(downsample(4, stride=1)) == []  # not strided: another kernel
    assert unsafe_convolutions(downsample(4, kernel=3)) == []  # not 1x1: another kernel


def test_every_shipped_experiment_keeps_channels_last():
    """The rule changes nothing for the shipped experiments: every cell's model passes it, so
    they train in the same format and give the same AP as before it."""
    checked = set()
    for path in list_experiments():
        exp = load_experiment(str(path))
        for cell in exp.cells():
            m = exp.cell_config(cell).model
            key = (m.trunk, tuple(m.tiny_widths))
            if key in checked:
                continue
            checked.add(key)
            cfg = dataclasses.replace(exp.cell_config(cell), model=dataclasses.replace(m, weights=""))
            assert unsafe_convolutions(build_model(cfg, 3)) == [], (path.name, cell.name)
    assert ("tiny", (16, 32, 64, 128, 256)) in checked


_TRAIN_NARROW = textwrap.dedent("""
    import itertools, sys
    import torch
    from ablate import engine
    from ablate.criterion import DetectionLoss
    from ablate.data.coco import collate
    from ablate.model.retinanet import RetinaNet

    threads, channels_last, out = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = RetinaNet(3, trunk="tiny", tiny_widths=(4, 8, 8, 8, 8), fpn_channels=8, head_convs=1, head_channels=8)
    def sample(i):
        g = torch.Generator().manual_seed(i)
        image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
        return image, {"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
                       "image_id": i, "orig_size": (64, 64)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    engine.train(engine.TrainParts(model, DetectionLoss(), optimizer, scheduler),
                 itertools.repeat(collate([sample(1), sample(2)])),
                 engine.TrainPlan(torch.device("cpu"), 3, amp=False, channels_last=channels_last),
                 hooks=engine.TrainHooks(show_progress=False))
    # The last step's gradients (zeroed only before the next step) and the weights after 3 steps.
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()},
                "weights": model.state_dict()}, out)
""")


def _train_narrow(tmp_path: Path, threads: int, channels_last: bool) -> dict:
    out = tmp_path / f"narrow-{threads}-{int(channels_last)}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run([sys.executable, "-c", _TRAIN_NARROW, str(threads), str(int(channels_last)), str(out)],
                              capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired as e:
        stderr = (e.stderr or b"").decode(errors="replace")[-2000:]
        pytest.fail(f"the narrow model's training hung ({threads} threads, channels_last={channels_last}): {stderr}")
    assert proc.returncode == 0, f"exit {proc.returncode} ({threads} threads): {proc.stderr[-2000:]}"
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_the_engine_tests_narrow_model_trains_and_its_gradients_match_nchw(tmp_path, threads):
    asked_nhwc = _train_narrow(tmp_path, threads, channels_last=True)
    nchw = _train_narrow(tmp_path, threads, channels_last=False)
    for name, grad in nchw["grads"].items():
        if grad is not None:
            torch.testing.assert_close(asked_nhwc["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, weight in nchw["weights"].items():
        torch.testing.assert_close(asked_nhwc["weights"][name], weight, rtol=1e-5, atol=1e-7, msg=name)
