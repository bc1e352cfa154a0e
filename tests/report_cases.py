"""The shared cases of the report tests (tests/test_report_*.py): a tracked-runs frame as the
tracking module builds it, loss histories, the gamma sweep's 3 cells x 3 seeds, a ReportSpec, and
readers for the written table and PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from PIL import Image

from ablate.report import ReportSpec

T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), also in any t table
T_975_DF1 = 12.706204736174707
PNGS = ("ap.png", "deltas.png", "loss_curves.png", "loss_vs_pt.png")  # loss_vs_pt.png: Figure 1, passed in
COMMAND = "ablate sweep gamma-sweep && ablate report gamma-sweep"


def make_config(**overrides) -> dict:
    """A cell's flattened config: the paper's defaults, `overrides` given with '__' for '.'."""
    config = {"loss.cls": "focal", "loss.gamma": 2.0, "loss.alpha": 0.25, "model.prior": 0.01,
              "model.num_scales": 3, "model.aspect_ratios": [0.5, 1.0, 2.0], "model.trunk": "resnet50",
              "data.min_size": 600, "loss.ohem_batch": 128, "loss.ohem_nms": 0.7, "loss.ohem_fg_fraction": None}
    config.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config


def make_runs(cells: list[tuple[str, dict, list[tuple[int, str, float]]]]) -> pd.DataFrame:
    """runs as the tracking module builds them: cells of (name, config, [(seed, outcome, AP)])."""
    rows = []
    for index, (name, config, seeds) in enumerate(cells):
        for seed, outcome, ap in seeds:
            metrics = {"AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.02, "APs": ap / 2, "APm": ap, "APl": ap + 0.1,
                       "AR1": ap, "AR10": ap, "AR100": ap + 0.15}
            rows.append({"run_id": f"run{index}{seed}", "run_name": f"{name} s{seed}", "cell": name,
                         "cell_index": index, "seed": seed, "outcome": outcome, "config_hash": f"h{index}",
                         **config, **metrics, "infer_ms_per_img": 10.0, "train_seconds": 60.0,
                         "diverged_at": 150.0 if outcome == "diverged" else math.nan})
    return pd.DataFrame(rows)


def histories(runs: pd.DataFrame) -> pd.DataFrame:
    """loss_cls decaying and loss_box_reg falling for every run, every 10 iterations."""
    rows = []
    for i, run in enumerate(runs.itertuples()):
        for step in range(0, 300, 10):
            blown = run.outcome == "diverged" and step >= 150
            rows.append((run.run_id, "loss_cls", step, math.inf if blown else 1.1 * math.exp(-step / 100) + 0.01 * i))
            rows.append((run.run_id, "loss_box_reg", step, 0.6 - step / 1000 + 0.005 * i))
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def gamma_sweep() -> pd.DataFrame:
    """3 cells x 3 seeds; the g=5 cell's seed 2 diverged (with a bogus AP of 0 that must not count)."""
    return make_runs([
        ("focal g=0 a=0.75", make_config(loss__gamma=0.0, loss__alpha=0.75),
         [(0, "finished", 0.30), (1, "finished", 0.32), (2, "finished", 0.34)]),
        ("focal g=2 a=0.25", make_config(), [(0, "finished", 0.33), (1, "finished", 0.36), (2, "finished", 0.36)]),
        ("focal g=5 a=0.25", make_config(loss__gamma=5.0),
         [(0, "finished", 0.31), (1, "finished", 0.33), (2, "diverged", 0.0)]),
    ])


def make_spec(**kw) -> ReportSpec:
    defaults = dict(name="gamma-sweep", description="Focal loss: gamma and alpha.",
                    varied=["loss.gamma", "loss.alpha"], paper_table="b", command=COMMAND)
    return ReportSpec(**{**defaults, **kw})


def read_table(path: Path) -> list[dict[str, str]]:
    """The rows of a Markdown table file as {header: cell text}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return [dict(zip(split[0], row)) for row in split[2:]]


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 500 <= width <= 3000 and 300 <= height <= 2000, (path.name, image.size)
        # Not a blank canvas: a drawn plot has many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
