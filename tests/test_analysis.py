"""ablate.analysis: the focal loss curves of the paper's Figure 1, by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ablate.analysis import figure1_curves


def test_figure1_curves_are_the_focal_loss():
    p = np.array([0.5, 0.9])
    curves = {g: c.numpy() for g, c in figure1_curves(torch.tensor(p)).items()}
    assert sorted(curves) == [0.0, 0.5, 1.0, 2.0, 5.0]
    assert curves[0.0] == pytest.approx(-np.log(p))  # CE
    assert curves[2.0] == pytest.approx(-(1 - p) ** 2 * np.log(p))
    assert curves[5.0][1] == pytest.approx(-(0.1**5) * np.log(0.9))
