"""`ablate run` / `search` end to end, read back with the MLflow client and Optuna.

Each test works in its own folder (mlflow.db, mlartifacts/, .ablate/, runs/ land there).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

import cli_zygote

from ablate.config import Config, flatten
from ablate.runs import PlannedRun
from ablate.scheduling import PLANNED_ATTR
from ablate.grid_summary import aligned
from cli import app

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def invoke(*args: str):
    """Run the CLI in this process, with sys.argv as a shell would set it (it is tracked)."""
    saved = sys.argv
    sys.argv = ["ablate", *args]
    try:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        sys.argv = saved


def client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def children(workdir: Path, experiment: str = "smoke") -> list:
    c = client(workdir)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string="tags.`ablate.cell` != ''")


def child_states(db: Path, experiment: str) -> list[str]:
    """The statuses of an experiment's cell runs, read with plain SQL while another process writes
    the store: an MlflowClient here would run the schema migration too, racing the writer's."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            rows = con.execute(
                "SELECT r.status FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                "WHERE e.name = ? AND r.run_uuid IN (SELECT run_uuid FROM tags WHERE key = 'ablate.cell')",
                (experiment,)).fetchall()
    except sqlite3.OperationalError:  # the writer has not created the tables yet
        return []
    return [status for (status,) in rows]


def test_run_creates_the_mlflow_records_and_skips_done_cells(workdir):
    result = invoke("run", "smoke", "--no-progress")
    assert result.exit_code == 0, result.output
    c = client(workdir)
    exp = c.get_experiment_by_name("smoke")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(kids) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {parents[0].info.run_id}
    assert sorted(r.info.run_name for r in kids) == ["alpha_ce s0", "focal s0"]
    for run in kids:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED" and tags["ablate.outcome"] == "finished"
        assert tags["ablate.seed"] == "0" and tags["ablate.cell"] in ("focal", "alpha_ce")
        assert len(tags["ablate.config_hash"]) == 12 and tags["ablate.command"].startswith("ablate run smoke")
        assert "ablate.git_commit" in tags
        assert params["loss.cls"] == tags["ablate.cell"] and params["train.iterations"] == "12"
        assert set(params) == set(flatten(Config()))  # the full flattened config
        assert 0.0 <= run.data.metrics["AP"] <= 100.0 and "AR100" in run.data.metrics  # percent in MLflow
        history = c.get_metric_history(run.info.run_id, "loss_cls")
        assert sorted(m.step for m in history) == [4, 8, 12]
        for key in ("num_fg", "num_bg", "lr", "img_per_s", "loss_box_reg"):
            assert len(c.get_metric_history(run.info.run_id, key)) == 3
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"config.json", "eval.json", "detections.json", "loss_curve.png"} <= artifacts
    # The same command again: every cell is done, no new child run.
    again = invoke("run", "smoke", "--no-progress")
    assert again.exit_code == 0 and "0 to run" in again.output
    assert len(children(workdir)) == 2
    # Its Optuna study holds the two cells as completed trials, with their exact values.
    study = optuna.load_study(study_name="smoke", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / ".ablate" / "optuna.journal"))))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(PlannedRun.from_json(t.user_attrs[PLANNED_ATTR]).cell for t in done) == ["alpha_ce", "focal"]
    assert all(t.params == {"seed": 0} for t in done)


