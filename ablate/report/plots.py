"""The report's seaborn plots: AP against the varied key with the paper's AP beside it, the
training loss curves, and the AP deltas against the baseline. Every figure is a matplotlib Figure
never registered with pyplot, in one seaborn style (`style`, `new_figure`, `save_figure`, which
the paper's diagnostics in ablate.analysis draw with too)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import ScaledTranslation

from ablate.report.spec import ReportSpec
from ablate.report.stats import baseline_cell, is_missing, t_interval
from ablate.report.tables import cell_status, display_value, format_cell, header
from ablate.runs import Outcome

DPI = 120
# Loss curves are drawn from at most this many step bins: the paper's 90k iterations would
# otherwise give a CI computation per logged step and an unreadable, aliased line.
MAX_CURVE_POINTS = 200
HUE_DODGE = 0.3  # how far apart the hue levels of one category sit on a categorical x
SEED_SHIFT_POINTS = 7  # how far right of its cell's mean a seed's dot is drawn, in typographic points


def style():
    """The seaborn look for every figure, as a context (no global rcParams change)."""
    return sns.axes_style("whitegrid")


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    """A Figure not registered with pyplot: rendered by Agg on save, never displayed, nothing to close."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def save_figure(fig: Figure, path: Path) -> Path:
    """Render `fig` to a PNG at DPI."""
    fig.savefig(path, dpi=DPI)
    return path


def _x_key(spec: ReportSpec, cells: pd.DataFrame) -> str | None:
    """spec.x, else varied[0] when its displayed values are numbers, else None (cell names)."""
    if spec.x is not None:
        return spec.x
    if spec.varied and _numeric([display_value(spec.varied[0], v) for v in cells[spec.varied[0]]]):
        return spec.varied[0]
    return None


def _numeric(values: Sequence[Any]) -> bool:
    """Whether every value is a number (bools excluded) and so can sit on a continuous axis."""
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
               for v in values)


def _label_of(cell: pd.Series, keys: Sequence[str]) -> str:
    """"gamma=2, alpha=0.25": a cell's values of `keys` with their table headers."""
    return ", ".join(f"{header(k)}={format_cell(display_value(k, cell[k]))}" for k in keys)


def _hue_labels(spec: ReportSpec, cells: pd.DataFrame, x_key: str | None) -> tuple[list | None, str | None]:
    """Per-cell hue labels and the legend title, or (None, None) for a single colour.

    Without spec.hue, cells that share an x value would be averaged into one point; the other
    varied keys then become the hue so that each cell keeps its own line.
    """
    if spec.hue is not None:
        return [format_cell(display_value(spec.hue, v)) for v in cells[spec.hue]], header(spec.hue)
    if x_key is None:
        return None, None
    x_values = [display_value(x_key, v) for v in cells[x_key]]
    others = [k for k in spec.varied if k != x_key]
    if len(set(map(str, x_values))) == len(x_values) or not others:
        return None, None
    return [_label_of(c, others) for _, c in cells.iterrows()], ", ".join(header(k) for k in others)


def _plot_frame(runs: pd.DataFrame, cells: pd.DataFrame, spec: ReportSpec) -> tuple[pd.DataFrame, dict]:
    """Finished per-run rows with `_x`, `_hue`, `AP%` columns, and the plot's layout facts."""
    x_key = _x_key(spec, cells)
    if x_key is None:
        x_values = list(cells["cell"])
    else:
        x_values = [display_value(x_key, v) for v in cells[x_key]]
    numeric = x_key is not None and _numeric(x_values)
    if not numeric:
        x_values = [format_cell(v) for v in x_values]
    hues, hue_title = _hue_labels(spec, cells, x_key)
    by_cell = {"_x": dict(zip(cells["cell"], x_values))}
    if hues is not None:
        by_cell["_hue"] = dict(zip(cells["cell"], hues))
    has_ap = runs["AP"].notna() if "AP" in runs else pd.Series(False, index=runs.index)
    finished = runs[(runs["outcome"] == Outcome.FINISHED) & has_ap].copy()
    for column, mapping in by_cell.items():
        finished[column] = finished["cell"].map(mapping)
    finished["AP%"] = 100 * finished["AP"].astype(float) if "AP" in finished else []
    layout = {"x_key": x_key, "numeric": numeric, "x": x_values, "hue": hues, "hue_title": hue_title}
    return finished, layout


def _x_label(x_key: str | None) -> str:
    """The x axis title: header and key ("gamma (loss.gamma)"), or "cell"."""
    return "cell" if x_key is None else f"{header(x_key)} ({x_key})" if header(x_key) != x_key else x_key


