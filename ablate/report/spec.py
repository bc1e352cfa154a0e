"""What one report is about (`ReportSpec`) and the metrics a report summarises."""

from __future__ import annotations

from dataclasses import dataclass, field

# Metrics summarised per cell (mean, std, ci95); fractions in [0, 1] like the runs' columns.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# The paper's sub-tables report these three.
TABLE_METRICS = ("AP", "AP50", "AP75")


@dataclass
class ReportSpec:
    """What one report is about: the ablation's name, the keys its cells vary and how to plot them."""

    name: str  # ablation name, e.g. "gamma-sweep"
    description: str
    varied: list[str] = field(default_factory=list)  # config keys the cells vary, in the experiment's order
    x: str | None = None  # key on the x axis of the AP plot (default: varied[0] if numeric)
    hue: str | None = None  # key for colour (e.g. "loss.cls")
    baseline: str | None = None  # cell name that deltas are measured against (default: first cell)
    paper_table: str | None = None  # "a".."e" of paper_table1.csv
    command: str = ""  # the command line that reproduces the report