def test_a_diverging_cell_is_recorded_and_the_others_finish(workdir):
    path = workdir / "diverge.toml"
    path.write_text((REPO / "experiments" / "smoke.toml").read_text().replace(
        '[grid]\n"loss.cls" = ["focal", "alpha_ce"]',
        '[[variants]]\nname = "focal"\nloss.cls = "focal"\n\n'
        '[[variants]]\nname = "ce no prior lr 1e6"\nloss.cls = "ce"\nmodel.prior = "none"\ntrain.lr = 1e6\n'))
    result = invoke("run", str(path), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "1 diverged" in result.output and "1 finished" in result.output
    runs = {r.data.tags["ablate.cell"]: r for r in children(workdir, "diverge")}
    bad, good = runs["ce no prior lr 1e6"], runs["focal"]
    assert bad.info.status == "FAILED" and bad.data.tags["ablate.outcome"] == "diverged"
    assert "diverged_at" in bad.data.metrics and "AP" not in bad.data.metrics
    assert good.info.status == "FINISHED" and "AP" in good.data.metrics
    # A diverged cell is a result: running again reruns neither.
    assert "0 to run" in invoke("run", str(path), "--no-progress").output


def test_a_killed_run_resumes_from_its_checkpoint_in_the_same_mlflow_run(workdir):
    # kill -9 while the second cell (120 iterations) is past its second resume checkpoint (one every
    # 10; the 12-iteration first cell writes one, at 10); the next `ablate run` finds the first
    # cell done and resumes the second where it stopped.
    path = workdir / "killme.toml"
    text = (REPO / "experiments" / "smoke.toml").read_text()
    grid = '[grid]\n"loss.cls" = ["focal", "alpha_ce"]'
    assert "train.iterations = 12\n" in text and grid in text
    # 64 px: a third of the training time at 128 px; what is checked does not depend on the image size.
    path.write_text(text.replace(
        grid, '[[variants]]\nloss.cls = "focal"\n\n[[variants]]\nloss.cls = "alpha_ce"\ntrain.iterations = 120')
        .replace("data.num_workers = 0\n", "data.num_workers = 0\ndata.min_size = 64\ndata.max_size = 64\n"))
    # One thread: two would spin against each other and the polling on a busy 2-core machine.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = workdir / "killme.log"
    proc = cli_zygote.start(["run", str(path), "--no-progress", "--checkpoint-every", "10"], workdir, env, log=log,
                            new_session=True)
    saved: dict = {}
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            for sidecar in (workdir / ".ablate" / "checkpoints").glob("*/resume.json"):
                with contextlib.suppress(ValueError, OSError):
                    saved = json.loads(sidecar.read_text())
            if 20 <= saved.get("iteration", 0) < 120:
                break
        else:
            pytest.fail(f"the long cell never reached a checkpoint (exit code {proc.poll()}, {saved}); its output:\n"
                        f"{log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = invoke("run", str(path), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "1 already done, 1 to run" in " ".join(result.output.split())
    runs = children(workdir, "killme")
    assert sorted((r.data.tags["ablate.cell"], r.info.status) for r in runs) == [
        ("alpha_ce iterations=120", "FINISHED"), ("focal", "FINISHED")]
    resumed = next(r for r in runs if r.info.run_id == saved["meta"]["run_id"])
    assert int(resumed.data.tags["ablate.resumed_from"]) >= saved["iteration"] >= 20
    steps = [m.step for m in client(workdir).get_metric_history(resumed.info.run_id, "loss")]
    # Each logged step once (the store returns them in no set order): the attempt that was killed
    # logged up to its kill, the resumed one from its checkpoint on, and none twice.
    assert sorted(steps) == list(range(4, 121, 4)), steps
    assert not list((workdir / ".ablate" / "checkpoints").glob("*/resume.*"))  # gone once the run is over
    # The killed coordinator's parent run was carried on by the next `ablate run` and closed with it.
    c = client(workdir)
    parents = [r for r in c.search_runs([c.get_experiment_by_name("killme").experiment_id])
               if "ablate.cell" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}


def test_report_tables_equal_the_tracked_metrics(workdir):
    assert invoke("run", "smoke", "--no-progress").exit_code == 0
    result = invoke("report", "smoke")
    assert result.exit_code == 0, result.output
    out = workdir / "reports" / "smoke"
    for name in ("table.md", "results.csv", "runs.csv", "table.tex", "ap.png", "loss_curves.png",
                 "loss_vs_pt.png", "README.md"):
        assert (out / name).is_file(), name
    import pandas as pd

    results = pd.read_csv(out / "results.csv")
    tracked = {r.data.tags["ablate.cell"]: r.data.metrics["AP"] for r in children(workdir)}  # percent
    for _, row in results.iterrows():
        assert 100 * row["AP_mean"] == pytest.approx(tracked[row["cell"]], abs=1e-9)
    table = (out / "table.md").read_text()
    for ap in tracked.values():
        assert f"{ap:.1f}" in table
    assert (out / "report.html").is_file()
    # Figure 4 ([loss_cdf] in smoke.toml) comes from the focal run's checkpoint, and says which run.
    focal = next(r for r in children(workdir) if r.data.tags["ablate.cell"] == "focal")
    readme = (out / "README.md").read_text()
    assert (out / "loss_cdf.png").is_file() and "](loss_cdf.png)" in readme and focal.info.run_id in readme
    curves = pd.read_csv(out / "loss_cdf.csv")
    assert set(curves["gamma"]) == {0.0, 2.0} and set(curves["side"]) == {"positive", "negative"}


def test_report_says_why_figure_4_is_missing_without_the_checkpoint(workdir):
    assert invoke("run", "smoke", "--no-progress").exit_code == 0
    for checkpoint in (workdir / "runs").glob("*/checkpoint.pt"):
        checkpoint.unlink()
    result = invoke("report", "smoke")
    assert result.exit_code == 0, result.output
    readme = (workdir / "reports" / "smoke" / "README.md").read_text()
    assert "`loss_cdf.png` was not written" in readme and "not on this machine" in readme
    assert not (workdir / "reports" / "smoke" / "loss_cdf.png").exists()


def test_parallel_jobs_run_every_cell_once(workdir):
    result = invoke("run", "smoke", "--seeds", "2", "--jobs", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    runs = children(workdir)
    assert sorted((r.data.tags["ablate.cell"], r.data.tags["ablate.seed"]) for r in runs) == [
        ("alpha_ce", "0"), ("alpha_ce", "1"), ("focal", "0"), ("focal", "1")]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_two_folders_sharing_one_store_run_each_cell_once(workdir):
    """Two `ablate run` started at once in two working folders (two queues) over one tracking
    store: the store's claims decide, so every cell x seed runs once; a third run finds all done."""
    uri = f"sqlite:///{workdir / 'shared.db'}"
    from ablate.tracking import init_store

    init_store(uri)  # a fresh sqlite store is created once; racing migrations is another matter
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["run", "smoke", "--seeds", "2", "--no-progress"]
    folders = [workdir / "a", workdir / "b"]
    procs = []
    for folder in folders:
        folder.mkdir()
        procs.append(cli_zygote.start(args, folder, env))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("smoke")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`ablate.cell` != ''")
    finished = sorted((r.data.tags["ablate.cell"], r.data.tags["ablate.seed"]) for r in runs
                      if r.info.status == "FINISHED")
    assert finished == [("alpha_ce", "0"), ("alpha_ce", "1"), ("focal", "0"), ("focal", "1")], outputs
    assert all(r.info.status == "FINISHED" for r in runs)  # a losing claim leaves no run behind
    # What both planned beyond the 4 runs was skipped at claim time, and said so.
    planned = sum(int(m) for m in re.findall(r"(\d+) to run", "".join(outputs)))
    skipped = sum(int(m) for m in re.findall(r"(\d+) skipped \(done elsewhere\)", "".join(outputs)))
    assert planned - 4 == skipped, outputs
    third = cli_zygote.run(args, workdir, env, timeout=300)
    assert "4 already done, 0 to run" in third.stdout + third.stderr


def test_by_default_a_grid_runs_as_many_workers_as_the_machine_has_cores(workdir, monkeypatch):
    """No --jobs (and no $ABLATE_JOBS): `workers.default_jobs` workers, each its own process (two
    on a 2-core machine, each cell trained by a different one), recorded on the parent run."""
    from ablate.workers import default_jobs

    monkeypatch.delenv("ABLATE_JOBS")
    env = dict(os.environ)
    expected = default_jobs(2, visible=[])
    done = cli_zygote.run(["run", "smoke", "--no-progress"], workdir, env, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = children(workdir)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    owners = {r.data.tags["ablate.owner"].rsplit(":", 1)[0] for r in runs}  # host:pid, without the start time
    assert len(owners) == expected, owners
    exp = client(workdir).get_experiment_by_name("smoke")
    parent, = client(workdir).search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'grid'")
    assert parent.data.tags["ablate.jobs"] == str(expected)


def test_search_runs_tpe_trials_with_intermediate_ap(workdir):
    result = invoke("search", "smoke", "--trials", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    runs = children(workdir, "smoke-search")
    assert len(runs) == 3
    c = client(workdir)
    for run in runs:
        assert 0.0 <= float(run.data.params["loss.gamma"]) <= 5.0
        assert [m.step for m in c.get_metric_history(run.info.run_id, "val_AP")] == [6]
    assert "best AP" in result.output


def test_dry_run_and_show_list_the_cells(workdir):
    result = invoke("run", "gamma-sweep", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "21 runs" in result.output and "g=5 a=0.25" in result.output
    assert not (workdir / "runs").exists()
    listing = invoke("list")
    assert listing.exit_code == 0 and "gamma-sweep" in listing.output and "ohem-vs-focal" in listing.output


def test_bad_experiment_grid_names_file_and_key(workdir):
    path = workdir / "bad.toml"
    path.write_text('preset = "tiny"\n[grid]\n"loss.gama" = [1.0, 2.0]\n')
    result = invoke("run", str(path))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(path) in result.output and "loss.gama" in result.output


def test_a_missing_coco_folder_stops_the_grid_before_any_run(workdir):
    missing = workdir / "coco2017"
    result = invoke("run", "smoke", "--data", f"coco:{missing}", "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(missing) in result.output
    exp = client(workdir).get_experiment_by_name("smoke")
    assert client(workdir).search_runs([exp.experiment_id]) == []  # no parent, no failed children


def test_worker_bars_count_each_cells_own_iterations(workdir):
    # Cells that set their own schedule: each worker's bar must end at that cell's iterations.
    path = workdir / "lengths.toml"
    text = (REPO / "experiments" / "smoke.toml").read_text()
    grid = '[grid]\n"loss.cls" = ["focal", "alpha_ce"]'
    path.write_text(text.replace(grid, '[[variants]]\nname = "focal"\nloss.cls = "focal"\ntrain.iterations = 4\n\n'
                                       '[[variants]]\nname = "alpha_ce"\nloss.cls = "alpha_ce"\ntrain.iterations = 8'))
    result = invoke("run", str(path), "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert "4/4" in result.output and "8/8" in result.output, result.output
    assert "/12" not in result.output  # the file's base schedule, which neither cell runs


def test_the_parent_run_holds_the_grid_summary_and_then_the_report(workdir):
    """Browsing MLflow is reading the report: the experiment opens as model training, the grid's
    parent run holds each cell's mean AP and CI (metrics, summary/cells.csv, its description) and,
    after `ablate report`, the report's files; the child runs hold AP, AP50, AP75. The grid ran
    with --set, and the plain `ablate report` / `ablate show` find its runs."""
    path = workdir / "browse.toml"  # smoke, one cell and no Figure 4 (this test is about MLflow)
    text = (REPO / "experiments" / "smoke.toml").read_text()
    path.write_text(text.replace('"loss.cls" = ["focal", "alpha_ce"]', '"loss.cls" = ["focal"]')
                    .replace('[report.loss_cdf]\ncell = "focal"\ngammas = [0.0, 2.0]\n', ""))
    result = invoke("run", str(path), "--seeds", "2", "--set", "train.iterations=4", "--no-progress")
    assert result.exit_code == 0, result.output
    c = client(workdir)
    exp = c.get_experiment_by_name("browse")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    described = exp.tags["mlflow.note.content"]  # links first (the page header shows them), then the file's text
    assert described.startswith("**Results:** [cells: the Runs table grouped by cell](") and "\n\nA seconds-long grid" in described
    [parent] = [r for r in c.search_runs([exp.experiment_id]) if "ablate.cell" not in r.data.tags]
    kids = children(workdir, "browse")
    assert len(kids) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids)
    for run in kids:
        assert all(0.0 <= run.data.metrics[m] <= 100.0 for m in ("AP", "AP50", "AP75"))  # percent
    assert parent.info.status == "FINISHED" and parent.data.tags["ablate.role"] == "grid"
    assert json.loads(parent.data.tags["ablate.overrides"]) == {"train.iterations": 4}
    # The summary: the cell's mean AP over its 2 seeds and the t interval (df 1) around it.
    metrics = parent.data.metrics
    a, b = (r.data.metrics["AP"] for r in kids)  # percent, like the summary's (4 decimals each)
    mean, half = (a + b) / 2, 12.706204736174707 * abs(a - b) / 2  # std / sqrt(2) = |a - b| / 2
    assert metrics["AP_mean/focal"] == pytest.approx(mean, abs=1e-4)
    assert metrics["AP_ci95_low/focal"] == pytest.approx(mean - half, abs=1e-4)
    assert metrics["AP_ci95_high/focal"] == pytest.approx(mean + half, abs=1e-4)
    assert metrics["n/focal"] == 2
    assert parent.info.run_name.startswith("browse 20")  # named after the experiment and its time
    local = Path(c.download_artifacts(parent.info.run_id, "summary/cells.csv", str(workdir)))
    import pandas as pd

    table = pd.read_csv(local)
    assert list(table["cell"]) == ["focal"] and list(table["n"]) == [2]
    assert 100 * table.loc[0, "AP_mean"] == pytest.approx(mean, abs=1e-9)  # the fractions behind them
    assert "the grid's summary" in parent.data.tags["mlflow.note.content"]

    shown = invoke("show", str(path), "--seeds", "2")
    assert shown.exit_code == 0, shown.output
    assert "made with --set train.iterations=4" in shown.output and "2 done, 0 to run" in shown.output
    report = invoke("report", str(path))
    assert report.exit_code == 0, report.output
    assert "made with --set train.iterations=4: reporting those" in report.output
    assert f"attached to MLflow run {parent.info.run_id}" in report.output
    readme = (workdir / "reports" / "browse" / "README.md").read_text()
    assert "ablate run browse --seeds 2 --set train.iterations=4\nablate report browse --set train.iterations=4" in readme
    attached = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{n}" for n in ("table.md", "results.csv", "runs.csv", "ap.png", "loss_curves.png",
                                    "README.md", "report.html")} <= attached
    note = c.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
    table, caption = (workdir / "reports" / "browse" / "table.md").read_text().strip().split("\n\n")
    page = f"#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifactPath/report/report.html"
    assert note.startswith(f"## browse: report\n\n**[Report page]({page}?workflowType=machine_learning)**")
    assert f"```\n{aligned(table)}\n```\n\n{caption}\n" in note
    assert f"![AP per cell](get-artifact?path=report/ap.png&run_uuid={parent.info.run_id})" in note
    # The experiment's description now leads to the report page too, from every page of it.
    assert f"[report page]({page}" in c.get_experiment(exp.experiment_id).tags["mlflow.note.content"]


def _fake_grid(workdir: Path, overrides: dict) -> str:
    """A finished grid of smoke (seed 0) made with `overrides`, written straight into the store;
    returns its parent run's id."""
    from ablate import tracking
    from ablate.experiments import load_experiment
    from ablate.runs import Outcome

    tracker = tracking.Tracker("smoke", tracking.init_store(f"sqlite:///{workdir / 'mlflow.db'}"))
    parent = tracker.start_parent("run", {"ablate.role": "grid", "ablate.overrides": json.dumps(overrides)})
    for planned in load_experiment("smoke").planned_runs([0], overrides):
        child = tracker.start_child(planned, parent)
        child.log_metrics({"AP": 0.2, "AP50": 0.3, "AP75": 0.2})
        child.end(Outcome.FINISHED)
    tracker.end_parent(parent)
    return parent


def test_report_and_show_name_each_override_set_with_its_command(workdir):
    from ablate.data.source import DataSource

    coco_parent = _fake_grid(workdir, DataSource.parse("coco:/data/coco", "--data").overrides())  # as the CLI records it
    _fake_grid(workdir, {"train.iterations": 50})
    for command in ("report", "show"):
        result = invoke(command, "smoke")
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "2 sets of overrides" in result.output
        assert f"`ablate {command} smoke --data coco:/data/coco`" in result.output
        assert f"`ablate {command} smoke --set train.iterations=50`" in result.output
    shown = invoke("show", "smoke", "--set", "train.iterations=50")
    assert shown.exit_code == 0 and "2 done, 0 to run" in shown.output
    client(workdir).delete_run(coco_parent)  # a report still works; it has no parent run to go to
    report = invoke("report", "smoke", "--data", "coco:/data/coco")
    assert report.exit_code == 0, report.output
    assert "attached" not in report.output
    assert "ablate report smoke --data coco:/data/coco" in (workdir / "reports" / "smoke" / "README.md").read_text()
    wrong = invoke("report", "smoke", "--set", "train.iterations=7")
    assert wrong.exit_code == 1 and "made with --set train.iterations=7; tracked: `ablate report" in wrong.output


def test_ui_prints_the_url_of_the_ablations_runs_table(workdir, monkeypatch):
    from ablate import ui

    _fake_grid(workdir, {})
    started = []

    class Server:  # stands for the MLflow UI process (its start takes ~20 s; it is MLflow's, not ours)
        returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(ui, "start", lambda uri, port, genai=False: started.append((uri, port, genai)) or Server())
    result = invoke("ui", "smoke", "--port", "5077")
    assert result.exit_code == 0, result.output
    exp = client(workdir).get_experiment_by_name("smoke")
    assert (f"smoke runs: http://127.0.0.1:5077/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            "&viewStateShareKey=ablate") in result.output
    assert started == [(f"sqlite:///{workdir / 'mlflow.db'}", 5077, False)]  # no GenAI job runner unless asked
    missing = invoke("ui", "gamma-sweep")
    assert missing.exit_code == 1 and "no experiment 'gamma-sweep'" in missing.output
