"""The paper's Table 1 findings as checks over the committed reports (reports/NAME/results.csv).

Each check names the cells it compares by their config values (not by their display names), the
paper's numbers and a fixed pass rule (the criteria the project set for reproducing Table 1, the
same for every run), and says whether our runs show the effect. It reads only the report folders, whose results.csv carries the run ids behind every
mean, so every verdict traces back to tracked runs.
AP here is in points (percent). "CI" is the Student t 95% interval of a cell's mean over seeds.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ablate.budgets import AcrossBudgets, budget_label, holds_at_every_budget
from ablate.errors import AblateError
from ablate.report.stats import ci_bounds, is_missing, mean_std_text, welch
from ablate.runs import Outcome

MARK_START = "<!-- findings:start -->"
MARK_END = "<!-- findings:end -->"

# A cell is named by its config values, {"loss.gamma": 2.0, "loss.alpha": 0.25}, matched against
# results.csv's config columns (None matches an empty field, a list the list written there): the
# display names of cells can change without a check quietly losing its cell.
Values = dict[str, Any]
REL_TOL = 1e-9  # numbers in results.csv are written at full precision; this only absorbs the text round trip


@dataclass
class CellStats:
    """One cell of one report: AP mean, std, CI half-width and finished seeds (AP in points)."""

    cell: str  # its display name, for the text only
    mean: float
    std: float  # over seeds; NaN with fewer than 2
    half: float  # of the 95% CI; NaN with fewer than 2 seeds
    n: int
    row: pd.Series = field(repr=False, compare=False)  # its row of results.csv: counts and config values

    @property
    def low(self) -> float:
        return ci_bounds(self.mean, self.half)[0]

    @property
    def high(self) -> float:
        return ci_bounds(self.mean, self.half)[1]

    def text(self) -> str:
        spread = f" [{self.low:.1f}, {self.high:.1f}]" if math.isfinite(self.half) else ""
        return f"{self.cell}: {self.mean:.1f}{spread} (n={self.n})"


@dataclass
class FindingVerdict:
    finding: str
    paper: str
    ours: str
    holds: bool | None  # None: not measured (a report or a cell is missing, or a CI needs >= 2 seeds)
    # One verdict per finding: checks of the same comparison (same cells, same budget) share an id;
    # the one on the most seeds (the later on a tie) stands, the others are superseded by it.
    comparison: str = ""
    seeds: int = 0  # the fewer of its two cells' finished seeds
    report: str = ""  # the report folder it was judged on, for the links
    superseded_by: FindingVerdict | None = field(default=None, repr=False)
    supersedes: list[FindingVerdict] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Basis:
    """What a comparison check rests on: its seeds and its report folder."""

    seeds: int
    report: str


def _value_text(value: Any) -> str:
    """A config value as a reader writes it: 2, 0.25, none, [0.5, 1, 2], ce."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def values_text(values: Values) -> str:
    return ", ".join(f"{key}={_value_text(value)}" for key, value in values.items())


def _as_list(text: Any) -> list | None:
    """A list column's field ("[0.5, 1.0, 2.0]" as results.csv writes it) as a list; None if it is none."""
    if isinstance(text, (list, tuple)):
        return list(text)
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)  # a list of strings, written with Python's quotes
        except (ValueError, SyntaxError):
            return None
    return value if isinstance(value, list) else None


def config_equal(field_value: Any, wanted: Any) -> bool:
    """Whether a results.csv field holds the config value `wanted` (numbers within REL_TOL)."""
    if wanted is None:
        return is_missing(field_value)
    if is_missing(field_value):
        return False
    if isinstance(wanted, (list, tuple)):
        found = _as_list(field_value)
        return found is not None and len(found) == len(wanted) and all(map(config_equal, found, wanted))
    if isinstance(wanted, bool):
        return str(field_value) == str(wanted)
    if isinstance(wanted, (int, float)):
        try:
            return math.isclose(float(field_value), float(wanted), rel_tol=REL_TOL)
        except (TypeError, ValueError):
            return False
    return str(field_value) == str(wanted)


