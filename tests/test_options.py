"""ablate.options: what --set and --data mean as config overrides."""

from __future__ import annotations

from ablate.options import given_overrides, overrides_from


def test_overrides_from_reads_data_then_sets_and_given_overrides_is_none_without_flags():
    out = overrides_from(["loss.gamma=1", "train.iterations=50"], "synth")
    assert out["loss.gamma"] == 1 and out["train.iterations"] == 50 and out["data.source"] == "synth"
    assert overrides_from(["data.source=coco"], "synth")["data.source"] == "coco"  # --set wins over --data
    assert given_overrides(None, None) is None and given_overrides([], None) is None
    assert given_overrides(["loss.gamma=0"], None) == {"loss.gamma": 0}
