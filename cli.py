"""The `ablate` command line: parse, load, delegate. No logic of its own.

`python cli.py ...` from a checkout and the installed `ablate` command are the same app.
Heavy imports (torch, mlflow) happen inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ablate.data.source import HELP as DATA_HELP

app = typer.Typer(help="Run, track and report the ablations of a dense detector (RetinaNet, focal loss).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="The embedded procedural data set.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: key=value "
                                                     "(repeatable), e.g. --set loss.gamma=1 --set train.iterations=50")]
DataOption = Annotated[str | None, typer.Option("--data", help=DATA_HELP)]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
NprocOption = Annotated[int | None, typer.Option(
    "--nproc", help="Processes training each run together (DDP: one per GPU, or per CPU core); they share "
    "out the global batch (train.nproc, default 1). Or launch `ablate train` under torchrun")]


def friendly_errors(command):
    """Turn user errors (AblateError) into one red line and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ablate.errors import AblateError, mask_urls, one_line, printable

        try:
            return command(*args, **kwargs)
        except AblateError as e:
            # Escaped: messages quote user input (names, paths, values) and forms like FILE[@IMAGES],
            # which are no markup; a password in a quoted URL is masked.
            console.print(f"[red]error:[/red] {escape(mask_urls(one_line(e)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as e:  # the machine's answer about a file the checks could not foresee (a full disk)
            where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
            line = printable(f"{where}{e.strerror or e}")
            console.print(f"[red]error:[/red] {escape(mask_urls(line))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]: files written so far are kept")
            raise typer.Exit(130) from None

    return wrapper


def overrides_from(sets: list[str] | None, data: str | None) -> dict[str, Any]:
    """--set pairs and the --data shorthand as dotted-key overrides."""
    from ablate.config import parse_set
    from ablate.data.source import DataSource

    out: dict[str, Any] = DataSource.parse(data, "--data").overrides() if data else {}
    for assignment in sets or []:
        key, value = parse_set(assignment)
        out[key] = value
    return out


def given_overrides(sets: list[str] | None, data: str | None) -> dict[str, Any] | None:
    """overrides_from, or None when neither flag was given (report and show then use the tracked runs')."""
    return overrides_from(sets, data) if sets or data else None


@app.command()
@friendly_errors
def train(experiment: Annotated[str, typer.Argument(help="Experiment name (experiments/NAME.toml) or path.")],
          set_: SetOption = None, data: DataOption = None,
          seed: Annotated[int | None, typer.Option(help="Seed (default: the experiment's first).")] = None,
          out: Annotated[Path | None, typer.Option(help="Folder for run folders (train.out_dir).")] = None,
          resume: Annotated[Path | None, typer.Option(
              "--resume", help="Continue from the resume checkpoint of a stopped run of the same config.")] = None,
          checkpoint_every: Annotated[int, typer.Option(
              "--checkpoint-every", min=0, help="Write a resume checkpoint every N iterations and when stopped "
              "(OUT/resume-HASH.pt, or the --resume file); running the same command again goes on from it.")] = 0,
          nproc: NprocOption = None,
          backend: Annotated[str | None, typer.Option(
              help="torch.distributed backend with --nproc: auto (nccl on CUDA, gloo on CPU), gloo or nccl "
              "(train.backend)")] = None,
          progress: ProgressOption = True) -> None:
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
    overrides = overrides_from(set_, data)
    overrides.setdefault("train.seed", seed if seed is not None else exp.seeds[0])
    if out:
        overrides["train.out_dir"] = str(out)
    if nproc is not None:
        overrides["train.nproc"] = nproc
    if backend is not None:
        overrides["train.backend"] = backend
    cfg = exp.base_config(overrides)
    from ablate.checkpoint import discard_resume  # torch: only once the input is known good
    from ablate.analysis import draw_loss_curve
    from ablate.runner import resume_spec, run_training
    from ablate.runs import Outcome
    from ablate.signals import graceful_stop

    spec = resume_spec(cfg, resume, checkpoint_every)
    with graceful_stop() as stop:
        summary = run_training(cfg, name=exp.name, console=console, show_progress=progress, resume=spec, stop=stop)
    draw_loss_curve(summary, exp.name, console)  # the run folder's plot: training never imports the plotting
    if summary.get("rank"):  # another process of a torchrun launch: rank 0 reports the run
        raise typer.Exit({Outcome.FINISHED: 0, Outcome.INTERRUPTED: 130}.get(summary["status"], 3))
    if summary["status"] is Outcome.INTERRUPTED:
        kept = (f"resume checkpoint {summary['resume_checkpoint']} (go on with --resume or the same command)"
                if spec else "no resume checkpoint (--checkpoint-every N writes one)")
        console.print(escape(f"interrupted at iteration {summary['iterations']}: {kept}; run folder "
                             f"{summary['run_dir']}"), style="yellow")
        raise typer.Exit(130)
    if spec:
        discard_resume(spec.path)
    print_summary(summary)
    if summary["status"] is not Outcome.FINISHED:
        raise typer.Exit(3)


def print_summary(summary: dict[str, Any]) -> None:
    if summary["status"] == "diverged":
        console.print(f"[red]diverged[/red] at iteration {summary['diverged_at']} (non-finite loss); "
                      f"logged metrics kept in {escape(summary['run_dir'])}")
        return
    console.print(f"[green]finished[/green] {summary['iterations']} iterations in {summary['train_seconds']:.0f} s: "
                  + format_metrics(summary["metrics"]))
    console.print(escape(f"run folder: {summary['run_dir']}"))


def format_metrics(metrics: dict[str, float]) -> str:
    """'AP 31.2  AP50 ...' in percent; COCO's -1 (no object of that size) shows as n/a."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    return "  ".join(f"{k} {100 * metrics[k]:.1f}" if metrics[k] >= 0 else f"{k} n/a" for k in names)


@app.command("eval")
@friendly_errors
def eval_(checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt written by `ablate train`.")],
          set_: SetOption = None, data: DataOption = None,
          out: Annotated[Path | None, typer.Option(help="Where to write detections.json and eval.json "
                                                   "(default: beside the checkpoint).")] = None,
          progress: ProgressOption = True) -> None:
    """Evaluate a checkpoint on the val split (COCO AP, AP50, AP75, APs/m/l, AR100)."""
    from ablate.paths import check_writable_folder

    out = check_writable_folder(out or checkpoint.parent, "--out")
    from ablate import builders, engine
    from ablate.checkpoint import load_checkpoint
    from ablate.evaluation import save_results
    from ablate.runner import write_json

    model, cfg, ckpt = load_checkpoint(checkpoint, overrides_from(set_, data))
    device = builders.resolve_device(cfg.train.device)
    val_set, loader = builders.build_val_loader(cfg, builders.data_root(cfg, progress=progress), progress=progress)
    builders.check_same_classes(ckpt["class_names"], val_set, f"the checkpoint {checkpoint}")
    metrics, records = engine.evaluate(model.to(device), loader, val_set, builders.build_postprocess(cfg), device,
                                       amp=cfg.train.amp, show_progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    save_results(records, out / "detections.json")
    write_json(out / "eval.json", metrics)
    console.print(format_metrics(metrics) + f"  ({metrics['infer_ms_per_img']:.1f} ms/img)")
    console.print(escape(f"wrote {out / 'detections.json'} and {out / 'eval.json'}"))


@app.command()
@friendly_errors
def infer(checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt written by `ablate train`.")],
          images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG).")],
          out: Annotated[Path, typer.Option(help="Folder for the annotated PNGs.")] = Path("detections"),
          score_min: Annotated[float, typer.Option(help="Draw detections scoring at least this.")] = 0.3,
          set_: SetOption = None) -> None:
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

    from ablate.errors import ConfigError, one_line
    from ablate.experiments import list_experiments, load_experiment

    table = Table("name", "cells", "seeds", "preset", "description")
    errors = []
    for path in list_experiments():
        try:
            exp = load_experiment(str(path))
        except ConfigError as e:  # one bad file must not hide the others: listed, its error below
            errors.append(one_line(e))
            table.add_row(escape(path.stem), "-", "-", "-", "[red]invalid[/red] (see below)")
            continue
        table.add_row(*(escape(text) for text in (exp.name, str(len(exp.cells())), str(exp.seeds), exp.preset,
                                                  exp.description)))
    Console().print(table)
    for error in errors:  # whole lines, never wrapped into the table's cells
        console.print(f"[red]error:[/red] {escape(error)}", highlight=False, soft_wrap=True)
    if errors:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def show(experiment: Annotated[str, typer.Argument(help="Experiment name or path.")],
         seeds: Annotated[int | None, typer.Option(help="Seeds 0..N-1 (default: the file's).")] = None,
         set_: SetOption = None, data: DataOption = None) -> None:
    """The expanded cells of an experiment, their config hashes and which are already done.
    Without --data / --set: those the tracked runs were made with."""
    from ablate.experiments import load_experiment

    exp = load_experiment(experiment)
    seed_values = seed_list(exp, seeds)
    from ablate import grid, tracking  # torch, MLflow, Optuna: only once the input is known good
    from ablate.results import command_flags, resolve_overrides

    tracker = tracking.Tracker(exp.name, tracking.init_store())
    given = given_overrides(set_, data)
    overrides = resolve_overrides(exp, given, tracker.load_runs(), tracker.override_sets(), "show")
    if overrides and given is None:
        console.print(escape(f"the tracked runs were made with{command_flags(overrides)}: showing those"),
                      soft_wrap=True, highlight=False)
    plan = grid.make_plan(exp, seed_values, overrides, tracker)
    grid.print_plan(plan, Console())
    for cell in exp.cells():
        Console().print(escape(f"  {cell.name}: {cell.overrides}"), highlight=False)


def seed_list(exp, seeds: int | None) -> list[int]:
    """Seeds 0..seeds-1 (--seeds N), else the experiment file's."""
    from ablate.errors import ConfigError

    if seeds is None:
        return exp.seeds
    if not 1 <= seeds <= 10_000:  # a grid of more seeds is a typo, and range() of it would fill the memory
        raise ConfigError(f"--seeds: the number of seeds must be in [1, 10000], got {seeds}")
    exp.check_size(seeds, "--seeds")
    return list(range(seeds))


StorageOption = Annotated[str | None, typer.Option(
    "--storage", help="The queue shared by workers on many machines: postgresql://USER:PASSWORD@HOST:PORT/DB "
    "(default: $ABLATE_STORAGE, else a journal file in ./.ablate)")]
CheckpointDirOption = Annotated[Path | None, typer.Option(
    "--checkpoint-dir", help="Where resume checkpoints go; every worker that may resume a run must read it "
    "(default: $ABLATE_CHECKPOINT_DIR, else ./.ablate/checkpoints)")]
CheckpointEveryOption = Annotated[int | None, typer.Option(
    "--checkpoint-every", help="Iterations between resume checkpoints (default: a tenth of the run, 50-1000; 0: none)")]
StallOption = Annotated[float | None, typer.Option(
    "--stall-timeout", help="Seconds a run may go without progress (an iteration, an evaluated batch, a checkpoint) "
    "before it counts as stalled, is ended and resumes on another worker (default: $ABLATE_STALL_TIMEOUT, else 50 "
    "of its own steps, at least 120 s; 0: never)")]
GpusOption = Annotated[int, typer.Option("--gpus-per-cell", help="GPUs each worker process gets (CUDA_VISIBLE_DEVICES; "
                                          "at least --nproc)")]


def worker_options(storage: str | None, checkpoint_dir: Path | None, checkpoint_every: int | None,
                   nproc: int | None = None, stall_timeout: float | None = None):
    """The settings every worker of a grid shares: tracking URI (checked now), queue, checkpoints,
    processes per run."""
    check_checkpoint_every(checkpoint_every)
    from ablate import builders, distributed, lease, scheduling, tracking
    from ablate.errors import AblateError
    from ablate.paths import check_writable_folder
    from ablate.workers import WorkerOptions

    lease.configured_stall_timeout(stall_timeout)  # a bad value is one line now, not in every worker

    if distributed.from_env() is not None:
        raise AblateError("a grid's workers start each run's processes themselves: run `ablate run/worker "
                          "--nproc N` without torchrun (torchrun is for `ablate train`)")
    if nproc is not None and nproc != 1:
        distributed.check_nproc(nproc, builders.resolve_device("auto"))
    given = checkpoint_dir or os.environ.get("ABLATE_CHECKPOINT_DIR")
    if given:  # the default, under ./.ablate, is the queue folder's, checked with it
        check_writable_folder(given, "--checkpoint-dir" if checkpoint_dir else "ABLATE_CHECKPOINT_DIR")
    folder = given or Path.cwd() / ".ablate" / "checkpoints"
    url = scheduling.storage_url(storage)
    if url:
        scheduling.storage(url)  # the queue first: one line within seconds if it cannot be reached
    return WorkerOptions(tracking_uri=tracking.init_store(), storage=url,
                         checkpoint_dir=Path(folder).expanduser().resolve(), checkpoint_every=checkpoint_every,
                         nproc=nproc or 1, stall_timeout=stall_timeout)


def check_checkpoint_every(checkpoint_every: int | None) -> None:
    from ablate.errors import AblateError

    if checkpoint_every is not None and checkpoint_every < 0:
        raise AblateError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")


def check_count(value: int, minimum: int, option: str) -> None:
    from ablate.errors import AblateError

    if value < minimum:
        raise AblateError(f"{option}: must be >= {minimum}, got {value}")


def report_outcomes(name: str, outcomes) -> None:
    from ablate.runs import Outcome
    from ablate.workers import WORKER_CRASHED

    if outcomes:
        console.print(escape(f"{name}: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
                             + f"; browse with `ablate ui {name}`, tabulate with `ablate report {name}`"))
    if outcomes.get(Outcome.INTERRUPTED):
        raise typer.Exit(130)
    if outcomes.get(Outcome.FAILED) or outcomes.get(WORKER_CRASHED):
        raise typer.Exit(4)


@app.command()
@friendly_errors
def run(experiment: Annotated[str, typer.Argument(help="Experiment name (experiments/NAME.toml) or path.")],
        seeds: Annotated[int | None, typer.Option(help="Run seeds 0..N-1 (default: the file's seeds).")] = None,
        jobs: Annotated[int | None, typer.Option(
            help="Workers of this command, each a process (default: one per core, or per --gpus-per-cell GPUs, "
            "at most one per run; 0, the default with a shared --storage: only enqueue)")] = None,
        set_: SetOption = None, data: DataOption = None,
        preset: Annotated[str | None, typer.Option(help="Budget preset instead of the file's (e.g. paper).")] = None,
        storage: StorageOption = None, checkpoint_dir: CheckpointDirOption = None,
        checkpoint_every: CheckpointEveryOption = None, gpus_per_cell: GpusOption = 1, nproc: NprocOption = None,
        stall_timeout: StallOption = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan, run nothing.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Rerun cells that are already done.")] = False,
        until_settled: Annotated[bool, typer.Option(
            "--until-settled", help="Add seeds only to the cells of comparisons the sequential rule has not "
            "settled yet (the file's `comparisons`, else each cell vs the baseline), until none is open")] = False,
        max_seeds: Annotated[int | None, typer.Option(
            "--max-seeds", help="With --until-settled: the rule's last look "
            "(default: the file's sequential table, else 8)")] = None,
        test: Annotated[str | None, typer.Option(
            "--test", help="With --until-settled: t (mean AP, default) or signed-rank (a typical seed, "
            "distribution-free)")] = None,
        family: Annotated[bool, typer.Option(
            "--family", help="With --until-settled: the comparisons as one family (Holm, family-wise alpha)")] = False,
        budgets: Annotated[str | None, typer.Option(
            "--budgets", help="Run every cell x seed at these multiples of its schedule, e.g. 1,2,4 "
            "(the LR steps scale with it; 1 is the cell as declared)")] = None,
        progress: ProgressOption = True) -> None:
    """Plan an ablation grid, enqueue every cell x seed not yet done, and run them (tracked in MLflow)."""
    from ablate.errors import AblateError
    from ablate.experiments import load_experiment

    exp = load_experiment(experiment)
    if preset:
        exp = exp.with_preset(preset)
    if jobs is not None and jobs < 0:
        raise typer.BadParameter(f"must be >= 0, got {jobs}", param_hint="--jobs")
    seed_values, overrides = seed_list(exp, seeds), overrides_from(set_, data)
    check_checkpoint_every(checkpoint_every)
    for given, flag in ((max_seeds is not None, "--max-seeds"), (test is not None, "--test"), (family, "--family")):
        if given and not until_settled:
            raise AblateError(f"{flag} goes with --until-settled")
    if until_settled and (budgets or force):
        raise AblateError(f"--until-settled does not combine with {'--budgets' if budgets else '--force'}")
    from ablate import adaptive, grid  # torch, MLflow, Optuna: only once the input is known good
    from ablate.budgets import parse_budgets

    multiples = parse_budgets(budgets) if budgets is not None else None
    if until_settled:
        adaptive.rule_of(exp, max_seeds)  # a bad --max-seeds in one line, before any store is opened
    check_count(gpus_per_cell, 1, "--gpus-per-cell")
    options = worker_options(storage, checkpoint_dir, checkpoint_every, nproc, stall_timeout)
    common = {"options": options, "jobs": jobs, "gpus_per_cell": max(gpus_per_cell, options.nproc), "dry_run": dry_run,
              "console": console, "show_progress": progress}
    if until_settled:
        outcomes = adaptive.run_until_settled(exp, seed_values, overrides, max_seeds, test=test, family=family, **common)
    elif multiples:
        outcomes = adaptive.run_budget_grid(exp, seed_values, overrides, multiples, force=force, **common)
    else:
        outcomes = grid.run_grid(exp, seed_values, overrides, force=force, **common)
    report_outcomes(exp.name, outcomes)


@app.command()
@friendly_errors
def worker(experiment: Annotated[str, typer.Argument(help="The grid's name (its experiment's name).")],
           storage: StorageOption = None,
           jobs: Annotated[int | None, typer.Option(
               help="Worker processes on this machine (default: one per core, or per --gpus-per-cell GPUs)")] = None,
           checkpoint_dir: CheckpointDirOption = None, checkpoint_every: CheckpointEveryOption = None,
           gpus_per_cell: GpusOption = 1, nproc: NprocOption = None, stall_timeout: StallOption = None,
           progress: ProgressOption = True) -> None:
    """Pull runs of a planned grid from the queue and train them until the queue is empty (any number
    of workers, on any machine sharing the queue, the tracking server and the checkpoint folder)."""
    from ablate import grid

    if jobs is not None and jobs < 1:
        raise typer.BadParameter(f"must be >= 1, got {jobs}", param_hint="--jobs")
    name = Path(experiment).stem if experiment.endswith(".toml") else experiment
    check_count(gpus_per_cell, 1, "--gpus-per-cell")
    options = worker_options(storage, checkpoint_dir, checkpoint_every, nproc, stall_timeout)
    # A worker process sees only its own GPUs: a cell on --nproc N processes needs N of them.
    outcomes = grid.run_worker(name, options, jobs=jobs, gpus_per_cell=max(gpus_per_cell, options.nproc),
                               show_progress=progress)
    report_outcomes(name, outcomes)


@app.command()
@friendly_errors
def search(experiment: Annotated[str, typer.Argument(help="Experiment name or path (with a [search] table).")],
           trials: Annotated[int | None, typer.Option(help="Trials to run (default: the file's).")] = None,
           jobs: Annotated[int, typer.Option(help="Trials run at once, each in its own process.")] = 1,
           seed: Annotated[int, typer.Option(help="Seed of the TPE sampler.")] = 0,
           set_: SetOption = None, data: DataOption = None, progress: ProgressOption = True) -> None:
    """Optuna TPE over the space the experiment declares, pruning on the intermediate AP."""
    from ablate import grid
    from ablate.experiments import load_experiment

    exp = load_experiment(experiment)
    n = trials if trials is not None else (exp.search.trials if exp.search else 0)
    grid.check_search(exp, n, jobs, seed)
    options = worker_options(None, None, 0)
    best = grid.run_search(exp, n, overrides_from(set_, data), options=options, jobs=jobs, seed=seed,
                           console=console, show_progress=progress)
    if best:
        params, value = best
        console.print(escape(f"best {exp.search.metric} {100 * value:.1f} with {params}"))
    else:
        console.print("no trial completed yet")


@app.command()
@friendly_errors
def report(experiment: Annotated[str, typer.Argument(help="Experiment name or path.")],
           out: Annotated[Path | None, typer.Option(help="Folder (default: reports/NAME).")] = None,
           set_: SetOption = None, data: DataOption = None,
           family: Annotated[bool, typer.Option(
               "--family", help="Judge the recorded comparisons as one family (Holm): stricter, so "
               "allowed after the runs")] = False) -> None:
    """Tables (Markdown like the paper's, CSV, LaTeX) and seaborn plots from the tracked runs, also
    attached to the grid's MLflow parent run. Without --data / --set: those the runs were made with."""
    from ablate.experiments import load_experiment
    from ablate.paths import check_writable_folder

    exp = load_experiment(experiment)
    given, out = given_overrides(set_, data), check_writable_folder(out or Path("reports") / exp.name, "--out")
    from ablate.report.build import build_report  # MLflow, seaborn: only once the input is known good

    written = build_report(exp, given, out, family=family,
                           say=lambda line: console.print(escape(line), soft_wrap=True, highlight=False))
    for path in written.values():
        console.print(escape(f"wrote {path}"))


@app.command()
@friendly_errors
def findings(reports: Annotated[Path, typer.Option(help="Folder of the ablations' reports.")] = Path("reports"),
             readme: Annotated[Path | None, typer.Option(
                 help="Also write the table between the findings markers of this file (e.g. docs/results.md).")] = None) -> None:
    """The paper's Table 1 findings checked against the reports: paper, ours (mean, 95% CI, seeds),
    whether each holds. Writes REPORTS/findings.md."""
    from rich.table import Table

    from ablate.errors import AblateError
    from ablate.findings import (FOLLOW_UP_HEADER, FOLLOW_UPS, across_budgets, headline_markdown, judge_reports,
                                 holds_text, markdown, measured_budgets, replace_between_markers, supersede)
    from ablate.paths import check_writable_folder

    check_writable_folder(reports, "--reports")
    verdicts, follow_ups = judge_reports(reports), judge_reports(reports, FOLLOW_UPS)
    supersede(verdicts + follow_ups)  # one verdict per comparison: the largest experiment's
    # Reports measured at several budgets (`ablate run --budgets`): each finding judged at every one.
    budgets = bool(measured_budgets(reports))
    across = (across_budgets(reports), across_budgets(reports, FOLLOW_UPS)) if budgets else (None, None)
    for title, columns, rows, over in (
            ("The paper's findings on this benchmark", ("finding", "paper"), verdicts, across[0]),
            ("Follow-ups: why a finding fails", ("hypothesis", "for"), follow_ups, across[1])):
        table = Table(title=title)
        for column in (*columns, "ours", "holds", *(("at every budget",) if over else ())):
            table.add_column(column)
        for i, v in enumerate(rows):
            table.add_row(escape(v.finding), escape(v.paper), escape(v.ours), escape(holds_text(v)),
                          *((escape(over[i].text()),) if over else ()))
        console.print(table)
    def block(prefix: str = "") -> str:
        return (f"{markdown(verdicts, across=across[0], link_prefix=prefix)}\nFollow-ups, each an experiment of its own "
                "testing why a finding fails here (its rule fixed before its runs), one verdict per comparison (the "
                "largest experiment's):\n\n"
                f"{markdown(follow_ups, FOLLOW_UP_HEADER, across[1], link_prefix=prefix)}")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "findings.md").write_text(
        "# The paper's Table 1 findings on this benchmark\n\nWritten by `ablate findings` from the reports' "
        f"results.csv.\n\n{block()}\nEvery cell:\n\n{headline_markdown(reports)}")
    console.print(escape(f"wrote {reports / 'findings.md'}"))
    if readme is not None:
        if not readme.is_file():
            raise AblateError(f"{readme}: no such file")
        prefix = os.path.relpath(reports, readme.parent) + "/"
        text = replace_between_markers(readme.read_text(), f"{block(prefix)}\n{headline_markdown(reports, prefix)}", str(readme))
        readme.write_text(text)
        console.print(escape(f"wrote the findings into {readme}"))