class Reports:
    """Lazy access to reports/NAME/results.csv; cells are looked up by their config values."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._frames: dict[str, pd.DataFrame] = {}

    def path(self, experiment: str) -> Path:
        return self.root / experiment / "results.csv"

    def frame(self, experiment: str) -> pd.DataFrame:
        if experiment not in self._frames:
            path = self.path(experiment)
            if not path.is_file():
                raise KeyError(f"{path} (run `ablate run {experiment}` with the seeds its check names, "
                               f"then `ablate report {experiment}`)")
            self._frames[experiment] = pd.read_csv(path)
        return self._frames[experiment]

    def cells(self, experiment: str, values: Values | None = None) -> list[CellStats]:
        """The cells whose config has `values` (every cell without them), in the report's order.

        A key that results.csv has no column for raises KeyError (the check is then not measured)."""
        frame = self.frame(experiment)
        mask = pd.Series(True, index=frame.index)
        for key, wanted in (values or {}).items():
            if key not in frame.columns:
                raise KeyError(f"column '{key}' in {self.path(experiment)}")
            mask &= frame[key].map(lambda field_value, wanted=wanted: config_equal(field_value, wanted))
        return [self._stats(row) for _, row in frame[mask].iterrows()]

    def cell(self, experiment: str, values: Values) -> CellStats:
        """The one cell whose config has `values`: KeyError when there is none (not measured), an
        AblateError when there are several (the check names its cell ambiguously: a bug to fix)."""
        found = self.cells(experiment, values)
        if not found:
            raise KeyError(f"cell with {values_text(values)} in {self.path(experiment)}")
        if len(found) > 1:
            raise AblateError(f"{experiment}: {len(found)} cells have {values_text(values)} "
                              f"({', '.join(c.cell for c in found)}) in {self.path(experiment)}; "
                              "a findings check must name exactly one")
        return found[0]

    def best(self, experiment: str, values: Values | None = None) -> CellStats:
        """The cell with the highest AP among those whose config has `values`."""
        cells = [c for c in self.cells(experiment, values) if math.isfinite(c.mean)]
        if not cells:
            where = f" with {values_text(values)}" if values else ""
            raise KeyError(f"finished cell{where} in {self.path(experiment)}")
        return max(cells, key=lambda c: c.mean)

    @staticmethod
    def _stats(row: pd.Series) -> CellStats:
        return CellStats(str(row["cell"]), 100 * float(row["AP_mean"]), 100 * float(row["AP_std"]),
                         100 * float(row["AP_ci95"]), int(row["n"]), row)


def disjoint(better: CellStats, worse: CellStats) -> bool | None:
    """Whether the two 95% CIs do not overlap with `better` above; None when either has no CI
    (fewer than two seeds: the finding is then not measured, rather than failed)."""
    if not (math.isfinite(better.half) and math.isfinite(worse.half)):
        return None
    return better.low > worse.high


def every_seed_finished(cell: CellStats) -> bool:
    return cell.n == int(cell.row["n_runs"])


# ----------------------------------------------------------------------------- the checks
# Each judge returns (what we measured, whether the finding holds); a missing report or cell
# raises KeyError and the finding is listed as not measured.

CE = {"loss.cls": "ce"}
FOCAL = {"loss.cls": "focal"}
ALPHA_CE = {"loss.cls": "alpha_ce"}


def _prior_collapse(r: Reports) -> tuple[str, bool | None]:
    ce = r.cell("prior-init", {**CE, "model.prior": None})
    diverged = int(ce.row[f"n_{Outcome.DIVERGED}"])
    return f"{ce.text()}; {diverged} {Outcome.DIVERGED}", ce.n == 0 or ce.mean < 1.0


def _prior_trains(r: Reports) -> tuple[str, bool | None]:
    cells = [r.cell("prior-init", {**CE, "model.prior": 0.01}), r.cell("prior-init", {**FOCAL, "model.prior": 0.01})]
    return "; ".join(c.text() for c in cells), all(map(every_seed_finished, cells)) and all(c.mean > 5.0 for c in cells)


def _alpha_best(r: Reports) -> tuple[str, bool | None]:
    best = r.best("alpha-ce")
    return best.text(), 0.5 <= float(best.row["loss.alpha"]) <= 0.9


def _alpha_quarter_worse(r: Reports) -> tuple[str, bool | None]:
    best, quarter = r.best("alpha-ce"), r.cell("alpha-ce", {**ALPHA_CE, "loss.alpha": 0.25})
    return f"{quarter.text()}; best {best.text()}", disjoint(best, quarter)


def collapsed_note(*cells: CellStats) -> str:
    """"; mean-based: alpha-CE a=0.9 has 1 collapsed seed" when results.csv counts any (ablate.collapse)."""
    found = [(c.cell, int(c.row["n_collapsed"])) for c in cells
             if "n_collapsed" in c.row and not is_missing(c.row["n_collapsed"]) and int(c.row["n_collapsed"])]
    return ("; mean-based, resting on collapsed seeds: " + ", ".join(f"{cell} {n}" for cell, n in found)) if found else ""


def _focal_leads_by_two(fl: CellStats, ce: CellStats, other: str = "alpha-CE") -> tuple[str, bool | None]:
    """FL at least 2 AP above `other` (alpha-CE), with disjoint CIs; the text gives the Welch p too,
    and flags collapsed seeds in either cell (the rule is about means)."""
    gap = fl.mean - ce.mean
    p = welch((fl.mean, fl.std, fl.n), (ce.mean, ce.std, ce.n)).p
    test = f" (Welch t-test p = {p:.3f})" if math.isfinite(p) else ""
    ours = f"FL {fl.text()}; {other} {ce.text()}; {gap:+.1f}{test}{collapsed_note(fl, ce)}"
    return ours, False if gap < 2.0 else disjoint(fl, ce)


# The comparison FL (gamma 2, alpha 0.25) vs alpha-CE (alpha 0.9) at pi = 0.01 and 800 iterations, which
# four experiments measured (3, 3, 5 and 8 seeds): one verdict stands, the largest's.
FL_VS_ALPHA_CE = "FL (gamma 2, alpha 0.25) vs alpha-CE (alpha 0.9), pi 0.01, 800 iterations"


def comparing(comparison: str, judge: Judge) -> Judge:
    """judge, marked as a check of `comparison` (see FindingVerdict.comparison)."""
    judge.comparison = comparison  # type: ignore[attr-defined]
    return judge


def _focal_beats_alpha_ce(r: Reports) -> tuple[str, bool | None, Basis]:
    fl = r.cell("gamma-sweep", {**FOCAL, "loss.gamma": 2.0, "loss.alpha": 0.25})
    best = r.best("alpha-ce")
    return (*_focal_leads_by_two(fl, best), Basis(min(fl.n, best.n), "gamma-sweep"))


def _gamma_peak(r: Reports) -> tuple[str, bool | None]:
    ends = [r.cell("gamma-sweep", {"loss.gamma": g}) for g in (0.0, 5.0)]
    at = {float(c.row["loss.gamma"]): c for c in r.cells("gamma-sweep")}
    peak = max(at, key=lambda g: at[g].mean)
    curve = ", ".join(f"{g:g}: {at[g].mean:.1f}" for g in sorted(at))
    holds = 1.0 <= peak <= 2.0 and all(end.mean < at[peak].mean for end in ends)
    return f"peak at gamma {peak:g}; AP by gamma {curve}", holds


def _focal_beats_ohem(r: Reports) -> tuple[str, bool | None]:
    fl = r.cell("ohem-vs-focal", FOCAL)
    best = r.best("ohem-vs-focal", {"loss.cls": "ohem"})
    gap = fl.mean - best.mean
    return f"FL {fl.text()}; OHEM {best.text()}; {gap:+.1f}", gap >= 2.0


def _anchors_3x3(r: Reports) -> tuple[str, bool | None]:
    nine = r.cell("anchors", {"model.num_scales": 3, "model.aspect_ratios": [0.5, 1.0, 2.0]})
    one = r.cell("anchors", {"model.num_scales": 1, "model.aspect_ratios": [1.0]})
    gap = nine.mean - one.mean
    return f"{nine.text()}; {one.text()}; {gap:+.1f}", gap >= 2.0


Judge = Callable[[Reports], tuple[str, bool | None]]

# (finding with its pass rule, the paper's numbers, judge)
CHECKS: tuple[tuple[str, str, Judge], ...] = (
    ("Prior: CE without the prior (bias 0) diverges or collapses (AP < 1)", "CE diverges", _prior_collapse),
    ("Prior: with pi = 0.01 both CE and FL train (every seed finishes, AP > 5)", "CE 30.2, FL 34.0", _prior_trains),
    ("1a: the best alpha of alpha-CE lies in [0.5, 0.9]", "best alpha 0.75 (31.1)", _alpha_best),
    ("1a: alpha = 0.25 is clearly worse than the best alpha (disjoint CIs)", "10.8 vs 31.1", _alpha_quarter_worse),
    ("1b: FL (gamma 2, alpha 0.25) beats the best alpha-CE by >= 2 AP, CIs disjoint", "34.0 vs 31.1 (+2.9)",
     comparing(FL_VS_ALPHA_CE, _focal_beats_alpha_ce)),
    ("1b: AP rises from gamma 0 to a peak at gamma in [1, 2] and falls at gamma 5",
     "31.1 at 0, peak 34.0 at 2, 32.2 at 5", _gamma_peak),
    ("1d: FL beats the best OHEM variant by >= 2 AP", "36.0 vs 32.8 (+3.2, ResNet-101)", _focal_beats_ohem),
    ("1c: 3 scales x 3 ratios beat 1 x 1 by >= 2 AP", "34.0 vs 30.3 (+3.7)", _anchors_3x3),
)


# ----------------------------------------------------------------------------- follow-ups
# Hypotheses for why a finding above fails here, each tested by its own experiment, with its rule
# written down before the runs finished.


def _ce_prior_is_slow(r: Reports) -> tuple[str, bool | None]:
    def at(loss: Values, iterations: int) -> CellStats:
        # 800 iterations (the tiny schedule) is prior-init's cell; the longer ones are prior-schedule's.
        values = {**loss, "model.prior": 0.01, "train.iterations": iterations}
        return r.cell("prior-init" if iterations == 800 else "prior-schedule", values)

    ce, fl = [at(CE, n) for n in (800, 1600, 3200)], [at(FOCAL, n) for n in (800, 1600, 3200)]
    every_seed = every_seed_finished(ce[-1])
    curve = "; ".join(f"{n} it: CE {c.mean:.1f} ± {c.std:.1f}, FL {f.mean:.1f} ± {f.std:.1f} (n={c.n}/{f.n})"
                      for n, c, f in zip((800, 1600, 3200), ce, fl))
    return curve, every_seed and ce[0].mean < ce[1].mean < ce[2].mean and ce[2].mean > 5.0


def _focal_lead_needs_seeds(r: Reports) -> tuple[str, bool | None, Basis]:
    fl = r.cell("focal-vs-alpha-ce", {**FOCAL, "loss.gamma": 2.0, "loss.alpha": 0.25})
    ce = r.cell("focal-vs-alpha-ce", {**ALPHA_CE, "loss.alpha": 0.9})
    ours, holds = _focal_leads_by_two(fl, ce)
    # The hypothesis is about 5 seeds: fewer (e.g. a run with `--seeds 3`) do not test it.
    return ours, holds if min(fl.n, ce.n) >= 5 else None, Basis(min(fl.n, ce.n), "focal-vs-alpha-ce")


UNTIL_SETTLED = "until-settled/focal-vs-alpha-ce"


def _focal_lead_until_settled(r: Reports) -> tuple[str, bool | None, Basis]:
    """The 1b rule on the until-settled run of the same comparison (up to 8 seeds), with the
    sequential rule's recorded verdict beside it."""
    fl = r.cell(UNTIL_SETTLED, {**FOCAL, "loss.gamma": 2.0, "loss.alpha": 0.25})
    ce = r.cell(UNTIL_SETTLED, {**ALPHA_CE, "loss.alpha": 0.9})
    ours, holds = _focal_leads_by_two(fl, ce)
    sequential = r.root / UNTIL_SETTLED / "sequential.csv"
    if sequential.is_file():
        row = pd.read_csv(sequential).iloc[0]
        ours += f"; sequential rule: {row['verdict']} at {int(row['n'])} seeds"
    return ours, holds, Basis(min(fl.n, ce.n), UNTIL_SETTLED)


