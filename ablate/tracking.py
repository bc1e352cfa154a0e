"""Everything MLflow: the only module that imports it.

Layout of the records: one MLflow experiment per ablation; one parent run per `ablate run` (or
`ablate search`); one child run per cell x seed, named like "focal g=2 a=0.25 s0", holding the
full flattened config as params, tags (cell, seed, config hash, git commit, command line, outcome,
the process that owns it), step metrics sent in batches, the final COCO metrics and the run
folder's files as artifacts.

The tracking store is the one source of truth for "this cell is done": a child run with the cell's
config hash whose outcome is finished or diverged. Every process that shares the store (another
working folder, another machine) gets the same answer, and a worker *claims* a run here before
training it (`Tracker.claim`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.entities import Metric, Param, RunTag

from ablate.errors import AblateError, mask_url, mask_urls
from ablate.paths import check_writable_folder
from ablate import lease
from ablate.lease import process_owner
from ablate.runs import DONE, Outcome, PlannedRun, RunRecord

# MLflow announces its schema migrations at INFO level on every fresh store: keep the terminal for
# the progress bars.
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# With an http tracking URI MLflow writes "View run ... at: URL" to stdout whenever a run ends, the
# URI's password included: our own lines name the runs, with the password masked.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _mask_credentials_in_records() -> None:
    """Mask the password of every URL in the log records of MLflow and the HTTP and database
    stacks under it (retry warnings quote the request's URL). A record factory rather than logger
    filters: a filter on "urllib3" would miss the records of "urllib3.connectionpool"."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "masks_credentials", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.name.split(".")[0] in ("mlflow", "urllib3", "requests", "alembic", "sqlalchemy"):
            record.msg, record.args = mask_urls(record.getMessage()), None
        return record

    factory.masks_credentials = True
    logging.setLogRecordFactory(factory)


_mask_credentials_in_records()

TAG = "ablate."  # prefix of our tags
ABLATED = "ablated."  # prefix of the tags that show a child run's cell values (what the grid varies)
# MLflow 3.17's UI picks its GenAI or model-training pages from the browser's own switch (the URL's
# workflowType, else the sidebar's last choice kept in the browser's localStorage); this tag,
# which older UIs read, files the experiment under model training for them and for search.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# A saved view of the Runs table, kept as an experiment tag that the URL names
# (viewStateShareKey) and that the Runs tab's "Saved views" menu lists by its name: the runs
# grouped by cell, each group's average and each seed's AP, AP50, AP75 (percent) and outcome as
# columns, then the ablated keys. Without it the table shows no metric at all.
RUNS_VIEW_KEY = "ablate"
RUNS_VIEW_NAME = "ablate: cells (AP %)"
VIEW_PREFIX = "mlflow.sharedViewState."
NOTE = "mlflow.note.content"  # the description the UI renders as Markdown on a run's or experiment's page
# COCO metrics: fractions in the project, percent in MLflow (like the paper and the reports), where
# a run says so with AP_UNIT; -1 ("no ground truth in that area range") is not logged at all.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
AP_UNIT = (f"{TAG}ap_unit", "percent")
PERCENT_DECIMALS = 4  # 1e-6 of a fraction: far below what COCO's 101-point interpolation resolves
PARENT_ROLE = "grid"  # the `ablate.role` tag of an `ablate run`'s parent run
STEP_METRICS = ("loss", "loss_cls", "loss_box_reg", "lr", "num_fg", "num_bg", "num_ignored", "img_per_s",
                "data_fraction")
# How long a process that takes over an interrupted run waits before checking that it is still the
# owner (two takeovers at once: the later writer keeps the run).
TAKEOVER_SETTLE_SECONDS = 1.0

# The MLflow run status each outcome closes a run with; the outcome tag tells FAILED ones apart.
RUN_STATUS = {Outcome.FINISHED: "FINISHED", Outcome.DIVERGED: "FAILED", Outcome.FAILED: "FAILED",
              Outcome.INTERRUPTED: "KILLED", Outcome.PRUNED: "KILLED", Outcome.STALLED: "KILLED"}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite file in the working folder (never the implicit
    default, which an existing ./mlruns folder can silently switch to the old file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def init_store(uri: str | None = None) -> str:
    """Check the store and create (migrate) it once, before any parallel worker opens it: several
    processes creating a fresh sqlite store at once race on its schema migration.

    An MLflow server is asked once with a short budget (MLflow's own client retries for minutes):
    unreachable, or a store that refuses us, is one line naming the URI with its password masked.
    """
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_creation_lock(uri):
        _check_store(uri)
    return uri


@contextlib.contextmanager
def _store_creation_lock(uri: str):
    """Serialise the first opening of a local sqlite store across processes (two `ablate run`
    started at once in a fresh folder both ran MLflow's schema migration and one failed): the
    second waits on a lock file beside the database until the first has created it."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    check_writable_folder(path.parent, f"tracking store {uri}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, None for any other store."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) and len(uri) > len(prefix) else None


def _check_store(uri: str) -> None:
    """Open (and on first use create) the store once, with a short budget for a server; a local
    store's artifact folder must be writable too, or every run would fail only after training."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    if uri.startswith(("http://", "https://")):
        os.environ.update(quick)
    try:
        _check_database(uri)
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # connection refused, timeout, bad credentials, a broken database URL
        raise AblateError(f"tracking store {mask_url(uri)}: unreachable or refused: {_store_error(e)}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not uri.startswith(("http://", "https://")):
        check_writable_folder("mlartifacts", "artifact store")  # where Tracker puts a new experiment's


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def _check_database(uri: str) -> None:
    """A database store is connected to once, with a 10 s timeout, before MLflow opens it: MLflow
    retries a refused connection with a growing back-off (over a minute to a closed port)."""
    scheme = uri.partition("://")[0].partition("+")[0]
    if scheme not in DATABASE_SCHEMES:
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _store_error(error: Exception) -> str:
    """The part of a store's error that says what went wrong: the OS's reason when a connection
    failed ('[Errno 111] Connection refused', buried in urllib3's retry message), else the first
    line; passwords masked."""
    text = str(error)
    refused = re.search(r"\[Errno -?\d+\] [^'\")\n]+", text)
    reason = refused.group(0) if refused else next((line.strip() for line in text.splitlines() if line.strip()),
                                                   type(error).__name__)
    return mask_urls(reason)[:300]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """The command as typed, for the runs' tags; a --storage URL's password masked."""
    return mask_urls(" ".join(["ablate", *sys.argv[1:]]))


def param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)


class Tracker:
    """The MLflow records of one ablation (one MLflow experiment)."""

    def __init__(self, experiment: str, uri: str | None = None):
        self.name = experiment
        self.uri = uri or tracking_uri()
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # A local store keeps artifacts beside it; an MLflow server decides (and proxies) itself,
            # so that workers on other machines upload through it instead of to their own disk.
            local = not self.uri.startswith(("http://", "https://"))
            artifacts = (Path.cwd() / "mlartifacts" / experiment).resolve().as_uri() if local else None
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts,
                                                                   tags=experiment_tags())
            except MlflowException:  # another process created it a moment ago
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found is not None:
            self.experiment_id = found.experiment_id
            tag_for_the_ui(self.client, found)
        self._ablated_shown: tuple[str, ...] | None = None

    def show_ablated(self, keys: list[str]) -> None:
        """Put the ablated keys (the cells' own values) into the Runs table's saved view, after
        the AP columns (once per tracker; the tag is rewritten only when the keys change)."""
        if self._ablated_shown == tuple(keys):
            return
        self._ablated_shown = tuple(keys)
        tag_for_the_ui(self.client, self.client.get_experiment(self.experiment_id), list(keys))

    def describe(self, text: str, report_run_id: str | None = None) -> None:
        """The experiment's description on its UI page: a first line of links (the Runs table in
        ablate's view; the report page once `ablate report` attached one to `report_run_id`), which
        the page's header shows even collapsed and on the GenAI pages, then the experiment file's
        `description`. A report link already there is kept when none is given."""
        old = self.client.get_experiment(self.experiment_id).tags.get(NOTE, "")
        if report_run_id is None:
            found = re.search(r"/runs/(\w+)/artifactPath/report/", old)
            report_run_id = found.group(1) if found else None
        note = experiment_note(self.experiment_id, text, report_run_id)
        if note != old:
            self.client.set_experiment_tag(self.experiment_id, NOTE, note)

    def start_parent(self, name: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            f"{TAG}git_commit": git_commit(), f"{TAG}command": command_line(), **(tags or {})})
        return run.info.run_id

    def is_running(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.status == "RUNNING"
        except Exception:  # deleted, or of another store
            return False

    def grid_parents(self) -> list:
        """The parent runs of `ablate run` (newest first), each with its overrides tag."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG}role` = '{PARENT_ROLE}'",
                                       max_results=10_000, order_by=["attributes.start_time DESC"])

    def override_sets(self) -> list[dict[str, Any]]:
        """The distinct command-line overrides (--data, --set) the experiment's runs were made
        with, newest first: what the child runs and the grids' parent runs remember."""
        texts = [r.data.tags.get(f"{TAG}overrides") for r in self._child_runs() + self.grid_parents()]
        seen: dict[str, dict[str, Any]] = {}
        for text in texts:
            if text is not None:
                overrides = json.loads(text)
                seen.setdefault(json.dumps(overrides, sort_keys=True), overrides)
        return list(seen.values())

    def log_summary(self, run_id: str, metrics: dict[str, float], files: dict[str, str], note: str) -> None:
        """A grid's summary on its parent run: metrics, small text files (name -> content) as
        artifacts under summary/, and `note` as the run's description on its UI page."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])
        for name, text in files.items():
            self.client.log_text(run_id, text, f"summary/{name}")
        self.client.set_tag(run_id, NOTE, note)

    def attach_files(self, run_id: str, paths: list[Path], folder: str) -> None:
        """Files (a report's tables and plots) as artifacts of a run, under `folder`."""
        for path in paths:
            self.client.log_artifact(run_id, str(path), folder)

    def is_active(self, run_id: str) -> bool:
        """Whether the run exists in this store and is not deleted (it can take artifacts and tags)."""
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def end_parent(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a grid's parent run (once: a parent already closed is left as it is)."""
        if self.is_running(run_id):
            self.client.set_terminated(run_id, status=status)

    def patiently(self, call, what: str):
        """`call()`, waiting for a tracking server that went away (tracking.patiently); at once on
        a local store."""
        return patiently(call, self.uri, what) if self.uri.startswith(("http://", "https://")) else call()

    def start_child(self, planned: PlannedRun, parent_id: str) -> ChildRun:
        """A RUNNING child run for `planned`: its config as params, its identity and owner as tags."""
        tags = {"cell": planned.cell, "cell_index": planned.cell_index, "seed": planned.seed,
                "config_hash": planned.config_hash, "overrides": json.dumps(planned.overrides, sort_keys=True),
                "owner": process_owner(), "heartbeat": f"{time.time():.0f}"}
        ablated = {k: v for k, v in planned.values.items() if k != "seed"}
        self.show_ablated(list(ablated))
        run = self.client.create_run(self.experiment_id, run_name=planned.name, tags={
            "mlflow.parentRunId": parent_id, f"{TAG}git_commit": git_commit(), f"{TAG}command": command_line(),
            AP_UNIT[0]: AP_UNIT[1], NOTE: child_note(self.experiment_id, planned.cell, planned.seed, ablated),
            **{f"{TAG}{k}": str(v) for k, v in tags.items()},
            **{f"{ABLATED}{k}": param_value(v) for k, v in ablated.items()}})
        child = ChildRun(self.client, run.info.run_id, tags["owner"], self.uri)
        items = [Param(k, param_value(v)) for k, v in planned.config.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(child.run_id, params=items[i:i + 100])
        return child

    def claim(self, planned: PlannedRun, parent_id: str, resume_run_id: str | None = None) -> ChildRun | None:
        """Start `planned`'s child run unless the store says it is done or owned by a live process.

        `resume_run_id` names the run of an interrupted attempt whose checkpoint the caller will
        resume: that run is taken over (same run id, its step metrics continue) instead of a new one
        started. Two processes that claim the same run at once both write their claim and then look
        again: the older claim (start time, then run id) wins and the other withdraws its own.
        Returns the child run, or None when the run belongs to someone else.
        """
        if self._rivals(planned.config_hash):
            return None
        if resume_run_id:
            taken = self._take_over(resume_run_id, planned.config_hash)
            if taken is not False:
                return taken
        child = self.start_child(planned, parent_id)
        rivals = self._rivals(planned.config_hash)
        first = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id))
        if first.info.run_id != child.run_id:
            child.release()
            self.client.delete_run(child.run_id)
            return None
        self._retire_stale(planned.config_hash, child)
        return child

    def _retire_stale(self, config_hash: str, winner: ChildRun) -> None:
        """Close the cell's RUNNING runs whose owner is gone or silent, and make them the winner's:
        a stopped worker that wakes up finds its run taken and records nothing."""
        for run in self._runs_of(config_hash):
            if run.info.run_id != winner.run_id and run.info.status == "RUNNING" and not run_owner_alive(run):
                self._close_interrupted(run.info.run_id, {"owner": winner.owner, "superseded_by": winner.run_id})

    def _close_interrupted(self, run_id: str, tags: dict[str, str] | None = None) -> None:
        """Close a run whose process is gone: KILLED, outcome interrupted (plus `tags`)."""
        tags = {"outcome": str(Outcome.INTERRUPTED), **(tags or {})}
        self.client.log_batch(run_id, tags=[RunTag(f"{TAG}{k}", v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status="KILLED")

    def _runs_of(self, config_hash: str) -> list:
        """Every run of the cell with this config hash."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG}config_hash` = '{config_hash}'",
                                       max_results=1000)

    def _take_over(self, run_id: str, config_hash: str) -> ChildRun | None | bool:
        """Make this process the owner of an interrupted run again; False when there is no such
        run to take (gone, or another cell's), None when another process took it first."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted, or another store: start afresh
            return False
        if run.info.lifecycle_stage != "active" or run.data.tags.get(f"{TAG}config_hash") != config_hash:
            return False
        owner = process_owner()
        self.client.log_batch(run_id, tags=[RunTag(f"{TAG}owner", owner), RunTag(f"{TAG}heartbeat", f"{time.time():.0f}"),
                                            RunTag(f"{TAG}outcome", "resuming")])
        self.client.update_run(run_id, status="RUNNING")
        # A process that took the same run a moment earlier or later has written its owner by
        # now: the last writer keeps it, and the other sees that and backs off.
        time.sleep(TAKEOVER_SETTLE_SECONDS)
        if self.client.get_run(run_id).data.tags.get(f"{TAG}owner") != owner:
            return None
        return ChildRun(self.client, run_id, owner, self.uri)

    def _rivals(self, config_hash: str) -> list:
        """The child runs with this config hash that are done or still owned by a live process."""
        return [r for r in self._runs_of(config_hash) if is_done(r) or r.info.status == "RUNNING" and run_owner_alive(r)]

    def close_orphans(self) -> int:
        """Mark the child runs left RUNNING by a process that is gone as KILLED (outcome
        "interrupted"). Only this machine's processes can be checked; a run owned on another
        machine is left as it is. Returns how many were closed."""
        orphans = [r for r in self._child_runs() if r.info.status == "RUNNING" and not run_owner_alive(r)]
        for run in orphans:
            self._close_interrupted(run.info.run_id)
        return len(orphans)

    def done_runs(self) -> dict[str, str]:
        """{config hash: run id} of the runs that count as done (finished, or diverged)."""
        done = {}
        for run in self._child_runs():
            if is_done(run):
                done.setdefault(run.data.tags.get(f"{TAG}config_hash", ""), run.info.run_id)
        return done

    def _child_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG}cell` != ''",
                                       max_results=50_000, order_by=["attributes.start_time DESC"])

    def load_runs(self) -> list[RunRecord]:
        """Every child run, newest first, as a RunRecord: ids, tags, the typed config params and
        the metrics (runs_frame makes the table)."""
        return [self._record(run) for run in self._child_runs()]

    def _record(self, run) -> RunRecord:
        tags = run.data.tags
        outcome = tags.get(f"{TAG}outcome", "")  # none yet: the run is still going, or was cut off
        return RunRecord(Outcome(outcome) if outcome in set(Outcome) else Outcome.INTERRUPTED,
                         from_mlflow(run.data.metrics, tags.get(AP_UNIT[0])), run_dir=tags.get(f"{TAG}run_dir"),
                         run_id=run.info.run_id, experiment=self.name, cell=tags.get(f"{TAG}cell"),
                         cell_index=int(tags.get(f"{TAG}cell_index", -1)), seed=int(tags.get(f"{TAG}seed", -1)),
                         config_hash=tags.get(f"{TAG}config_hash"),
                         params={k: _parse_param(v) for k, v in run.data.params.items()}, run_name=run.info.run_name,
                         status=run.info.status, start_time=run.info.start_time,
                         parent_run_id=tags.get("mlflow.parentRunId"))

    def parent_tags(self, key: str) -> list[dict[str, str]]:
        """The tags of this ablation's parent runs (the grids' runs, not the cells') that have tag
        `key`, newest first: what a grid recorded about itself, e.g. the stopping rule of its seeds."""
        parents = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{key}` != ''",
                                          max_results=10_000, order_by=["attributes.start_time DESC"])
        return [dict(run.data.tags) for run in parents if f"{TAG}cell" not in run.data.tags]

    def load_histories(self, run_ids: list[str], keys: tuple[str, ...] = ("loss", "loss_cls", "loss_box_reg")) -> pd.DataFrame:
        rows = [{"run_id": rid, "key": key, "step": m.step, "value": m.value}
                for rid in run_ids for key in keys for m in self.client.get_metric_history(rid, key)]
        return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def runs_view(ablated: list[str] | None = None) -> dict:
    """The Runs table's view state (RUNS_VIEW_KEY): grouped by cell with each group's average,
    AP, AP50, AP75 and the outcome as columns, then the ablated keys' tags."""
    columns = ["metrics.`AP`", "metrics.`AP50`", "metrics.`AP75`", f"tags.`{TAG}outcome`"]
    columns += [f"tags.`{ABLATED}{key}`" for key in ablated or []]
    return {"selectedColumns": columns,
            "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": f"{TAG}cell"}]}}


