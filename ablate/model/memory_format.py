"""Which memory format a model's convolutions run in: channels_last (NHWC) where it is safe.

NHWC makes convolutions faster on CUDA and on CPU (oneDNN), but on CPU oneDNN has an open defect
(uxlfoundation/oneDNN issue 6035): the backward-weights kernel of a 1x1 convolution with stride 2
in NHWC writes past its workspace when the input has fewer channels than the kernel's channel
block (8 on AVX2, 16 on AVX-512). Measured on a 2-core AMD EPYC with AVX2 (no AVX-512), two
training steps of a tiny trunk whose first width is w (`docs/speed.md` has the whole table):

    w        1 thread (NHWC)            2 threads (NHWC)          NCHW
    1        ok                         ok                        ok
    2        SIGSEGV                    hang                      ok
    4        SIGSEGV                    wrong gradients (+25%)    ok
    7        abort (double free)        hang                      ok
    8, 15    ok                         ok                        ok
    16       ok                         ok                        ok

The issue reports crashes for 8-15 channels on AVX-512 and wrong gradients on an AVX2 Xeon, so
the rule covers one AVX-512 block: on CPU, a model with any strided 1x1 convolution of fewer than
16 input channels runs NCHW. The shipped presets (first width 16, ResNets 64) never meet it.
"""

from __future__ import annotations

import torch
from torch import nn

# One AVX-512 channel block: below it oneDNN's NHWC 1x1 strided backward-weights kernel is unsafe.
ONEDNN_MIN_SAFE_CHANNELS = 16


def unsafe_convolutions(model: nn.Module) -> list[str]:
    """Names of the convolutions that may reach oneDNN's faulty NHWC kernel: 1x1, stride > 1,
    fewer than `ONEDNN_MIN_SAFE_CHANNELS` input channels (1 channel passed here, but is kept
    out too: the kernel chosen differs by CPU)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels < ONEDNN_MIN_SAFE_CHANNELS]


def use_channels_last(model: nn.Module, device: torch.device, wanted: bool = True) -> bool:
    """True when `model` should run NHWC on `device`: asked for, and not unsafe on CPU."""
    if not wanted:
        return False
    return device.type != "cpu" or not unsafe_convolutions(model)


def memory_format(model: nn.Module, device: torch.device, wanted: bool = True) -> torch.memory_format:
    """`torch.channels_last` or `torch.contiguous_format`, by `use_channels_last`."""
    return torch.channels_last if use_channels_last(model, device, wanted) else torch.contiguous_format