def _budget_focal_beats(loss: Values, label: str) -> Judge:
    """budget-curves (3 seeds per budget): FL (gamma 2, alpha 0.25) beats `loss` at pi = 0.01 by the
    1b rule. Judged on its x1 report, and by `ablate findings` at every budget it was run at."""
    def judge(r: Reports) -> tuple[str, bool | None, Basis]:
        fl = r.cell("budget-curves", {**FOCAL, "loss.gamma": 2.0, "loss.alpha": 0.25, "model.prior": 0.01})
        other = r.cell("budget-curves", {**loss, "model.prior": 0.01})
        return (*_focal_leads_by_two(fl, other, label), Basis(min(fl.n, other.n), "budget-curves"))
    return judge


# (hypothesis with its pass rule, the finding it would explain, judge)
FOLLOW_UPS: tuple[tuple[str, str, Judge], ...] = (
    ("CE at pi = 0.01 is only slow: its AP rises with the schedule (800 < 1600 < 3200 iterations) "
     "and is above 5 at 3200, every seed finishing", "Prior: with pi = 0.01 both CE and FL train", _ce_prior_is_slow),
    ("FL's lead over the best alpha-CE (alpha 0.9) is real, 3 seeds were too few to show it: with 5 seeds "
     "it is >= 2 AP and the CIs are disjoint", "1b: FL beats the best alpha-CE, CIs disjoint",
     comparing(FL_VS_ALPHA_CE, _focal_lead_needs_seeds)),
    # budget-curves: fixed (with experiments/budget-curves.toml) before its runs. Expected: yes at
    # x1, no at x4 (prior-schedule had CE ahead at 3200 iterations); the alpha-CE one is open.
    ("Budget curves, pi = 0.01, 3 seeds per budget: FL (gamma 2, alpha 0.25) beats CE by >= 2 AP, CIs disjoint",
     "Prior: with pi = 0.01 both CE and FL train", _budget_focal_beats(CE, "CE")),
    ("Budget curves, pi = 0.01, 3 seeds per budget: FL (gamma 2, alpha 0.25) beats alpha-CE (alpha 0.9) by >= 2 AP, "
     "CIs disjoint", "1b: FL beats the best alpha-CE, CIs disjoint",
     comparing(FL_VS_ALPHA_CE, _budget_focal_beats({**ALPHA_CE, "loss.alpha": 0.9}, "alpha-CE"))),
    # Added after its runs (issue 22) to put the 8-seed run into the findings: the 1b rule, unchanged.
    ("FL's lead over alpha-CE (alpha 0.9) over up to 8 seeds (`--until-settled`; entered after its runs, the 1b "
     "rule unchanged): >= 2 AP, CIs disjoint",
     "1b: FL beats the best alpha-CE, CIs disjoint", comparing(FL_VS_ALPHA_CE, _focal_lead_until_settled)),
)