def saved_view(state: dict, created_ms: int) -> str:
    """A view as the Runs tab's "Saved views" menu keeps it (3.17's envelope: name, times, state
    as JSON text); a share-key URL opens it as well."""
    return json.dumps({"name": RUNS_VIEW_NAME, "createdAt": created_ms, "updatedAt": created_ms,
                       "state": json.dumps(state)})


def view_state(tag_value: str | None) -> dict | None:
    """The state of a saved view's tag (the envelope, or the bare state older ablate wrote)."""
    try:
        value = json.loads(tag_value or "")
        return json.loads(value["state"]) if isinstance(value, dict) and "state" in value else value
    except (json.JSONDecodeError, TypeError):
        return None


def experiment_tags(ablated: list[str] | None = None, created_ms: int | None = None) -> dict[str, str]:
    """The UI's experiment tags: the experiment kind and the Runs table's saved view."""
    created = int(time.time() * 1000) if created_ms is None else created_ms
    return {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1],
            f"{VIEW_PREFIX}{RUNS_VIEW_KEY}": saved_view(runs_view(ablated), created)}


def tag_for_the_ui(client: MlflowClient, experiment, ablated: list[str] | None = None) -> None:
    """Give an experiment the UI's tags (experiment_tags) that it lacks or has in an older form:
    one made before ablate set them, or by another program. `ablated`: the keys its cells vary;
    None keeps the ones the view shows."""
    view_key = f"{VIEW_PREFIX}{RUNS_VIEW_KEY}"
    current = view_state(experiment.tags.get(view_key))
    if ablated is None:
        shown = (current or {}).get("selectedColumns", [])
        ablated = [c[len(f"tags.`{ABLATED}"):-1] for c in shown if c.startswith(f"tags.`{ABLATED}")]
    wanted = experiment_tags(ablated)
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    try:  # the bare state of older ablate versions is rewritten as a saved view
        enveloped = "state" in json.loads(experiment.tags.get(view_key) or "{}")
    except (json.JSONDecodeError, TypeError):
        enveloped = False
    if current != runs_view(ablated) or not enveloped:
        client.set_experiment_tag(experiment.experiment_id, view_key, wanted[view_key])