@app.command()
@friendly_errors
def ui(experiment: Annotated[str | None, typer.Argument(
           help="An ablation (name or experiments/NAME.toml): print the URLs of its report page and Runs table.")] = None,
       port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
       open_: Annotated[bool, typer.Option(
           "--open", help="Open that page in a browser once the UI answers.")] = False,
       genai: Annotated[bool, typer.Option(
           "--genai", help="Also start MLflow's job runner for its GenAI features (7 more processes).")] = False) -> None:
    """The MLflow UI over the project's store, on http://127.0.0.1:PORT (Ctrl-C stops it), with the
    URLs of each ablation's report page and Runs table (MLflow 3 would open its empty GenAI pages)."""
    from ablate import ui as mlflow_ui

    name = Path(experiment).stem if experiment and experiment.endswith(".toml") else experiment
    raise typer.Exit(mlflow_ui.run(name, port, open_, genai,
                                   say=lambda line: console.print(escape(line), soft_wrap=True, highlight=False),
                                   warn=lambda line: console.print(escape(line), style="yellow")))


analyze_app = typer.Typer(help="Diagnostics of trained models (the paper's figures).", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("loss-cdf")
@friendly_errors
def analyze_loss_cdf(checkpoint: Annotated[Path, typer.Argument(help="A trained checkpoint.pt (e.g. focal, gamma 2).")],
                     gammas: Annotated[str, typer.Option(help="Comma-separated gammas.")] = "0,0.5,1,2",
                     out: Annotated[Path | None, typer.Option(help="Folder (default: beside the checkpoint).")] = None,
                     max_images: Annotated[int, typer.Option(help="Val images to use (0: all).")] = 0,
                     set_: SetOption = None) -> None:
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
def data_synth(set_: SetOption = None,
               preset: Annotated[str, typer.Option(help="Preset whose anchors measure the imbalance.")] = "tiny",
               progress: ProgressOption = True) -> None:
    """Write the embedded data set (COCO layout) into the cache; print where, and its statistics."""
    from ablate import builders
    from ablate.imbalance import anchor_balance
    from ablate.config import build_config
    from ablate.data.synth import synth_stats

    cfg = build_config(preset, overrides_from(set_, "synth"))
    root = builders.data_root(cfg, progress=progress)
    print(root)
    stats = synth_stats(root)
    for key, value in stats.items():
        console.print(escape(f"  {key}: {value}"))
    train_set = builders.build_dataset(cfg.data, root, cfg.data.train_split, train=False, progress=progress)
    b = anchor_balance(train_set, builders.build_anchor_generator(cfg), builders.build_matcher(cfg))
    console.print(f"  anchors ({preset} preset): {b['anchors_per_image']:.0f} per image, foreground "
                  f"{b['fg_per_image']:.1f}, background {b['bg_per_image']:.0f}: 1:{b['bg_per_fg']:.0f} "
                  f"(x {len(train_set.category_names)} classes in the sigmoid outputs)")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
