"""Where a grid's wall time goes, and its peak memory per worker: `ablate run` timed end to end.

    .venv/bin/python benchmarks/grid_time.py                          # gamma-sweep, its own seeds
    .venv/bin/python benchmarks/grid_time.py gamma-sweep --seeds 1 --jobs 1
    .venv/bin/python benchmarks/grid_time.py --family --json out.json # + the Table 1 family estimate

Runs `ablate run NAME` as a user would (a fresh process, default jobs unless --jobs) in a scratch
folder with its own MLflow store, then `ablate report NAME`, and reads the tracked runs back. The
embedded data set comes from the usual cache (generated first, outside the timing, if missing).

The breakdown is in worker-seconds (jobs x wall): each run's phases from its summary.json (data
decode, setup = anchor statistics and building the parts, train, eval, write = loss plot and
checkpoint), its tracking (the MLflow run's life minus those phases: claim, logging, artifacts),
the gaps between one worker's runs (queue, claim checks), the start (command start to each
worker's first run: imports, planning, spawning) and the end (last run to the command's exit:
the parent run's summary). Peak memory is the largest resident set of any one process of the
command, sampled every 0.2 s.

--family estimates the paper's Table 1 family (alpha-ce, gamma-sweep, anchors, ohem-vs-focal,
prior-init at 3 seeds; 36 cells, 108 runs) from this grid's measured wall per run, scaled per
experiment by the training time its committed reports/*/runs.csv recorded relative to
gamma-sweep's (OHEM's step is slower): an estimate from per-run figures, not a re-run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
FAMILY = ("alpha-ce", "gamma-sweep", "anchors", "ohem-vs-focal", "prior-init")
PHASES = ("data", "setup", "train", "eval", "write")


class TreePeak:
    """Peak resident memory of each process of a command's process tree, sampled by a thread."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline()[1:3])[-60:]
                except psutil.Error:
                    continue
                if rss > self.peaks.get(proc.pid, ("", 0))[1]:
                    self.peaks[proc.pid] = (name, rss)
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed_command(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, TreePeak, str]:
    start = time.time()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = TreePeak(proc.pid)
    output, _ = proc.communicate()
    peak.stop()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return start, peak, output