# ----------------------------------------------------------------------------- pages of the UI
# Links inside the UI's own Markdown (descriptions) are hash routes ("#/experiments/..."), valid
# on any host and port; links for a terminal or a file get a base ("http://127.0.0.1:5000").
ML = "workflowType=machine_learning"  # the model-training pages, which a fresh browser does not open


UI_PORT = 5000  # `ablate ui`'s default port


def ui_base(uri: str) -> str:
    """Where the UI of store `uri` is browsed: an MLflow server's own URL (its credentials left
    out: the links go into files), else `ablate ui` on this machine."""
    if uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(uri)
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return f"http://127.0.0.1:{UI_PORT}"


def runs_route(experiment_id: str) -> str:
    """The Runs table in ablate's saved view."""
    return f"#/experiments/{experiment_id}/runs?{ML}&viewStateShareKey={RUNS_VIEW_KEY}"


def cell_route(experiment_id: str, cell: str) -> str:
    """The Runs table filtered to one cell's runs."""
    search = urllib.parse.quote(f"tags.`{TAG}cell` = '{cell}'", safe="")
    return f"#/experiments/{experiment_id}/runs?{ML}&searchFilter={search}"


def report_route(experiment_id: str, run_id: str, file: str = "report.html") -> str:
    """The artifact viewer on a report file (report/FILE) of a run."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifactPath/report/{file}?{ML}"


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of an experiment's Runs table in ablate's view (or of one of its runs) under
    `base` ("http://127.0.0.1:5000")."""
    if run_id:
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{ML}"
    return f"{base.rstrip('/')}/{runs_route(experiment_id)}"


