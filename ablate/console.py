"""The terminal of the `ablate` commands: one console on stderr for what the package says,
`say` for a plain line of it, `friendly_errors`, which turns a user's mistake into one red line
and an exit code, never a traceback, and `print_run`, what `ablate train` says of its run.
"""

from __future__ import annotations

import functools
import os

import typer
from rich.console import Console
from rich.markup import escape

from ablate.errors import AblateError, mask_urls, one_line, printable
from ablate.runs import Outcome, RunRecord

console = Console(stderr=True)


def say(line: str) -> None:
    """One line on stderr, as it is (no markup, no wrapping)."""
    console.print(escape(line), soft_wrap=True, highlight=False)


def friendly_errors(command):
    """Turn user errors (AblateError) into one red line and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
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


def metrics_text(metrics: dict[str, float]) -> str:
    """'AP 31.2  AP50 ...' in percent; COCO's -1 (no object of that size) shows as n/a."""
    return "  ".join(f"{k} {100 * metrics[k]:.1f}" if metrics[k] >= 0 else f"{k} n/a"
                     for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"))


def print_run(run: RunRecord, resumable: bool) -> int:
    """How the run of `ablate train` ended, and its exit code: 0 finished, 130 interrupted (with
    where it goes on from: its resume checkpoint when `resumable`), 3 otherwise. Only rank 0 of a
    torchrun launch speaks."""
    code = {Outcome.FINISHED: 0, Outcome.INTERRUPTED: 130}.get(run.outcome, 3)
    if run.rank:
        return code
    if run.outcome is Outcome.INTERRUPTED:
        kept = (f"resume checkpoint {run.resume_checkpoint} (go on with --resume or the same command)"
                if resumable else "no resume checkpoint (--checkpoint-every N writes one)")
        console.print(escape(f"interrupted at iteration {run.iterations}: {kept}; run folder {run.run_dir}"),
                      style="yellow")
    elif run.outcome is Outcome.DIVERGED:
        console.print(f"[red]diverged[/red] at iteration {run.diverged_at} (non-finite loss); "
                      f"logged metrics kept in {escape(run.run_dir)}")
    else:
        console.print(f"[green]finished[/green] {run.iterations} iterations in {run.train_seconds:.0f} s: "
                      + metrics_text(run.metrics))
        console.print(escape(f"run folder: {run.run_dir}"))
    return code