def tracked_runs(folder: Path, name: str) -> list[dict]:
    """Each finished child run: its start and end (s since the epoch), owner, and phases."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = []
    for run in client.search_runs([experiment.experiment_id], max_results=10_000):
        tags = run.data.tags
        if "ablate.run_dir" not in tags:  # the parent run, or a run that never finished
            continue
        run_dir = folder / tags["ablate.run_dir"]
        summary = json.loads((run_dir / "summary.json").read_text())
        runs.append({"start": run.info.start_time / 1000, "end": run.info.end_time / 1000,
                     "hash": tags.get("ablate.config_hash"),
                     "owner": tags.get("ablate.owner", ""), "phases": summary.get("phase_seconds", {}),
                     "AP": run.data.metrics.get("AP"), "cell": tags.get("ablate.cell")})
    return runs


def breakdown(start: float, end: float, runs: list[dict], jobs: int) -> dict[str, float]:
    """Worker-seconds per part; they add up to jobs x wall."""
    parts: dict[str, float] = defaultdict(float)
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_worker[run["owner"]].append(run)
        for phase in PHASES:
            parts[phase] += run["phases"].get(phase, 0.0)
        parts["tracking"] += (run["end"] - run["start"]) - sum(run["phases"].get(p, 0.0) for p in PHASES)
    for own in by_worker.values():
        own.sort(key=lambda r: r["start"])
        parts["start"] += own[0]["start"] - start
        parts["between runs"] += sum(b["start"] - a["end"] for a, b in zip(own, own[1:]))
        parts["end"] += end - own[-1]["end"]
    # Workers that got no run at all idled the whole grid (more workers than runs).
    parts["idle workers"] += max(0, jobs - len(by_worker)) * (end - start)
    return dict(parts)


def family_estimate(per_run: float, seeds: int = 3) -> dict[str, float]:
    """Wall seconds of each Table 1 experiment at `seeds` seeds: its cells x seeds x `per_run`
    (gamma-sweep's measured wall per run), scaled by its recorded training time over gamma-sweep's."""
    def median_train(name: str) -> float:
        rows = list(csv.DictReader(open(REPO / "reports" / name / "runs.csv")))
        return statistics.median(float(r["train_seconds"]) for r in rows if r.get("train_seconds"))

    sys.path.insert(0, str(REPO))
    from ablate.experiments import load_experiment

    base = median_train("gamma-sweep")
    return {name: len(load_experiment(name).cells()) * seeds * per_run * median_train(name) / base for name in FAMILY}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", default="gamma-sweep")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the experiment file's seeds)")
    parser.add_argument("--jobs", type=int, help="workers (default: ablate's own default)")
    parser.add_argument("--set", action="append", default=[], help="key=value, passed to ablate run")
    parser.add_argument("--family", action="store_true", help="estimate the Table 1 family (gamma-sweep only)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="grid-time-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, str(REPO / "cli.py")]
    subprocess.run([*cli, "data", "synth", "--no-progress"], cwd=folder, env=env, capture_output=True)  # the set exists before the clock
    experiment_file = str(REPO / "experiments" / f"{args.experiment}.toml")
    command = [*cli, "run", experiment_file, "--no-progress", *[a for kv in args.set for a in ("--set", kv)]]
    if args.seeds is not None:
        command += ["--seeds", str(args.seeds)]
    if args.jobs is not None:
        command += ["--jobs", str(args.jobs)]
    start, peak, output = timed_command(command, folder, env)
    end = time.time()
    report_start, _, _ = timed_command([*cli, "report", experiment_file, "--out", str(folder / "reports")], folder, env)
    report_seconds = time.time() - report_start

    runs = tracked_runs(folder, args.experiment)
    jobs = len({r["owner"] for r in runs}) if args.jobs is None else args.jobs
    wall = end - start
    parts = breakdown(start, end, runs, jobs)
    total = jobs * wall
    print(f"{args.experiment}: {len(runs)} runs, {jobs} worker(s), wall {int(wall // 60)} min {wall % 60:.0f} s "
          f"({wall / len(runs):.1f} s per run); ablate report {report_seconds:.1f} s")
    print(f"{'part':14s} {'worker-s':>9s} {'share':>6s} {'per run':>8s}")
    for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{part:14s} {seconds:9.1f} {100 * seconds / total:5.1f}% {seconds / len(runs):8.2f}")
    fixed = sum(parts.get(p, 0.0) for p in ("data", "setup", "write", "tracking", "between runs"))
    train = parts.get("train", 0.0)
    print(f"fixed per-run costs (data, setup, write, tracking, between runs): {fixed / len(runs):.2f} s per run, "
          f"{100 * fixed / (fixed + train + parts.get('eval', 0.0)):.1f}% of a run; evaluation "
          f"{parts.get('eval', 0.0) / len(runs):.2f} s per run")
    workers = sorted(peak.peaks.values(), key=lambda v: -v[1])
    print("peak resident memory per process: " + ", ".join(f"{rss / 2**20:.0f} MB ({name})" for name, rss in workers[:4]))
    same_science(runs, REPO / "reports" / args.experiment / "runs.csv")
    figures = {"experiment": args.experiment, "runs": len(runs), "jobs": jobs, "wall_s": wall,
               "report_s": report_seconds, "parts_worker_s": parts,
               "peak_rss_mb": [rss / 2**20 for _, rss in workers], "cpu": cpu_name(), "cores": os.cpu_count(),
               "command": " ".join(command[1:])}
    if args.family:
        estimate = family_estimate(wall / len(runs))
        for name, seconds in estimate.items():
            print(f"  {name:14s} {seconds / 60:6.1f} min (estimated, 3 seeds)")
        print(f"Table 1 family, 3 seeds: {sum(estimate.values()) / 3600:.2f} h (estimated)")
        figures["family_estimate_s"] = estimate
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def same_science(runs: list[dict], recorded: Path) -> None:
    """Each run's AP beside the committed report's run of the same config hash (same seed, same
    config; the thread count and CPU may differ, and with them the float rounding)."""
    if not recorded.is_file():
        return
    before = {row["config_hash"]: float(row["AP"]) for row in csv.DictReader(open(recorded)) if row.get("AP")}
    pairs = [(r["cell"], 100 * r["AP"], 100 * before[r["hash"]]) for r in runs
             if r["AP"] is not None and r["hash"] in before]
    for cell, now, then in sorted(pairs):
        print(f"  {cell:16s} AP {now:5.1f} now, {then:5.1f} in {recorded.parent.name}/runs.csv ({now - then:+.1f})")
    if pairs:
        diffs = [now - then for _, now, then in pairs]
        print(f"same configs as the committed report: {len(pairs)} runs, AP difference mean {statistics.mean(diffs):+.2f}, "
              f"largest |difference| {max(abs(d) for d in diffs):.2f} AP points")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