def experiment_note(experiment_id: str, description: str, report_run_id: str | None = None) -> str:
    """An experiment's description: a line of links first (the header shows it collapsed), then
    the experiment file's description."""
    links = [f"[cells: the Runs table grouped by cell]({runs_route(experiment_id)})"]
    if report_run_id:
        links.insert(0, f"[report page]({report_route(experiment_id, report_run_id)})")
    return f"**Results:** {' · '.join(links)}\n\n{description}".rstrip() + "\n"


def child_note(experiment_id: str, cell: str, seed: int, ablated: dict[str, Any]) -> str:
    """A cell run's description, at the top of its page: the ablated keys' values first."""
    values = ", ".join(f"`{key}` = {param_value(value)}" for key, value in ablated.items())
    return (f"Cell **{cell}**, seed {seed}: {values or 'the base config'}. "
            f"[All runs of this cell]({cell_route(experiment_id, cell)}) · "
            f"[all cells]({runs_route(experiment_id)})\n")


def parent_run_name(experiment: str, kind: str = "") -> str:
    """A grid's parent run name: the experiment (and `kind`, e.g. "search") and its local time."""
    return f"{experiment}{' ' + kind if kind else ''} {time.strftime('%Y-%m-%d %H:%M')}"


def to_mlflow(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics as a run logs them: COCO metrics (and val_ ones) in percent, rounded to
    PERCENT_DECIMALS; COCO's -1 (nothing to measure) left out."""
    out = {}
    for key, value in metrics.items():
        if key.removeprefix("val_") in COCO_METRICS:
            if value < 0:
                continue
            value = round(100.0 * value, PERCENT_DECIMALS)
        out[key] = value
    return out


def from_mlflow(metrics: dict[str, float], unit: str | None) -> dict[str, float]:
    """A run's metrics as the project reads them (COCO ones as fractions): undoes to_mlflow for
    runs tagged AP_UNIT; older runs logged fractions."""
    if unit != AP_UNIT[1]:
        return dict(metrics)
    return {k: v / 100.0 if k.removeprefix("val_") in COCO_METRICS else v for k, v in metrics.items()}


def experiment_links(base: str, name: str | None = None, uri: str | None = None) -> list[tuple[str, str]]:
    """(experiment name, Runs table URL) of ablation `name`, or of every experiment in the store
    but MLflow's empty Default; each gets the UI's tags on the way (older ones lack them)."""
    return [(e.name, ui_url(base, e.experiment_id)) for e in ui_experiments(name, uri)]


def ui_experiments(name: str | None = None, uri: str | None = None) -> list:
    """The experiments `ablate ui` lists (see experiment_links), tagged for the UI, by name."""
    uri = uri or tracking_uri()
    client = MlflowClient(uri)
    if name is not None:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise AblateError(f"no experiment '{name}' in the tracking store {mask_url(uri)}: "
                              f"run `ablate run {name}` first")
        experiments = [found]
    else:
        experiments = [e for e in client.search_experiments(max_results=1000) if e.name != "Default"]
    for exp in experiments:
        tag_for_the_ui(client, exp)
    return sorted(experiments, key=lambda e: e.name)


def report_links(base: str, experiment) -> list[tuple[str, str]]:
    """(label, URL) of the report page of an experiment (from its description's link), if any."""
    found = re.search(r"\((#/experiments/\w+/runs/\w+/artifactPath/report/report\.html[^)]*)\)",
                      experiment.tags.get(NOTE, ""))
    return [("report", f"{base.rstrip('/')}/{found.group(1)}")] if found else []


def is_done(run) -> bool:
    """A run that ended with a done outcome (finished, diverged): its cell needs no rerun."""
    return run.data.tags.get(f"{TAG}outcome") in DONE and run.info.status in ("FINISHED", "FAILED")


def run_owner_alive(run) -> bool:
    """Whether the process that owns a RUNNING run is still at work (lease.is_alive on its owner
    and heartbeat tags). A process that stopped, or whose run stopped advancing, misses its beats
    and counts as gone."""
    tags = run.data.tags
    try:
        beat = float(tags[f"{TAG}heartbeat"]) if f"{TAG}heartbeat" in tags else None
    except ValueError:
        return False
    return lease.is_alive(tags.get(f"{TAG}owner"), beat)


def _parse_param(text: str) -> Any:
    """Params come back as strings: numbers, lists and null back to values; other strings stay."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


class LostClaim(Exception):
    """This process was taken for dead (it missed its heartbeats) and another one took its run
    over: whatever it still computes must not be recorded."""


class TrackingUnreachable(AblateError):
    """The tracking server did not answer for `tracking_patience()` seconds: the run is left for
    another attempt (its checkpoint kept, its cell back in the queue)."""


def tracking_patience() -> float:
    """Seconds a worker waits for a tracking server that went away before it leaves the run to
    resume ($ABLATE_TRACKING_PATIENCE, default 300: a server restart or a short network cut costs
    no training)."""
    text = os.environ.get("ABLATE_TRACKING_PATIENCE", "").strip() or "300"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise AblateError(f"ABLATE_TRACKING_PATIENCE: expected seconds >= 0, got {text!r}")
    return value


# A worker's MLflow client asks once or twice and gives up within seconds (MLflow's own default is
# 7 retries with exponential backoff and 120 s timeouts: minutes of silence per call); the retrying
# that matters is ours, per batch and per call, bounded by tracking_patience().
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
RETRY_SECONDS = 2.0  # between two tries of a call or batch the server did not take


def bound_client_retries() -> None:
    """MLflow's client retries bounded as CLIENT_RETRIES says, unless the user set them."""
    for key, value in CLIENT_RETRIES.items():
        os.environ.setdefault(key, value)


def is_unreachable(error: BaseException) -> bool:
    """Whether `error` says the server could not be reached or was unavailable (connection refused,
    timeout, a 5xx), as opposed to an answer that refuses the request."""
    if not isinstance(error, MlflowException):  # artifact uploads raise the HTTP stack's own errors
        import requests

        return isinstance(error, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))
    text = str(error)
    if text.startswith("API request to") and ("failed with exception" in text or "failed with timeout" in text):
        return True
    with contextlib.suppress(Exception):
        return error.get_http_status_code() in (408, 429, 502, 503, 504)  # not 500: also what a bug answers
    return False


