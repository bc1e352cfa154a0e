"""The run contract: what a planned run is, how a run can end, and what a finished run returns.

A `PlannedRun` is made once, by the planner, from the experiment file: it carries the resolved,
flattened config of one cell x seed and its hash. Everything downstream (the queue, a worker on
another machine, the tracking store) works from that object and never re-reads the file, which
may have been edited since. A `RunRecord` is a run once it ended: what the trainer hands back (an
`Outcome`, the final metrics, its folder), what the worker adds once it is tracked (the tracking
run id, the files), and what the tracking store gives back to the reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from ablate.config import Config, apply_overrides, config_hash, flatten


class Outcome(StrEnum):
    """How a run ended, or why a queued run was not trained. A str, so that tags, CSV columns,
    DataFrames and the outcome counts `ablate run` prints compare equal to it."""

    FINISHED = "finished"  # trained and evaluated
    DIVERGED = "diverged"  # the loss stopped being finite: a result of the cell, not rerun
    FAILED = "failed"  # crashed (bad data, a bug, out of memory): rerun by the next `ablate run`
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM or a vanished process: rerun
    PRUNED = "pruned"  # a search trial the pruner stopped early
    # No progress for its stall timeout (a stuck kernel, a deadlocked loader, a hung collective):
    # its process was ended and the run goes back to the queue, resumed from its last checkpoint.
    STALLED = "stalled"
    # A queued run no worker trained: another process had finished it or was training it when
    # this worker came to it (the tracking store said so).
    SKIPPED = "skipped (done elsewhere)"
    # A queue entry whose worker process died (it trained nothing more; the run is queued again),
    WORKER_GONE = "worker gone"
    # or that a new `ablate run` replaced (its folder's private queue is planned afresh),
    SUPERSEDED = "superseded"
    # or a search trial pulled but not used: the search had its trials already.
    UNUSED = "unused"
    # A worker process that exited with an error (counted per process, not per run).
    WORKER_CRASHED = "worker crashed"

    @property
    def is_done(self) -> bool:
        """Whether the cell needs no rerun: finished, or diverged (a rerun would only repeat it)."""
        return self in DONE


DONE = frozenset({Outcome.FINISHED, Outcome.DIVERGED})
# The outcomes a tracked run ends with (the others count queue entries and worker processes).
RUN_ENDS = frozenset({Outcome.FINISHED, Outcome.DIVERGED, Outcome.FAILED, Outcome.INTERRUPTED, Outcome.PRUNED,
                      Outcome.STALLED})


@dataclass(frozen=True)
class PlannedRun:
    """One cell x seed of an experiment, resolved when the grid was planned.

    `config` is the flattened config ({'loss.gamma': 2.0, ...}) with every default, preset, file
    key, cell value, override and the seed applied; `config_hash` is its key in every store.
    `overrides` are the command-line overrides (`--data`, `--set`) it was planned with, and
    `values` the cell's own values (what the grid varies, plus the seed). `force`: planned with
    `--force`, so it runs even where the tracking store says the cell is done.
    """

    experiment: str
    cell: str
    cell_index: int
    seed: int
    config: dict[str, Any]
    config_hash: str
    overrides: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    force: bool = False

    @classmethod
    def from_config(cls, experiment: str, cell: str, cell_index: int, cfg: Config,
                    overrides: dict[str, Any], varied: list[str]) -> PlannedRun:
        flat = flatten(cfg)
        return cls(experiment, cell, cell_index, cfg.train.seed, flat, config_hash(cfg), dict(overrides),
                   {"seed": cfg.train.seed, **{k: flat[k] for k in varied}})

    def build_config(self) -> Config:
        """The typed config, validated again (the planned run may come from another machine)."""
        return apply_overrides(Config(), self.config, f"planned run {self.name!r}")

    @property
    def name(self) -> str:
        """'focal g=2 a=0.25 s0': the cell, led by its loss when the cell's name does not say it."""
        loss = self.config.get("loss.cls", "")
        prefix = "" if self.cell.split(" ")[0] in (loss, "ohem") else f"{loss} "
        return f"{prefix}{self.cell} s{self.seed}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PlannedRun:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"planned run: unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class RunRecord:
    """One run that ended: how (`outcome`), its final metrics (COCO ones as fractions in [0, 1])
    and where its files are. The one shape of a run after training, filled in three places:

    - the runner (ablate.runner) writes the training side and returns it (also as summary.json);
    - the worker that tracked the run adds its tracking `run_id`, the `artifacts` of its folder,
      and for a failure the `error` line and `retry` (a failure another attempt may not meet: a
      rank of the run died, so it goes back to the queue at once, to resume from its checkpoint);
    - `Tracker.load_runs` reads it back from the tracking store, with the identity of its cell
      (`cell`, `seed`, ...), the config it was trained with (`params`) and every metric logged.

    `runs_frame` makes the table the reports and the results selection read, one row per record.
    """

    outcome: Outcome
    metrics: dict[str, float] = field(default_factory=dict)
    # What training says of itself (ablate.runner).
    iterations: int = 0
    train_seconds: float | None = None
    diverged_at: int | None = None
    resumed_from: int | None = None  # the iteration its resume checkpoint held
    processes: int = 1  # processes that trained it together (DDP)
    rank: int = 0  # the process that returned it: only rank 0 reports a run
    run_dir: str | None = None
    resume_checkpoint: str | None = None  # an interrupted run's, to go on from
    anchors: dict[str, float] = field(default_factory=dict)  # ablate.imbalance.anchor_balance of its train set
    data: dict[str, Any] = field(default_factory=dict)  # its data source and train-split statistics
    phase_seconds: dict[str, float] = field(default_factory=dict)
    eval_seconds: float | None = None
    # What the worker that tracked it adds.
    run_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # file name -> path, and "run_dir"
    error: str | None = None
    retry: bool = False
    # What the tracking store holds besides (Tracker.load_runs).
    experiment: str | None = None
    cell: str | None = None
    cell_index: int = -1
    seed: int = -1
    config_hash: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the flattened config, as logged
    run_name: str | None = None
    status: str | None = None  # MLflow's run status (RUNNING, FINISHED, FAILED, KILLED)
    start_time: int | None = None  # ms since the epoch
    parent_run_id: str | None = None

    @property
    def value(self) -> float | None:
        """The AP of a finished run: what the queue's trial completes with."""
        return self.metrics.get("AP") if self.outcome is Outcome.FINISHED else None

    def summary_json(self) -> dict[str, Any]:
        """What the run folder's summary.json holds: the training side."""
        out: dict[str, Any] = {"status": str(self.outcome), "iterations": self.iterations,
                               "diverged_at": self.diverged_at, "train_seconds": self.train_seconds,
                               "resumed_from": self.resumed_from, "processes": self.processes,
                               "config_hash": self.config_hash, "run_dir": self.run_dir, "data": self.data,
                               "anchors": self.anchors}
        if self.outcome is Outcome.INTERRUPTED:
            out["resume_checkpoint"] = self.resume_checkpoint
        if self.outcome is Outcome.FINISHED:
            out.update(metrics=self.metrics, eval_seconds=self.eval_seconds)
        out["phase_seconds"] = self.phase_seconds
        return out

    def row(self) -> dict[str, Any]:
        """Its row of `runs_frame`: identity and tracking columns, then each param, then each metric."""
        return {"run_id": self.run_id, "run_name": self.run_name, "status": self.status,
                "start_time": self.start_time, "cell": self.cell, "cell_index": self.cell_index, "seed": self.seed,
                "outcome": str(self.outcome), "config_hash": self.config_hash, "run_dir": self.run_dir,
                "parent_run_id": self.parent_run_id, **self.params, **self.metrics}


def runs_frame(records: list[RunRecord]):
    """The runs as a table (pandas), one row per record (RunRecord.row): what `ablate report`,
    `show` and the adaptive seeds select from."""
    import pandas as pd  # only where a table is wanted: workers and the queue never build one

    return pd.DataFrame([record.row() for record in records])
