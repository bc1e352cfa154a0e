"""The committed reports regenerate: each reports/NAME/runs.csv, read back as tracking gives runs,
and experiments/NAME.toml give table.md, table.tex, results.csv (and runs.csv) byte for byte.

No step metrics travel with a report, so the histories are empty and loss_curves.png is skipped;
the tables do not depend on them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ablate.experiments import load_experiment
from ablate.report import write_report
from ablate.report.build import report_spec
from ablate.runs import Outcome, RunRecord, runs_frame

ROOT = Path(__file__).resolve().parent.parent
REPORTS = sorted(p.parent for p in (ROOT / "reports").glob("**/runs.csv"))
# Tags and run info that tracking.Tracker.load_runs reads as they are (not JSON-parsed params).
INTEGERS = ("cell_index", "seed", "start_time")
STRINGS = ("run_id", "run_name", "status", "cell", "outcome", "config_hash", "run_dir", "parent_run_id")


def _param(text: str) -> Any:
    """A config param as load_runs gives it: JSON-parsed, else the text; an empty CSV field was None."""
    if text == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _metric(text: str) -> float:
    return math.nan if text == "" else float(text)


def load_runs_csv(path: Path) -> pd.DataFrame:
    """runs.csv as the runs frame the report was written from: each row back to the RunRecord
    Tracker.load_runs made of its run (params, the dotted columns, JSON-parsed; metrics floats;
    ids and tags as text), then runs_frame of them, as `ablate report` builds its table."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    records = []
    for row in raw.to_dict("records"):
        known = {column: (int(text) if column in INTEGERS else text or None)
                 for column, text in row.items() if column in INTEGERS + STRINGS}
        record = RunRecord(Outcome(known.pop("outcome")),
                           {column: _metric(text) for column, text in row.items()
                            if column not in known and column != "outcome" and "." not in column},
                           params={column: _param(text) for column, text in row.items() if "." in column}, **known)
        records.append(record)
    frame = runs_frame(records)
    return frame[list(raw.columns)]  # the file's column order


@pytest.mark.parametrize("folder", REPORTS, ids=[str(p.relative_to(ROOT / "reports")) for p in REPORTS])
def test_committed_report_tables_regenerate(folder: Path, tmp_path: Path):
    runs = load_runs_csv(folder / "runs.csv")
    histories = pd.DataFrame(columns=["run_id", "key", "step", "value"])
    spec = report_spec(load_experiment(str(ROOT / "experiments" / f"{folder.name}.toml")))  # until-settled/NAME too
    paths = write_report(runs, histories, spec, tmp_path)
    # runs.csv too: it shows that load_runs_csv gives back the frame the report was written from.
    for key, name in (("table", "table.md"), ("table_tex", "table.tex"), ("results", "results.csv"),
                      ("runs", "runs.csv")):
        assert paths[key].read_text() == (folder / name).read_text(), f"{folder.name}/{name} differs"
    # The README's provenance (with the collapsed-seeds line) is the one the report writes.
    assert _section(paths["readme"].read_text(), "## Provenance") == _section((folder / "README.md").read_text(),
                                                                               "## Provenance")


def _section(text: str, title: str) -> str:
    """From `title` to the next "## " heading (or the end), trailing blank lines dropped."""
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start: len(text) if end < 0 else end].rstrip()


SETTLED = sorted(p.parent for p in (ROOT / "reports").glob("**/sequential.json"))


@pytest.mark.parametrize("folder", SETTLED, ids=[p.name for p in SETTLED])
def test_committed_adaptive_sections_regenerate(folder: Path, tmp_path: Path):
    """sequential.csv / _readings.csv / .json and the README's Adaptive seeds section, from runs.csv
    and the rule recorded in sequential.json (the verdicts re-judged by today's machinery)."""
    from ablate.report.adaptive import write_sequential
    from ablate.sequential import SequentialRule

    record = json.loads((folder / "sequential.json").read_text())
    rule = SequentialRule.from_dict(record["rule"], str(folder / "sequential.json"))
    paths, text = write_sequential(rule, [tuple(c) for c in record["comparisons"]],
                                   load_runs_csv(folder / "runs.csv"), tmp_path)
    for path in paths.values():
        assert path.read_text() == (folder / path.name).read_text(), f"{folder.name}/{path.name} differs"
    assert _section((folder / "README.md").read_text(), "## Adaptive seeds") == text.rstrip()


def test_every_committed_report_is_checked():
    assert len(REPORTS) >= 7