def patiently(call, uri: str, what: str, patience: float | None = None):
    """`call()`, tried again every RETRY_SECONDS while the server is unreachable, for at most
    `patience` seconds (default tracking_patience()); then TrackingUnreachable naming `what`."""
    patience = tracking_patience() if patience is None else patience
    start = time.monotonic()
    while True:
        try:
            return call()
        except Exception as e:
            if not is_unreachable(e):
                raise
            waited = time.monotonic() - start
            if waited >= patience:
                raise TrackingUnreachable(f"tracking server {mask_url(uri)} unreachable for {waited:.0f} s "
                                          f"({_store_error(e)}) while {what}") from None
            time.sleep(min(RETRY_SECONDS, max(0.0, patience - waited)))


class Outbox:
    """What a run sends to the tracking store without making training wait: batches of step
    metrics, in order, and the heartbeat, on a thread of its own. A batch the server does not
    take is tried again, with the same timestamps (the store keeps one copy of a metric sent
    twice), until it does; training meanwhile goes on and its metrics wait here."""

    def __init__(self, run: ChildRun):
        self.run = run
        self._pending: deque[list[Metric]] = deque()
        self._beat_wanted = False
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self.unreachable_since: float | None = None
        self._thread = threading.Thread(target=self._work, name="ablate-tracking-outbox", daemon=True)
        self._thread.start()

    def send(self, metrics: list[Metric]) -> None:
        with self._cond:
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics per batch
                self._pending.append(metrics[i:i + 1000])
            self._cond.notify_all()

    def beat(self) -> None:
        with self._cond:
            self._beat_wanted = True
            self._cond.notify_all()

    def drain(self, patience: float) -> bool:
        """Wait until every batch is sent (True), or `patience` seconds (False)."""
        deadline = time.monotonic() + patience
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._beat_wanted or self._closed):
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                beat, self._beat_wanted = self._beat_wanted, False
                batch = self._pending[0] if self._pending else None
                self._busy = True
            ok = self._try(beat, batch)
            with self._cond:
                self._busy = False
                if ok and batch is not None and self._pending and self._pending[0] is batch:
                    self._pending.popleft()
                if self.run.lost:  # the run is another process's now: nothing more goes out from here
                    self._pending.clear()
                self._cond.notify_all()
            if not ok:
                time.sleep(RETRY_SECONDS)

    def _try(self, beat: bool, batch: list[Metric] | None) -> bool:
        try:
            if beat:
                self.run.check_claim()
                if not self.run.lost:
                    self.run.client.set_tag(self.run.run_id, f"{TAG}heartbeat", f"{time.time():.0f}")
            if batch is not None and not self.run.lost:
                self.run.client.log_batch(self.run.run_id, metrics=batch)
        except Exception:  # unreachable (or refused): kept, and tried again
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
            return False
        self.unreachable_since = None
        return True