def judge_reports(reports_dir: Path, checks: tuple[tuple[str, str, Judge], ...] = CHECKS) -> list[FindingVerdict]:
    """Every check (CHECKS, or FOLLOW_UPS) over reports_dir; one whose report or cell is missing
    is 'not measured'."""
    reports = Reports(reports_dir)
    verdicts = []
    for finding, paper, judge in checks:
        basis = Basis(0, "")
        try:
            ours, holds, *rest = judge(reports)
            basis = rest[0] if rest else basis
        except KeyError as e:
            ours, holds = f"not measured: no {e.args[0]}", None
        verdicts.append(FindingVerdict(finding, paper, ours, holds, getattr(judge, "comparison", ""), basis.seeds,
                                basis.report))
    return verdicts


def supersede(verdicts: list[FindingVerdict]) -> list[FindingVerdict]:
    """One verdict per comparison: among the measured verdicts sharing a comparison id, the one on
    the most seeds (the later in `verdicts` on a tie) stands and the others are superseded by it.
    Sets superseded_by / supersedes in place; returns the verdicts that stand."""
    groups: dict[str, list[FindingVerdict]] = {}
    for v in verdicts:
        if v.comparison and v.holds is not None:
            groups.setdefault(v.comparison, []).append(v)
    for group in groups.values():
        current = max(reversed(group), key=lambda v: v.seeds)  # max keeps the first maximum: the later one
        current.supersedes = [v for v in group if v is not current]
        for v in current.supersedes:
            v.superseded_by = current
    return [v for v in verdicts if v.superseded_by is None]