def drawn_interval(values: pd.Series) -> tuple[float, float]:
    """The 95% t interval of the mean AP (percent) as drawn: cut to AP's range [0, 100].

    For drawing only: with 3 seeds, a cell of 0.0, 0.1 and 16.8 AP has an interval down to -16,
    an AP no detector can have, which would stretch the axis below zero. The tables and
    results.csv keep the interval as measured (stats.t_interval).
    """
    low, high = t_interval(values)
    return max(low, 0.0), min(high, 100.0)


def _hue_offsets(levels: int, dodge: float) -> list[float]:
    """Where seaborn's pointplot puts each hue level around a category (its dodge arithmetic)."""
    if levels < 2 or not dodge:
        return [0.0] * levels
    return [-dodge / 2 + dodge / (levels - 1) * i for i in range(levels)]


def _draw_ours(ax: Any, frame: pd.DataFrame, layout: dict, order: list, label: str) -> None:
    """Our AP per run, mean with the 95% t band (numeric x) or error bars (categorical x)."""
    hue = "_hue" if layout["hue"] is not None else None
    hue_order = list(dict.fromkeys(layout["hue"])) if hue else None
    # With a hue the legend lists its levels; seaborn refuses a label on top of them.
    kwargs = {} if hue else {"label": label}
    if layout["numeric"]:
        sns.lineplot(data=frame, x="_x", y="AP%", hue=hue, hue_order=hue_order, errorbar=drawn_interval,
                     marker="o", markersize=7, ax=ax, **kwargs)
    else:
        sns.pointplot(data=frame, x="_x", y="AP%", hue=hue, hue_order=hue_order, order=order,
                      errorbar=drawn_interval, capsize=0.15, linestyle="none", marker="o",
                      err_kws={"linewidth": 1.5}, dodge=HUE_DODGE if hue else False, ax=ax, **kwargs)


def _draw_seeds(ax: Any, frame: pd.DataFrame, layout: dict, order: list) -> Line2D:
    """Each finished run's AP as a small dot, a few points right of its cell's mean (so the mean's
    marker and interval stay visible), in its hue's colour; the legend handle."""
    levels = list(dict.fromkeys(layout["hue"])) if layout["hue"] is not None else [None]
    colors = dict(zip(levels, sns.color_palette(n_colors=len(levels))))
    offsets = dict(zip(levels, _hue_offsets(len(levels), HUE_DODGE if not layout["numeric"] else 0.0)))
    hues = frame["_hue"] if "_hue" in frame else pd.Series([None] * len(frame), index=frame.index)
    xs = [float(x) if layout["numeric"] else order.index(x) + offsets[h] for x, h in zip(frame["_x"], hues)]
    beside = ax.transData + ScaledTranslation(SEED_SHIFT_POINTS / 72, 0, ax.figure.dpi_scale_trans)
    ax.scatter(xs, frame["AP%"], s=14, c=[colors[h] for h in hues], alpha=0.75, linewidths=0,
               transform=beside, zorder=3)
    return Line2D([], [], linestyle="none", marker="o", markersize=4, color="0.4", alpha=0.75, label="one seed")


def _x_position(layout: dict, order: list, i: int) -> float:
    """Where cell `i` sits on the x axis: its value, or its category's index."""
    return float(layout["x"][i]) if layout["numeric"] else float(order.index(layout["x"][i]))


def _draw_paper(ax: Any, cells: pd.DataFrame, layout: dict, order: list, table: str) -> Line2D | None:
    """The paper's AP as open diamonds (dashed between them on a numeric x); the legend handle."""
    groups = layout["hue"] or [None] * len(cells)  # one dashed line per hue level
    points = [(_x_position(layout, order, i), 100 * ap, groups[i])
              for i, ap in enumerate(cells["paper_AP"]) if not is_missing(ap)]
    if not points:
        return None
    style = dict(color="0.25", marker="D", markerfacecolor="none", markersize=8)
    linestyle = "--" if layout["numeric"] else "none"
    for group in dict.fromkeys(p[2] for p in points):
        xs, ys = zip(*sorted((x, y) for x, y, g in points if g == group))
        ax.plot(xs, ys, linestyle=linestyle, **style)
    return Line2D([], [], linestyle=linestyle, label=f"paper, Table 1({table})", **style)


def _mark_unfinished(ax: Any, cells: pd.DataFrame, layout: dict, order: list) -> None:
    """Write "diverged (k/n)" at the x of each cell that has no finished run to plot."""
    for i, (_, row) in enumerate(cells.iterrows()):
        status = cell_status(row)
        if status is not None:
            if layout["hue"] is not None:  # several cells may share this x
                status = f"{layout['hue'][i]}: {status}"
            ax.annotate(status, xy=(_x_position(layout, order, i), 0.03), xycoords=ax.get_xaxis_transform(),
                        ha="center", va="bottom", rotation=90, color="tab:red", fontsize=9)