class ChildRun:
    """One cell x seed, owned by this process, and its claim in the process's lease.

    Step metrics are buffered and handed to the run's Outbox in batches (a single log_metric costs
    10-20 ms on sqlite; a batch of 1,000 values ~0.2 s), which sends them while training goes on;
    the lease's beats go out the same way. Once the store says the run is another process's,
    every write raises LostClaim. The calls that close the run wait for an unreachable server for
    up to tracking_patience() seconds, then raise TrackingUnreachable."""

    FLUSH_VALUES = 500
    FLUSH_SECONDS = 20.0

    def __init__(self, client: MlflowClient, run_id: str, owner: str, uri: str = "", holder: lease.Lease = lease.LEASE):
        self.client, self.run_id, self.owner, self.uri = client, run_id, owner, uri
        self.lost = False
        # With resumable checkpoints, step metrics go out only when a checkpoint is written, so
        # that a resumed run never logs a step twice (see flush_on_checkpoint).
        self.flush_on_checkpoint = False
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._outbox = Outbox(self)
        self._lease = holder
        holder.add(self)

    # ------------------------------------------------------------------ the lease's claim

    def renew(self) -> None:
        self._outbox.beat()

    def give_back_stalled(self, idle: float) -> None:
        """Close the run KILLED with outcome `stalled`, its metrics so far sent, unless another
        process owns it by now; the next worker takes it over from its checkpoint."""
        self._outbox.drain(patience=min(10.0, tracking_patience()))
        self.check_claim()
        if self.lost:
            return
        self.client.log_batch(self.run_id, tags=[RunTag(f"{TAG}outcome", str(Outcome.STALLED)),
                                                 RunTag(f"{TAG}stalled_after_seconds", f"{idle:.0f}")])
        self.client.set_terminated(self.run_id, status=RUN_STATUS[Outcome.STALLED])
        self.lost = True  # nothing more from this process

    # ------------------------------------------------------------------ writes

    def _patiently(self, call, what: str):
        if not self.uri.startswith(("http://", "https://")):
            return call()
        return patiently(call, self.uri, what)

    def check_claim(self) -> None:
        """Ask the store whether the run is still this process's; remember when it is not."""
        if self.client.get_run(self.run_id).data.tags.get(f"{TAG}owner") != self.owner:
            self.lost = True

    def _guard(self) -> None:
        if self.lost:
            self.release()
            raise LostClaim(f"run {self.run_id} was taken over by another worker")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._guard()
        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(metrics[k]), now, step) for k in STEP_METRICS if k in metrics]
        due = len(self._buffer) >= self.FLUSH_VALUES or time.monotonic() - self._last_flush > self.FLUSH_SECONDS
        if due and not self.flush_on_checkpoint:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered step metrics to the outbox (returns at once)."""
        self._guard()
        self._outbox.send(self._buffer)
        self._buffer = []
        self._last_flush = time.monotonic()

    def log_missing_steps(self, lines: list[dict[str, float]]) -> None:
        """Send the step metrics of `lines` (metrics.jsonl's, each with its `iteration`) that the
        store lacks, by step: what a killed attempt had not sent yet arrives once, and nothing
        arrives twice."""
        have = {key: {m.step for m in self._patiently(lambda key=key: self.client.get_metric_history(self.run_id, key),
                                                       "reading the run's metrics")}
                for key in STEP_METRICS}
        now = int(time.time() * 1000)
        missing = [Metric(k, float(line[k]), now, int(line["iteration"])) for line in lines for k in STEP_METRICS
                   if k in line and int(line["iteration"]) not in have[k]]
        for i in range(0, len(missing), 1000):
            self._patiently(lambda i=i: self.client.log_batch(self.run_id, metrics=missing[i:i + 1000]),
                            "sending the run's metrics")

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Final or evaluation metrics, COCO ones as fractions (logged in percent: to_mlflow)."""
        self._guard()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in to_mlflow(metrics).items()]
        self._patiently(lambda: self.client.log_batch(self.run_id, metrics=batch), "sending the run's metrics")

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._guard()
        items = [RunTag(f"{TAG}{k}", str(v)) for k, v in tags.items()]
        self._patiently(lambda: self.client.log_batch(self.run_id, tags=items), "tagging the run")

    def log_artifacts(self, folder: Path) -> None:
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith("checkpoint")]
        for path in files:
            self._patiently(lambda path=path: self.client.log_artifact(self.run_id, str(path)), "uploading its files")

    def end(self, outcome: Outcome, history: list[dict[str, float]] | None = None) -> None:
        """Close the run: FINISHED for a finished cell, FAILED for diverged or crashed, KILLED for
        an interruption or a search trial the pruner stopped; the `outcome` tag tells them apart.
        `history` (metrics.jsonl's lines): step metrics the store must hold, sent where missing.
        Raises LostClaim, recording nothing, when another process owns the run by now, and
        TrackingUnreachable when the server stays away for tracking_patience() seconds."""
        try:
            self._patiently(self.check_claim, "closing the run")
            self.flush()
            if not self._outbox.drain(tracking_patience()):
                raise TrackingUnreachable(f"tracking server {mask_url(self.uri)} unreachable for "
                                          f"{tracking_patience():.0f} s while sending the run's metrics")
            if history:
                self.log_missing_steps(history)
            self.set_tags({"outcome": str(outcome)})
            self._patiently(lambda: self.client.set_terminated(self.run_id, status=RUN_STATUS[Outcome(outcome)]),
                            "closing the run")
        finally:
            self.release()

    def release(self) -> None:
        """Give the run's claim up without closing the run (its claim was lost, or it is left for a
        resume): no more beats from this process."""
        self._lease.remove(self)
        self._outbox.close()
