"""The run contract: what a planned run is, how a run can end, and what a finished run returns.

A `PlannedRun` is made once, by the planner, from the experiment file: it carries the resolved,
flattened config of one cell x seed and its hash. Everything downstream (the queue, a worker on
another machine, the tracking store) works from that object and never re-reads the file, which
may have been edited since. A `RunResult` is what the trainer hands back: an `Outcome`, the final
metrics, the files written and, once tracked, the tracking run id.
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
class RunResult:
    """What one run ended with: its outcome, final metrics (fractions in [0, 1]), the files it wrote
    (name -> path), the tracking run id once tracked, the error line of a failed run, and
    `retry`: a failure that another attempt may not meet (a rank of the run died), so the run
    goes back to the queue at once, to resume from its checkpoint."""

    outcome: Outcome
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    error: str | None = None
    retry: bool = False

    @property
    def value(self) -> float | None:
        """The AP of a finished run: what the queue's trial completes with."""
        return self.metrics.get("AP") if self.outcome is Outcome.FINISHED else None