def _fit_x(ax: Any, layout: dict, order: list) -> None:
    """Show every cell's x, also those without a point (diverged cells), with a tick each."""
    if layout["numeric"]:
        lo, hi = min(layout["x"]), max(layout["x"])
        pad = 0.05 * (hi - lo) if hi > lo else 0.5
        ax.set_xlim(lo - pad, hi + pad)
        ticks = sorted(set(layout["x"]))
        # Label only ticks at least ~4% of the axis apart (gamma's 0, 0.1, 0.2 would overprint).
        labels, last = [], None
        for t in ticks:
            show = last is None or (t - last) >= 0.04 * (hi - lo if hi > lo else 1)
            labels.append(f"{t:g}" if show else "")
            last = t if show else last
        ax.set_xticks(ticks, labels)
    else:
        crowded = len(order) > 3  # long cell names would overlap: slant them
        ax.set_xticks(range(len(order)), order, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        ax.set_xlim(-0.5, len(order) - 0.5)


def plot_ap(runs: pd.DataFrame, cells: pd.DataFrame, spec: ReportSpec, path: Path) -> Path:
    """AP (percent) against spec.x over seeds, with the paper's AP as a dashed reference."""
    return save_figure(draw_ap(runs, cells, spec), path)


def draw_ap(runs: pd.DataFrame, cells: pd.DataFrame, spec: ReportSpec) -> Figure:
    """plot_ap's figure: each cell's mean AP with its 95% interval (cut at 0 and 100 AP), each
    seed a dot beside it, the paper's AP, and a note at cells that have no finished run."""
    frame, layout = _plot_frame(runs, cells, spec)
    order = list(dict.fromkeys(layout["x"])) if not layout["numeric"] else []
    several = bool((cells["n"] >= 2).any())
    with style():
        fig, ax = new_figure(max(6.5, 0.9 * len(order) + 3), 4.6)
        extra = []
        if not frame.empty:
            _draw_ours(ax, frame, layout, order, "ours: mean, 95% CI over seeds" if several else "ours")
            if several:
                extra.append(_draw_seeds(ax, frame, layout, order))
        paper = _draw_paper(ax, cells, layout, order, spec.paper_table) if spec.paper_table else None
        extra += [paper] if paper else []
        _fit_x(ax, layout, order)
        _mark_unfinished(ax, cells, layout, order)
        if ax.get_ylim()[0] < 0:  # only the margin goes below 0 AP: no point or band is there
            ax.set_ylim(bottom=0.0)
        ax.set_xlabel(_x_label(layout["x_key"]))
        ax.set_ylabel("AP (%)")
        detail = "mean, 95% CI, seeds" if several else "one seed: no interval"
        ax.set_title(f"{spec.name}: AP over seeds ({detail})")
        _finish_legend(ax, extra, layout["hue_title"])
    return fig


def _finish_legend(ax: Any, extra: list, title: str | None) -> None:
    """One legend: seaborn's entries (hue levels or "ours") plus `extra` handles."""
    legend = ax.get_legend()
    handles = list(legend.legend_handles) if legend else []
    labels = [t.get_text() for t in legend.texts] if legend else []
    handles += extra
    labels += [h.get_label() for h in extra]
    if handles:
        ax.legend(handles, labels, title=title, fontsize="small", title_fontsize="small")


def _curve_keys(histories: pd.DataFrame) -> list[str]:
    """The panels of loss_curves.png: loss_cls and loss_box_reg, else the total loss."""
    present = set(histories["key"]) if "key" in histories else set()
    keys = [k for k in ("loss_cls", "loss_box_reg") if k in present]
    return keys or (["loss"] if "loss" in present else [])


def _binned_curves(histories: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Finite step metrics of `keys` joined to their run's cell and outcome, averaged per run in step bins."""
    frame = histories[histories["key"].isin(keys)].merge(runs[["run_id", "cell", "outcome"]], on="run_id")
    frame = frame[np.isfinite(frame["value"].astype(float))]
    if frame.empty:
        return frame
    if frame["step"].nunique() > MAX_CURVE_POINTS:
        first, last = frame["step"].min(), frame["step"].max()
        width = math.ceil((last - first + 1) / MAX_CURVE_POINTS)
        frame = frame.assign(step=first + (frame["step"] - first) // width * width)
    return frame.groupby(["run_id", "cell", "outcome", "key", "step"], as_index=False)["value"].mean()


def curves_unavailable(histories: pd.DataFrame | None, runs: pd.DataFrame) -> str | None:
    """Why loss_curves.png cannot be drawn, or None when it can."""
    if histories is None or histories.empty:
        return "no step metrics were tracked (histories is empty)"
    keys = _curve_keys(histories)
    if not keys:
        return "the histories hold none of loss_cls, loss_box_reg, loss"
    if _binned_curves(histories, runs, keys).empty:
        return "no finite loss values belong to the reported runs"
    return None


def _curve_panel(ax: Any, panel: pd.DataFrame, palette: dict[str, Any], log: bool) -> None:
    """One loss: finished runs as the mean over seeds with a 95% t band, the others as thin dashed lines.

    A diverged run's blow-up would swamp the mean of its cell, so it is drawn on its own.
    """
    finished = panel[panel["outcome"] == Outcome.FINISHED]
    others = panel[panel["outcome"] != Outcome.FINISHED]
    if not finished.empty:
        sns.lineplot(data=finished, x="step", y="value", hue="cell", palette=palette,
                     hue_order=[c for c in palette if c in set(finished["cell"])],
                     errorbar=t_interval, ax=ax, legend=False)
    if not others.empty:
        sns.lineplot(data=others, x="step", y="value", hue="cell", palette=palette, units="run_id",
                     estimator=None, linestyle="--", linewidth=1, ax=ax, legend=False)
    # After drawing, so that the mean and band are over the values, not over their logarithms.
    if log:
        ax.set_yscale("log")


def _curve_legend(fig: Figure, palette: dict[str, Any], cells: pd.DataFrame, any_unfinished: bool) -> None:
    """One legend for both panels, below them, so that it never hides a curve."""
    labels = {row["cell"]: row["cell"] + (f" ({row['n_diverged']}/{row['n_runs']} diverged)"
                                          if row["n_diverged"] else "") for _, row in cells.iterrows()}
    handles = [Line2D([], [], color=color, linewidth=2, label=labels[cell]) for cell, color in palette.items()]
    if any_unfinished:
        handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=1, label="a run that did not finish"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize="small",
               title="cell (mean and 95% CI over finished seeds)", title_fontsize="small")


def plot_loss_curves(histories: pd.DataFrame, runs: pd.DataFrame, cells: pd.DataFrame, path: Path) -> Path:
    """Training losses against iteration, one colour per cell; log y for loss_cls.

    Diverged runs are drawn too (dashed, one line each): their blow-up is what the curve is for.
    """
    keys = _curve_keys(histories)
    frame = _binned_curves(histories, runs, keys)
    present = set(frame["cell"])
    shown = [c for c in cells["cell"] if c in present]
    palette = dict(zip(shown, sns.color_palette(n_colors=len(shown))))
    with style():
        fig, axes = new_figure(5.5 * len(keys) + 1, 4.4, ncols=len(keys))
        axes = np.atleast_1d(axes)
        for ax, key in zip(axes, keys):
            log = key in ("loss_cls", "loss")
            panel = frame[(frame["key"] == key) & ((frame["value"] > 0) | (not log))]
            _curve_panel(ax, panel, palette, log)
            ax.set_xlabel("iteration")
            ax.set_ylabel(key + (" (log scale)" if log else ""))
            ax.set_title(key)
        _curve_legend(fig, palette, cells, (frame["outcome"] != Outcome.FINISHED).any())
        return save_figure(fig, path)


def plot_deltas(results: pd.DataFrame, spec: ReportSpec, path: Path) -> Path:
    """AP - baseline AP per cell (AP points) with 95% intervals (paired by seed where possible)."""
    base = baseline_cell(spec, results)
    names = list(results["cell"])
    delta = 100 * results["AP_delta"].astype(float)
    half = 100 * results["AP_delta_ci95"].astype(float)
    colors = ["0.6" if c == base else sns.color_palette()[0] for c in names]
    with style():
        fig, ax = new_figure(max(6.0, 0.9 * len(names) + 2.5), 4.6)
        ax.bar(range(len(names)), delta.fillna(0.0), color=colors)
        ax.errorbar(range(len(names)), delta, yerr=half, fmt="none", ecolor="black", capsize=5)
        ax.axhline(0.0, color="black", linewidth=0.8)
        for i, (_, row) in enumerate(results.iterrows()):
            text = "baseline" if row["cell"] == base else cell_status(row)
            if text or is_missing(row["AP_delta"]):
                ax.annotate(text or "no AP", xy=(i, 0.03), xycoords=ax.get_xaxis_transform(),
                            ha="center", va="bottom", rotation=90, fontsize=9,
                            color="0.3" if row["cell"] == base else "tab:red")
        ax.set_xticks(range(len(names)), names, rotation=25 if len(names) > 3 else 0,
                      ha="right" if len(names) > 3 else "center")
        ax.set_ylabel("ΔAP (AP points)")
        ax.set_title(f"{spec.name}: AP − AP of {base} (95% CI; paired by seed where seeds match)",
                     fontsize=10)
        return save_figure(fig, path)
