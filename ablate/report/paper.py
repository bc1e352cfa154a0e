"""The paper's Table 1 beside ours: ablate/reference/paper_table1.csv, and which of its rows a
cell of ours corresponds to (by config values, per sub-table a..e)."""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ablate.config import Config, flatten
from ablate.report.spec import ReportSpec
from ablate.report.stats import is_missing

# Our metric name -> the column of paper_table1.csv (the paper writes APS/APM/APL).
PAPER_COLUMNS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "APs": "APS", "APm": "APM", "APl": "APL",
                 "time_ms": "time_ms"}
PAPER_TABLES = ("a", "b", "c", "d", "e")
FLOAT_TOL = 1e-6


@functools.cache
def _paper_csv() -> pd.DataFrame:
    """The whole of paper_table1.csv, read once from the installed package."""
    with importlib.resources.files("ablate.reference").joinpath("paper_table1.csv").open() as f:
        return pd.read_csv(f, comment="#", dtype={"table": str, "method": str})


def paper_table(table: str) -> pd.DataFrame:
    """Rows of sub-table `table` ("a".."e") of the paper's Table 1, as in the CSV (AP in percent)."""
    if table not in PAPER_TABLES:
        raise ValueError(f"unknown paper table '{table}' (known: {', '.join(PAPER_TABLES)})")
    frame = _paper_csv()
    return frame[frame["table"] == table].reset_index(drop=True)


def _close(value: Any, target: float) -> bool:
    """value == target within FLOAT_TOL; False for None or a non-number."""
    try:
        return math.isclose(float(value), target, rel_tol=0.0, abs_tol=FLOAT_TOL)
    except (TypeError, ValueError):
        return False


def as_list(value: Any) -> list:
    """A list value that may have come back from tracking as its JSON text."""
    if isinstance(value, str):
        value = json.loads(value)
    return list(value)


def trunk_depth(trunk: Any) -> int | None:
    """50 for "resnet50", 101 for "resnet101"; None for a trunk without a ResNet depth ("tiny")."""
    if isinstance(trunk, str) and trunk.startswith("resnet") and trunk[6:].isdigit():
        return int(trunk[6:])
    return None


# Each of these maps a cell (a getter of config keys) to the columns that pick its row of one
# sub-table, or to None when the cell has no counterpart there.
Getter = Callable[[str], Any]


def _keys_a(get: Getter) -> dict[str, Any] | None:
    """Table 1(a): alpha of alpha-balanced CE."""
    cls = get("loss.cls")
    # Focal loss with gamma 0 is alpha-CE (ablate.losses.focal), so it finds the same row.
    if cls == "alpha_ce" or (cls == "focal" and _close(get("loss.gamma"), 0.0)):
        return {"method": "alpha_ce", "alpha": get("loss.alpha")}
    return None


def _keys_b(get: Getter) -> dict[str, Any] | None:
    """Table 1(b): gamma and alpha of focal loss."""
    if get("loss.cls") != "focal":
        return None
    return {"method": "focal", "gamma": get("loss.gamma"), "alpha": get("loss.alpha")}


def _keys_c(get: Getter) -> dict[str, Any] | None:
    """Table 1(c): anchor scales and the number of aspect ratios."""
    return {"num_scales": get("model.num_scales"), "num_ratios": len(as_list(get("model.aspect_ratios")))}


def _keys_d(get: Getter) -> dict[str, Any] | None:
    """Table 1(d): OHEM (batch, NMS, the 1:3 ratio) against FL."""
    cls = get("loss.cls")
    if cls == "focal":  # the table's single FL row has no OHEM settings
        return {"method": "focal"}
    if cls != "ohem":
        return None
    fraction = get("loss.ohem_fg_fraction")
    if is_missing(fraction):
        method = "ohem"
    elif _close(fraction, 0.25):
        method = "ohem_1to3"
    else:
        return None  # a forced ratio other than the paper's 1:3
    return {"method": method, "ohem_batch": get("loss.ohem_batch"), "ohem_nms": get("loss.ohem_nms")}


def _keys_e(get: Getter) -> dict[str, Any] | None:
    """Table 1(e): ResNet depth and image scale."""
    depth = trunk_depth(get("model.trunk"))
    return None if depth is None else {"depth": depth, "scale": get("data.min_size")}


PAPER_KEYS: dict[str, Callable[[Getter], dict[str, Any] | None]] = {
    "a": _keys_a, "b": _keys_b, "c": _keys_c, "d": _keys_d, "e": _keys_e}


def _matching_row(table: pd.DataFrame, wanted: dict[str, Any]) -> pd.Series | None:
    """The first row of `table` whose columns equal `wanted` (numbers within FLOAT_TOL)."""
    mask = pd.Series(True, index=table.index)
    for column, value in wanted.items():
        if is_missing(value):
            return None
        if isinstance(value, str):
            mask &= table[column] == value
        else:
            mask &= np.isclose(table[column].astype(float), float(value), rtol=0.0, atol=FLOAT_TOL)
    hits = table[mask]
    return None if hits.empty else hits.iloc[0]


def _getter(cell: pd.Series, defaults: dict[str, Any]) -> Getter:
    """Looks a key up in the cell, falling back to the config default when the column is absent."""
    return lambda key: cell[key] if key in cell.index else defaults.get(key)


def paper_rows(spec: ReportSpec, cells: pd.DataFrame) -> pd.DataFrame:
    """The paper's numbers for each cell (aligned with `cells`), NaN where no row matches.

    Columns `paper_<metric>` for AP, AP50, AP75, APs, APm, APl as fractions (the CSV's percent
    / 100, the same unit as our columns) and `paper_time_ms`. All NaN without spec.paper_table.
    """
    columns = [f"paper_{m}" for m in PAPER_COLUMNS]
    out = pd.DataFrame(np.nan, index=cells.index, columns=columns)
    if spec.paper_table is None:
        return out
    table, keys = paper_table(spec.paper_table), PAPER_KEYS[spec.paper_table]
    defaults = flatten(Config())
    for index, cell in cells.iterrows():
        wanted = keys(_getter(cell, defaults))
        row = None if wanted is None else _matching_row(table, wanted)
        if row is None:
            continue
        for ours, theirs in PAPER_COLUMNS.items():
            scale = 1.0 if ours == "time_ms" else 0.01
            out.loc[index, f"paper_{ours}"] = float(row[theirs]) * scale
    return out
