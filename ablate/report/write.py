"""The report folder: table.md / table.tex, results.csv and runs.csv (so that every number traces
back to a run_id), the plots, and a README.md that ties them together with the provenance.

Figures computed elsewhere (the paper's Figures 1 and 4, which need the loss functions or a
trained model) come in already written, through `figures`; this module never computes them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ablate.collapse import RULE, collapsed_seeds
from ablate.report.plots import curves_unavailable, plot_ap, plot_deltas, plot_loss_curves
from ablate.report.spec import ReportSpec
from ablate.report.stats import NOT_FINISHED, baseline_cell
from ablate.report.tables import display_table, latex_table, markdown_table, results_table, table_caption
from ablate.runs import Outcome

# The README's caption of each plot this module draws; a figure passed in brings its own.
CAPTIONS = {"ap": "AP against the varied key, over seeds", "deltas": "AP difference to the baseline",
            "loss_curves": "training losses"}


def _ordered_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """runs.csv: identity and outcome columns first, then metrics and config, in cell/seed order."""
    first = [c for c in ("cell_index", "cell", "seed", "run_id", "run_name", "outcome", "config_hash")
             if c in runs]
    return runs[first + [c for c in runs.columns if c not in first]].sort_values(["cell_index", "seed"])


def _provenance(results: pd.DataFrame, runs: pd.DataFrame) -> str:
    """README lines: outcome counts, and per cell which run_ids its numbers come from."""
    # Finished, diverged and failed are always stated (a reader looks for them); rarer outcomes when present.
    total = ", ".join(f"{int(results[f'n_{o}'].sum())} {o}" for o in (Outcome.DIVERGED, Outcome.FAILED))
    total += "".join(f", {int(results[f'n_{o}'].sum())} {o}" for o in NOT_FINISHED[2:] if results[f"n_{o}"].sum())
    lines = [f"{len(runs)} runs: {int(results['n'].sum())} finished, {total}. Metrics average the finished runs only; "
             "[runs.csv](runs.csv) has every run (run_id, outcome, config, metrics) and "
             "[results.csv](results.csv) the aggregated table at full precision.", ""]
    for _, row in results.iterrows():
        cell_runs = runs[runs["cell"] == row["cell"]]
        others = cell_runs[cell_runs["outcome"] != Outcome.FINISHED]
        note = "; ".join(f"{outcome}: " + ", ".join(f"`{i}`" for i in group["run_id"])
                         for outcome, group in others.groupby("outcome", sort=False))
        ids = ", ".join(f"`{i}`" for i in row["run_ids"].split()) or "none finished"
        lines.append(f"- **{row['cell']}**: {ids}" + (f"; {note}" if note else ""))
    return "\n".join(lines) + "\n\n" + collapsed_text(runs)


def collapsed_text(runs: pd.DataFrame) -> str:
    """The README's line on collapsed seeds (ablate.collapse): the rule, then each cell that has
    any with its seeds and APs, or "none"."""
    finished = runs[runs["outcome"] == Outcome.FINISHED] if "AP" in runs else runs.iloc[:0]
    found = []
    for cell, group in finished.groupby("cell", sort=False):
        ap = dict(zip(group["seed"], 100 * group["AP"].astype(float)))
        seeds = collapsed_seeds(ap)
        if seeds:
            found.append(f"**{cell}** {len(seeds)} of {len(ap)} (" + ", ".join(f"seed {s}: {ap[s]:.1f} AP" for s in seeds)
                         + f"; median {float(pd.Series(list(ap.values())).median()):.1f})")
    listed = "; ".join(found) if found else "none"
    return (f"Collapsed seeds ({RULE}; results.csv's n_collapsed): {listed}. A mean over a collapsed "
            "seed moves by several AP: read mean-based comparisons that include one with care.")


def _readme(spec: ReportSpec, table_md: str, plots: dict[str, Path], skipped: dict[str, str],
            provenance: str, captions: dict[str, str]) -> str:
    """README.md: title, description, command, table, plots (or why one is missing), provenance."""
    command = spec.command or "(no command recorded)"
    captions = {**CAPTIONS, **captions}
    images = [f"{captions.get(k, k)[0].upper()}{captions.get(k, k)[1:]}:\n\n![{k}]({p.name})" for k, p in plots.items()]
    images += [f"`{name}` was not written: {why}." for name, why in skipped.items()]
    parts = [f"# {spec.name}", spec.description, "## Reproduce", f"```bash\n{command}\n```",
             "## Results", table_md.strip(), "## Plots", "\n\n".join(images), "## Provenance", provenance]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(runs: pd.DataFrame, histories: pd.DataFrame, spec: ReportSpec, out_dir: Path,
                 figures: dict[str, tuple[Path, str]] | None = None,
                 skipped_figures: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the report folder (created if needed); returns {"table": path, ...} of the files written.

    runs: one row per child run (one cell x one seed), as tracking reads them back: run_id, cell,
    cell_index, seed, outcome, the flattened config keys and the final metrics as fractions in
    [0, 1]. histories: step metrics in long form (run_id, key, step, value); may be empty.

    Keys: table (table.md), table_tex, results, runs, ap, loss_curves (only when there are loss
    histories), deltas, readme, plus the keys of `figures`: plots the caller already wrote into
    out_dir ({key: (path, caption)}, e.g. Figures 1 and 4), shown in the README in that order
    after ours; `skipped_figures` ({file: why}) says in the README why one of them is missing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = results_table(runs, spec)
    table = display_table(results, spec)
    caption = table_caption(spec, baseline_cell(spec, results))
    table_md = markdown_table(table) + "\n\n" + caption + "\n"
    paths = {"table": out_dir / "table.md", "table_tex": out_dir / "table.tex",
             "results": out_dir / "results.csv", "runs": out_dir / "runs.csv"}
    paths["table"].write_text(table_md)
    paths["table_tex"].write_text(latex_table(table, caption))
    results.to_csv(paths["results"], index=False)
    _ordered_runs(runs).to_csv(paths["runs"], index=False)

    plots = {"ap": plot_ap(runs, results, spec, out_dir / "ap.png"),
             "deltas": plot_deltas(results, spec, out_dir / "deltas.png")}
    skipped = {}
    why = curves_unavailable(histories, runs)
    if why is None:
        plots["loss_curves"] = plot_loss_curves(histories, runs, results, out_dir / "loss_curves.png")
    else:
        skipped["loss_curves.png"] = why
    plots.update({key: path for key, (path, _) in (figures or {}).items()})
    skipped.update(skipped_figures or {})
    paths.update(plots)
    paths["readme"] = out_dir / "README.md"
    captions = {key: caption for key, (_, caption) in (figures or {}).items()}
    paths["readme"].write_text(_readme(spec, table_md, plots, skipped, _provenance(results, runs), captions))
    return paths
