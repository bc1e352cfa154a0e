"""The run contract: what a planned run is, how a run can end, and what a finished run returns.

A `PlannedRun` is made once, by the planner, from the experiment file: it carries the resolved,
flattened config of one cell x seed and its hash. Everything downstream (the queue, a worker on
another machine, the tracking store) works from that object and never re-reads the file, which
may have been edited since. A `RunResult` is what the trainer hands back: an `Outcome`, the final
metrics, the files written and, once tracked, the tracking run id.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a run ended. A str, so that tags, CSV columns and DataFrames compare equal to it."""

    FINISHED = "finished"  # trained and evaluated
    DIVERGED = "diverged"  # the loss stopped being finite: a result of the cell, not rerun
    FAILED = "failed"  # crashed (bad data, a bug, out of memory): rerun by the next `ablate run`
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM or a vanished process: rerun
    PRUNED = "pruned"  # a search trial the pruner stopped early

    @property
    def is_done(self) -> bool:
        """Whether the cell needs no rerun: finished, or diverged (a rerun would only repeat it)."""
        return self in DONE


DONE = frozenset({Outcome.FINISHED, Outcome.DIVERGED})
