"""The `ablate` command line: parse, load, delegate. No logic of its own.

`python cli.py ...` from a checkout and the installed `ablate` command are the same app; the
options, with their help, are declared in ablate.options. Heavy imports (torch, mlflow) happen
inside the commands, once the input is known good, so that `--help` and bad input stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ablate import options as o
from ablate.console import console, friendly_errors, metrics_text, print_run, say
from ablate.options import given_overrides, overrides_from

app = typer.Typer(help="Run, track and report the ablations of a dense detector (RetinaNet, focal loss).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="The embedded procedural data set.", no_args_is_help=True)
app.add_typer(data_app, name="data")
analyze_app = typer.Typer(help="Diagnostics of trained models (the paper's figures).", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")

@app.command()
@friendly_errors
def train(experiment: o.Experiment, set_: o.Set = None, data: o.Data = None, seed: o.Seed = None,
          out: o.RunsFolder = None, resume: o.Resume = None, checkpoint_every: o.TrainCheckpointEvery = 0,
          nproc: o.Nproc = None, backend: o.Backend = None, progress: o.Progress = True) -> None:
    """Train one model from an experiment file, then evaluate it on the val split.

    SIGTERM or Ctrl-C stops the run after the current iteration (writing the resume checkpoint if
    there is one) with exit code 130; a second signal stops it at once."""
    from ablate.config import check_seed
    from ablate.experiments import load_experiment
    from ablate.paths import check_writable_folder

    if seed is not None:
        check_seed(seed, "--seed")
    if out:
        check_writable_folder(out, "--out")
    exp = load_experiment(experiment)
    options = {"train.out_dir": str(out) if out else None, "train.nproc": nproc, "train.backend": backend}
    cfg = exp.base_config({"train.seed": seed if seed is not None else exp.seeds[0], **overrides_from(set_, data),
                           **{key: value for key, value in options.items() if value is not None}})
    from ablate.checkpoint import discard_resume  # torch: only once the input is known good
    from ablate.analysis import draw_loss_curve
    from ablate.runner import resume_spec, run_training
    from ablate.runs import Outcome
    from ablate.signals import graceful_stop

    spec = resume_spec(cfg, resume, checkpoint_every)
    with graceful_stop() as stop:
        run = run_training(cfg, name=exp.name, console=console, show_progress=progress, resume=spec, stop=stop)
    draw_loss_curve(run.run_dir, exp.name, console)  # the run folder's plot: training never imports the plotting
    if spec and run.rank == 0 and run.outcome is not Outcome.INTERRUPTED:
        discard_resume(spec.path)  # the run is over: nothing to go on from
    raise typer.Exit(print_run(run, resumable=spec is not None))


@app.command("eval")
@friendly_errors
def eval_(checkpoint: o.Checkpoint, set_: o.Set = None, data: o.Data = None, out: o.EvalFolder = None,
          progress: o.Progress = True) -> None:
    """Evaluate a checkpoint on the val split (COCO AP, AP50, AP75, APs/m/l, AR100)."""
    from ablate.paths import check_writable_folder

    out = check_writable_folder(out or checkpoint.parent, "--out")
    from ablate.inference import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint, overrides_from(set_, data), out, progress)
    console.print(metrics_text(metrics) + f"  ({metrics['infer_ms_per_img']:.1f} ms/img)")
    console.print(escape(f"wrote {out / 'detections.json'} and {out / 'eval.json'}"))


@app.command()
@friendly_errors
def infer(checkpoint: o.Checkpoint, images: o.Images, out: o.DetectionsFolder = Path("detections"),
          score_min: o.ScoreMin = 0.3, set_: o.Set = None) -> None:
    """Detect objects in images and save each with its boxes, class names and scores drawn."""
    from ablate.paths import check_writable_folder, output_paths

    check_writable_folder(out, "--out")
    output_paths(images, out)  # checked before the model loads: nothing overwritten, nothing missing
    from ablate.checkpoint import load_checkpoint
    from ablate.inference import check_score_min, detect_files

    check_score_min(score_min)
    model, cfg, ckpt = load_checkpoint(checkpoint, overrides_from(set_, None))
    out.mkdir(parents=True, exist_ok=True)
    for path, num in detect_files(model, cfg, ckpt["class_names"], images, out, score_min):
        console.print(escape(f"{path}: {num} detections >= {score_min}"))


@app.command("list")
@friendly_errors
def list_() -> None:
    """The experiments in experiments/: cells, seeds and what each is about."""
    from rich.table import Table

    from ablate.experiments import survey

    table, (rows, errors) = Table("name", "cells", "seeds", "preset", "description"), survey()
    for row in rows:
        invalid = (escape(row), "-", "-", "-", "[red]invalid[/red] (see below)") if isinstance(row, str) else None
        table.add_row(*(invalid or map(escape, row)))
    Console().print(table)
    for error in errors:  # whole lines, never wrapped into the table's cells
        console.print(f"[red]error:[/red] {escape(error)}", highlight=False, soft_wrap=True)
    if errors:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def show(experiment: o.Experiment, seeds: o.Seeds = None, set_: o.Set = None, data: o.Data = None) -> None:
    """The expanded cells of an experiment, their config hashes and which are already done.
    Without --data / --set: those the tracked runs were made with."""
    from ablate.experiments import load_experiment

    exp = load_experiment(experiment)
    seed_values = exp.seed_list(seeds)
    from ablate import grid  # torch, MLflow, Optuna: only once the input is known good

    grid.show(exp, seed_values, given_overrides(set_, data), say, Console())


def ran(name: str, outcomes) -> None:
    """The outcome counts of `ablate run/worker`, and its exit code (ablate.workers.exit_code)."""
    from ablate.workers import counts_text, exit_code

    if outcomes:
        say(f"{name}: {counts_text(outcomes)}; browse with `ablate ui {name}`, tabulate with `ablate report {name}`")
    raise typer.Exit(exit_code(outcomes))


@app.command()
@friendly_errors
def run(experiment: o.Experiment, seeds: o.Seeds = None, jobs: o.RunJobs = None, set_: o.Set = None,
        data: o.Data = None, preset: o.Preset = None, storage: o.Storage = None, checkpoint_dir: o.CheckpointDir = None,
        checkpoint_every: o.CheckpointEvery = None, gpus_per_cell: o.GpusPerCell = 1, nproc: o.Nproc = None,
        stall_timeout: o.StallTimeout = None, dry_run: o.DryRun = False, force: o.Force = False,
        until_settled: o.UntilSettled = False, max_seeds: o.MaxSeeds = None, test: o.Test = None,
        family: o.Family = False, budgets: o.Budgets = None, progress: o.Progress = True) -> None:
    """Plan an ablation grid, enqueue every cell x seed not yet done, and run them (tracked in MLflow)."""
    from ablate.adaptive import RunMode
    from ablate.errors import check_at_least
    from ablate.experiments import load_experiment

    exp = load_experiment(experiment)
    if preset:
        exp = exp.with_preset(preset)
    if jobs is not None and jobs < 0:
        raise typer.BadParameter(f"must be >= 0, got {jobs}", param_hint="--jobs")
    seed_values, overrides = exp.seed_list(seeds), overrides_from(set_, data)
    check_at_least(checkpoint_every, 0, "--checkpoint-every")
    mode = RunMode(force, until_settled, max_seeds, test, family, budgets)
    mode.check(exp)
    check_at_least(gpus_per_cell, 1, "--gpus-per-cell")
    from ablate import rounds, workers  # torch, MLflow, Optuna: only once the input is known good

    options = workers.resolve_options(storage, checkpoint_dir, checkpoint_every, nproc, stall_timeout)
    ran(exp.name, rounds.run(exp, seed_values, overrides, mode, options=options, jobs=jobs,
                             gpus_per_cell=max(gpus_per_cell, options.nproc), dry_run=dry_run, console=console,
                             show_progress=progress))


@app.command()
@friendly_errors
def worker(experiment: o.Grid, storage: o.Storage = None, jobs: o.WorkerJobs = None, checkpoint_dir: o.CheckpointDir = None,
           checkpoint_every: o.CheckpointEvery = None, gpus_per_cell: o.GpusPerCell = 1, nproc: o.Nproc = None,
           stall_timeout: o.StallTimeout = None, progress: o.Progress = True) -> None:
    """Pull runs of a planned grid from the queue and train them until the queue is empty (any number
    of workers, on any machine sharing the queue, the tracking server and the checkpoint folder)."""
    from ablate.errors import check_at_least

    if jobs is not None and jobs < 1:
        raise typer.BadParameter(f"must be >= 1, got {jobs}", param_hint="--jobs")
    name = Path(experiment).stem if experiment.endswith(".toml") else experiment
    check_at_least(gpus_per_cell, 1, "--gpus-per-cell")
    from ablate import grid, workers

    options = workers.resolve_options(storage, checkpoint_dir, checkpoint_every, nproc, stall_timeout)
    # A worker process sees only its own GPUs: a cell on --nproc N processes needs N of them.
    ran(name, grid.run_worker(name, options, jobs=jobs, gpus_per_cell=max(gpus_per_cell, options.nproc),
                              show_progress=progress))


@app.command()
@friendly_errors
def search(experiment: o.SearchExperiment, trials: o.Trials = None, jobs: o.SearchJobs = 1, seed: o.SamplerSeed = 0, set_: o.Set = None,
           data: o.Data = None, progress: o.Progress = True) -> None:
    """Optuna TPE over the space the experiment declares, pruning on the intermediate AP."""
    from ablate import search as tpe_search, workers
    from ablate.experiments import load_experiment

    exp = load_experiment(experiment)
    n = trials if trials is not None else (exp.search.trials if exp.search else 0)
    tpe_search.check_search(exp, n, jobs, seed)
    best = tpe_search.run_search(exp, n, overrides_from(set_, data), options=workers.resolve_options(checkpoint_every=0),
                                 jobs=jobs, seed=seed, console=console, show_progress=progress)
    if best:
        params, value = best
        console.print(escape(f"best {exp.search.metric} {100 * value:.1f} with {params}"))
    else:
        console.print("no trial completed yet")


@app.command()
@friendly_errors
def report(experiment: o.Experiment, out: o.ReportFolder = None, set_: o.Set = None, data: o.Data = None,
           family: o.ReportFamily = False) -> None:
    """Tables (Markdown like the paper's, CSV, LaTeX) and seaborn plots from the tracked runs, also
    attached to the grid's MLflow parent run. Without --data / --set: those the runs were made with."""
    from ablate.experiments import load_experiment
    from ablate.paths import check_writable_folder

    exp = load_experiment(experiment)
    given, out = given_overrides(set_, data), check_writable_folder(out or Path("reports") / exp.name, "--out")
    from ablate.report.build import build_report  # MLflow, seaborn: only once the input is known good

    written = build_report(exp, given, out, family=family, say=say)
    for path in written.values():
        console.print(escape(f"wrote {path}"))


@app.command()
@friendly_errors
def findings(reports: o.Reports = Path("reports"), readme: o.FindingsPage = None) -> None:
    """The paper's Table 1 findings checked against the reports: paper, ours (mean, 95% CI, seeds),
    whether each holds. Writes REPORTS/findings.md."""
    from ablate.findings_page import write_findings
    from ablate.paths import check_writable_folder

    check_writable_folder(reports, "--reports")
    for path in write_findings(reports, readme, console):
        say(f"wrote {path}")


@app.command()
@friendly_errors
def ui(experiment: o.Ablation = None, port: o.Port = 5000, open_: o.OpenPage = False, genai: o.GenAI = False) -> None:
    """The MLflow UI over the project's store, on http://127.0.0.1:PORT (Ctrl-C stops it), with the
    URLs of each ablation's report page and Runs table (MLflow 3 would open its empty GenAI pages)."""
    from ablate import ui as mlflow_ui

    name = Path(experiment).stem if experiment and experiment.endswith(".toml") else experiment
    raise typer.Exit(mlflow_ui.browse(name, port, open_, genai, say=say,
                                   warn=lambda line: console.print(escape(line), style="yellow")))


@analyze_app.command("loss-cdf")
@friendly_errors
def analyze_loss_cdf(checkpoint: o.TrainedCheckpoint,
                     gammas: o.Gammas = "0,0.5,1,2", out: o.Folder = None, max_images: o.MaxImages = 0,
                     set_: o.Set = None) -> None:
    """Figure 4: CDFs of the normalised focal loss of positive and negative examples, per gamma,
    for one trained model on the val split (loss_cdf.png and loss_cdf.csv)."""
    from ablate.analysis import parse_gammas, write_loss_cdf
    from ablate.paths import check_writable_folder

    gamma_list = parse_gammas(gammas)
    overrides = overrides_from(set_, None)
    if max_images:
        overrides["data.max_val_images"] = max_images
    out = check_writable_folder(out or checkpoint.parent, "--out")
    written = write_loss_cdf(checkpoint, gamma_list, out, overrides)
    console.print(escape(f"{written['positives']:,} positive and {written['negatives']:,} negative examples; "
                         f"wrote {written['png']} and {written['csv']}"))


@data_app.command("synth")
@friendly_errors
def data_synth(set_: o.Set = None, preset: o.AnchorPreset = "tiny", progress: o.Progress = True) -> None:
    """Write the embedded data set (COCO layout) into the cache; print where, and its statistics."""
    from ablate.config import build_config
    from ablate.imbalance import embedded_set

    root, lines = embedded_set(build_config(preset, overrides_from(set_, "synth")), preset, progress)
    print(root)
    for line in lines:
        console.print(escape(f"  {line}"))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
