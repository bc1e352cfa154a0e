"""What `ablate train` says of its run and exits with (ablate.console)."""

from __future__ import annotations

import pytest
import typer

from ablate import console as terminal
from ablate.errors import AblateError
from ablate.runs import Outcome, RunRecord


@pytest.fixture
def printed(monkeypatch):
    lines = []
    monkeypatch.setattr(terminal.console, "print", lambda text, **kwargs: lines.append(str(text)))
    return lines


def test_metrics_text_is_percent_with_one_decimal_and_n_a_for_coco_s_minus_one():
    metrics = {"AP": 0.3124, "AP50": 0.5, "AP75": 0.25, "APs": -1.0, "APm": 0.1, "APl": 0.0, "AR100": 0.6666}
    assert terminal.metrics_text(metrics) == "AP 31.2  AP50 50.0  AP75 25.0  APs n/a  APm 10.0  APl 0.0  AR100 66.7"


def test_print_run_says_how_the_run_ended_and_returns_its_exit_code(printed):
    metrics = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"), 0.5)
    finished = RunRecord(Outcome.FINISHED, metrics, iterations=12, train_seconds=3.4, run_dir="runs/a")
    assert terminal.print_run(finished, resumable=False) == 0
    assert printed[0].startswith("[green]finished[/green] 12 iterations in 3 s: AP 50.0") and printed[1] == "run folder: runs/a"
    printed.clear()
    stopped = RunRecord(Outcome.INTERRUPTED, iterations=4, run_dir="runs/b", resume_checkpoint="ck/resume.pt")
    assert terminal.print_run(stopped, resumable=True) == 130
    assert "interrupted at iteration 4: resume checkpoint ck/resume.pt" in printed[0]
    printed.clear()
    assert terminal.print_run(RunRecord(Outcome.INTERRUPTED, iterations=4, run_dir="r"), resumable=False) == 130
    assert "no resume checkpoint (--checkpoint-every N writes one)" in printed[0]
    printed.clear()
    assert terminal.print_run(RunRecord(Outcome.DIVERGED, iterations=9, diverged_at=7, run_dir="r"), False) == 3
    assert "diverged[/red] at iteration 7" in printed[0]


def test_only_rank_zero_speaks(printed):
    assert terminal.print_run(RunRecord(Outcome.FINISHED, iterations=3, rank=1), resumable=False) == 0
    assert terminal.print_run(RunRecord(Outcome.INTERRUPTED, rank=2), resumable=True) == 130
    assert printed == []


def test_friendly_errors_turn_a_user_error_into_one_line_and_exit_1(printed):
    @terminal.friendly_errors
    def command():
        raise AblateError("experiments/x.toml: 'loss.gamma'\nmust be a number; see postgresql://u:secret@h/db")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 1
    assert len(printed) == 1 and "\n" not in printed[0] and "secret" not in printed[0]