def _mark(holds: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[holds]


def _link(v: FindingVerdict, prefix: str) -> str:
    return f"{v.seeds} seeds, [{v.report}]({prefix}{v.report}/README.md)"


def holds_text(v: FindingVerdict, prefix: str = "") -> str:
    """The holds column: yes / **no** / not measured, or "superseded by ... (was yes)", or the
    standing verdict with the ones it supersedes linked."""
    if v.superseded_by is not None:
        return f"superseded by {_link(v.superseded_by, prefix)} (was {_mark(v.holds).strip('*')})"
    if v.supersedes:
        earlier = "; ".join(f"{_link(o, prefix)}: {_mark(o.holds).strip('*')}" for o in v.supersedes)
        return f"{_mark(v.holds)} ({_link(v, prefix)}; supersedes {earlier})"
    return _mark(v.holds)


# ----------------------------------------------------------------------------- across budgets
# `ablate run NAME --budgets 1,2,4` + `ablate report NAME` write reports/NAME/budgets/xM/results.csv
# in results.csv's format: each check is judged on them as on the reports, budget by budget.


class BudgetReports(Reports):
    """The reports as measured at one budget multiple (reports/NAME/budgets/xM/results.csv)."""

    def __init__(self, root: Path, budget: float):
        super().__init__(root)
        self.budget = budget

    def path(self, experiment: str) -> Path:
        return self.root / experiment / "budgets" / budget_label(self.budget) / "results.csv"


def measured_budgets(reports_dir: Path) -> list[float]:
    """Every budget multiple some report was measured at, ascending."""
    found = {float(path.parent.name[1:]) for path in Path(reports_dir).glob("*/budgets/x*/results.csv")}
    return sorted(found)


def across_budgets(reports_dir: Path, checks: tuple[tuple[str, str, Judge], ...] = CHECKS) -> list[AcrossBudgets]:
    """Per check, whether it holds at every budget measured (not measured where its reports lack one)."""
    budgets = {b: BudgetReports(reports_dir, b) for b in measured_budgets(reports_dir)}
    return [holds_at_every_budget(lambda reports, judge=judge: judge(reports)[1], budgets) for _, _, judge in checks]


# The Table 1 family in the order of the headline table: (report, the paper's sub-table it matches).
HEADLINE = (("alpha-ce", "1a"), ("gamma-sweep", "1b"), ("anchors", "1c"), ("ohem-vs-focal", "1d"),
            ("prior-init", "pi"), ("prior-schedule", "pi, longer"),
            ("focal-vs-alpha-ce", "1b, 5 seeds"))


def headline_markdown(reports_dir: Path, link_prefix: str = "") -> str:
    """Every cell of the Table 1 family's reports beside the paper's AP: one Markdown table whose
    cells link to link_prefix + NAME/README.md."""
    lines = ["| table | cell | AP (mean ± std) | AP50 | AP75 | seeds | paper AP |", "|:---|:---|---:|---:|---:|---:|---:|"]
    for experiment, label in HEADLINE:
        path = Path(reports_dir) / experiment / "results.csv"
        if not path.is_file():
            lines.append(f"| {label} | not measured: no {experiment} report | | | | | |")
            continue
        for _, row in pd.read_csv(path).iterrows():
            n = int(row["n"])
            paper = f"{100 * row['paper_AP']:.1f}" if pd.notna(row.get("paper_AP")) else "—"
            lines.append(f"| {label} | [{row['cell']}]({link_prefix}{experiment}/README.md) | "
                         f"{mean_std_text(row, 'AP')} | {mean_std_text(row, 'AP50')} | {mean_std_text(row, 'AP75')} | "
                         f"{n}/{int(row['n_runs'])} | {paper} |")
    return "\n".join(lines) + "\n"


FINDING_HEADER = "| finding (pass rule) | paper | ours: AP mean [95% CI] (seeds) | holds |"
FOLLOW_UP_HEADER = "| hypothesis (pass rule) | for the failing finding | ours | holds |"


def markdown(verdicts: list[FindingVerdict], header: str = FINDING_HEADER, across: list[AcrossBudgets] | None = None,
             link_prefix: str = "") -> str:
    """The verdicts as a Markdown table; with `across`, a column for whether each holds at every budget."""
    lines = [header + (" at every budget |" if across else ""), "|:---|:---|:---|:---|" + (":---|" if across else "")]
    for i, v in enumerate(verdicts):
        mark = holds_text(v, link_prefix)
        budgets = f" {across[i].text()} |" if across else ""
        lines.append(f"| {v.finding} | {v.paper} | {v.ours} | {mark} |{budgets}")
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, block: str, source: str) -> str:
    """text with what lies between MARK_START and MARK_END replaced by block."""
    if MARK_START not in text or MARK_END not in text:
        raise AblateError(f"{source}: no '{MARK_START}' ... '{MARK_END}' markers to write the findings between")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    return f"{head}{MARK_START}\n{block}{MARK_END}{tail}"
