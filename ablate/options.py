"""The command line's options, each flag with its help declared once (cli.py wires them to the
commands). Typer reads a parameter's flag, default and help from these `Annotated` types; several
commands share most of them (`--set`, `--data`, the worker options of `run` and `worker`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ablate.config import parse_set
from ablate.data.source import HELP as DATA_HELP, DataSource

Experiment = Annotated[str, typer.Argument(help="Experiment name (experiments/NAME.toml) or path.")]
Checkpoint = Annotated[Path, typer.Argument(help="A checkpoint.pt written by `ablate train`.")]
Set = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: key=value (repeatable), "
                                               "e.g. --set loss.gamma=1 --set train.iterations=50")]
Data = Annotated[str | None, typer.Option("--data", help=DATA_HELP)]  # the forms, from ablate.data.source
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
Nproc = Annotated[int | None, typer.Option(
    "--nproc", help="Processes training each run together (DDP: one per GPU, or per CPU core); they share "
    "out the global batch (train.nproc, default 1). Or launch `ablate train` under torchrun")]
Folder = Annotated[Path | None, typer.Option("--out", help="Folder (default: beside the checkpoint).")]

# `ablate eval` and `ablate infer`
EvalFolder = Annotated[Path | None, typer.Option(
    "--out", help="Where to write detections.json and eval.json (default: beside the checkpoint).")]
Images = Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG).")]
DetectionsFolder = Annotated[Path, typer.Option("--out", help="Folder for the annotated PNGs.")]
ScoreMin = Annotated[float, typer.Option(help="Draw detections scoring at least this.")]

# `ablate train`
Seed = Annotated[int | None, typer.Option(help="Seed (default: the experiment's first).")]
RunsFolder = Annotated[Path | None, typer.Option("--out", help="Folder for run folders (train.out_dir).")]
Resume = Annotated[Path | None, typer.Option(
    "--resume", help="Continue from the resume checkpoint of a stopped run of the same config.")]
TrainCheckpointEvery = Annotated[int, typer.Option(
    "--checkpoint-every", min=0, help="Write a resume checkpoint every N iterations and when stopped "
    "(OUT/resume-HASH.pt, or the --resume file); running the same command again goes on from it.")]
Backend = Annotated[str | None, typer.Option(
    help="torch.distributed backend with --nproc: auto (nccl on CUDA, gloo on CPU), gloo or nccl (train.backend)")]

# `ablate run` and `ablate worker`
Seeds = Annotated[int | None, typer.Option(help="Run seeds 0..N-1 (default: the file's seeds).")]
RunJobs = Annotated[int | None, typer.Option(
    "--jobs", help="Workers of this command, each a process (default: one per core, or per --gpus-per-cell GPUs, "
    "at most one per run; 0, the default with a shared --storage: only enqueue)")]
WorkerJobs = Annotated[int | None, typer.Option(
    "--jobs", help="Worker processes on this machine (default: one per core, or per --gpus-per-cell GPUs)")]
Preset = Annotated[str | None, typer.Option(help="Budget preset instead of the file's (e.g. paper).")]
Storage = Annotated[str | None, typer.Option(
    "--storage", help="The queue shared by workers on many machines: postgresql://USER:PASSWORD@HOST:PORT/DB "
    "(default: $ABLATE_STORAGE, else a journal file in ./.ablate)")]
CheckpointDir = Annotated[Path | None, typer.Option(
    "--checkpoint-dir", help="Where resume checkpoints go; every worker that may resume a run must read it "
    "(default: $ABLATE_CHECKPOINT_DIR, else ./.ablate/checkpoints)")]
CheckpointEvery = Annotated[int | None, typer.Option(
    "--checkpoint-every", help="Iterations between resume checkpoints (default: a tenth of the run, 50-1000; 0: none)")]
StallTimeout = Annotated[float | None, typer.Option(
    "--stall-timeout", help="Seconds a run may go without progress (an iteration, an evaluated batch, a checkpoint) "
    "before it counts as stalled, is ended and resumes on another worker (default: $ABLATE_STALL_TIMEOUT, else 50 "
    "of its own steps, at least 120 s; 0: never)")]
GpusPerCell = Annotated[int, typer.Option(
    "--gpus-per-cell", help="GPUs each worker process gets (CUDA_VISIBLE_DEVICES; at least --nproc)")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show the plan, run nothing.")]
Force = Annotated[bool, typer.Option("--force", help="Rerun cells that are already done.")]
UntilSettled = Annotated[bool, typer.Option(
    "--until-settled", help="Add seeds only to the cells of comparisons the sequential rule has not "
    "settled yet (the file's `comparisons`, else each cell vs the baseline), until none is open")]
MaxSeeds = Annotated[int | None, typer.Option(
    "--max-seeds", help="With --until-settled: the rule's last look (default: the file's sequential table, else 8)")]
Test = Annotated[str | None, typer.Option(
    "--test", help="With --until-settled: t (mean AP, default) or signed-rank (a typical seed, distribution-free)")]
Family = Annotated[bool, typer.Option(
    "--family", help="With --until-settled: the comparisons as one family (Holm, family-wise alpha)")]
Budgets = Annotated[str | None, typer.Option(
    "--budgets", help="Run every cell x seed at these multiples of its schedule, e.g. 1,2,4 "
    "(the LR steps scale with it; 1 is the cell as declared)")]

# `ablate search`, `report`, `findings`, `ui`, `analyze`, `data`
Grid = Annotated[str, typer.Argument(help="The grid's name (its experiment's name).")]
SearchExperiment = Annotated[str, typer.Argument(help="Experiment name or path (with a [search] table).")]
TrainedCheckpoint = Annotated[Path, typer.Argument(help="A trained checkpoint.pt (e.g. focal, gamma 2).")]
Trials = Annotated[int | None, typer.Option(help="Trials to run (default: the file's).")]
SearchJobs = Annotated[int, typer.Option("--jobs", help="Trials run at once, each in its own process.")]
SamplerSeed = Annotated[int, typer.Option("--seed", help="Seed of the TPE sampler.")]
ReportFolder = Annotated[Path | None, typer.Option("--out", help="Folder (default: reports/NAME).")]
ReportFamily = Annotated[bool, typer.Option(
    "--family", help="Judge the recorded comparisons as one family (Holm): stricter, so allowed after the runs")]
Reports = Annotated[Path, typer.Option(help="Folder of the ablations' reports.")]
FindingsPage = Annotated[Path | None, typer.Option(
    "--readme", help="Also write the table between the findings markers of this file (e.g. docs/results.md).")]
Ablation = Annotated[str | None, typer.Argument(
    help="An ablation (name or experiments/NAME.toml): print the URLs of its report page and Runs table.")]
Port = Annotated[int, typer.Option(help="Port on 127.0.0.1.")]
OpenPage = Annotated[bool, typer.Option("--open", help="Open that page in a browser once the UI answers.")]
GenAI = Annotated[bool, typer.Option(
    "--genai", help="Also start MLflow's job runner for its GenAI features (7 more processes).")]
Gammas = Annotated[str, typer.Option(help="Comma-separated gammas.")]
MaxImages = Annotated[int, typer.Option(help="Val images to use (0: all).")]
AnchorPreset = Annotated[str, typer.Option("--preset", help="Preset whose anchors measure the imbalance.")]


# What --set and --data mean: dotted-key config overrides.


def overrides_from(sets: list[str] | None, data: str | None) -> dict[str, Any]:
    """--set pairs and the --data shorthand as dotted-key overrides."""
    out: dict[str, Any] = DataSource.parse(data, "--data").overrides() if data else {}
    for assignment in sets or []:
        key, value = parse_set(assignment)
        out[key] = value
    return out


def given_overrides(sets: list[str] | None, data: str | None) -> dict[str, Any] | None:
    """overrides_from, or None when neither flag was given (report and show then use the tracked runs')."""
    return overrides_from(sets, data) if sets or data else None
