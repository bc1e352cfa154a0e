"""Training images/s of one run on 1 and on N processes (DDP), and where its evaluation goes.

    .venv/bin/python benchmarks/ddp_throughput.py                    # tiny preset, 1 vs 2 processes
    .venv/bin/python benchmarks/ddp_throughput.py --nproc 4 --repeats 3 --iterations 200

Each repeat trains the same config (`ablate train tiny`, in a fresh process, as a user runs it)
once per process count, the counts interleaved (1, N, 1, N, ...) so that a slow spell of the
machine hits both sides alike. Throughput is the median img/s of the logged intervals after the
first (start-up and warm-up are in the first); a run's global batch is the same at every count.
On CPU the processes use gloo and share the cores out (one process gets all of them). The
evaluation runs on rank 0 after training: its time is printed beside the training time.

On a machine with CUDA GPUs the same command compares 1 and N GPUs (nccl) with AMP and
channels_last, the settings of torchvision's reference trainer (`--amp`, channels_last), at
the config given by --preset (e.g. `--preset paper --data coco:PATH` for ResNet-50-FPN 600 px).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_once(nproc: int, args: argparse.Namespace, out: Path) -> dict:
    """One `ablate train` in a fresh process; its img/s (median of the intervals after the first),
    training and evaluation seconds."""
    command = [sys.executable, str(REPO / "cli.py"), "train", args.preset, "--no-progress", "--out", str(out),
               "--nproc", str(nproc), "--set", f"train.iterations={args.iterations}", "--set", "train.log_every=10"]
    if args.data:
        command += ["--data", args.data]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ablate train --nproc {nproc} failed:\n{done.stderr[-2000:]}")
    [run_dir] = [p for p in out.iterdir() if p.is_dir()]
    intervals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"img_per_s": statistics.median(m["img_per_s"] for m in intervals[1:]),
            "train_s": summary["train_seconds"], "eval_s": summary["eval_seconds"], "AP": summary["metrics"]["AP"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="experiment to train (default tiny)")
    parser.add_argument("--data", default=None, help="--data of ablate train (default: the experiment's)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP side (default 2)")
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() \
        else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset}: {args.iterations} iterations, {args.repeats} repeats, 1 vs {args.nproc} processes on {device}")
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU case (1 vs N GPUs, nccl, AMP, channels_last) was not measured")
    results: dict[int, list[dict]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for nproc in results:
                out = Path(folder, f"{nproc}-{repeat}")
                out.mkdir()
                results[nproc].append(train_once(nproc, args, out))
                r = results[nproc][-1]
                print(f"  repeat {repeat + 1} nproc {nproc}: {r['img_per_s']:.1f} img/s, train {r['train_s']:.1f} s, "
                      f"eval on rank 0 {r['eval_s']:.1f} s, AP {100 * r['AP']:.1f}")
    one = [r["img_per_s"] for r in results[1]]
    many = [r["img_per_s"] for r in results[args.nproc]]
    ratios = [b / a for a, b in zip(one, many)]
    print(f"\n| processes | img/s (median of {args.repeats}) | min-max | eval share of the run |")
    print("|---|---|---|---|")
    for nproc, runs in results.items():
        speeds = [r["img_per_s"] for r in runs]
        share = statistics.median(r["eval_s"] / (r["eval_s"] + r["train_s"]) for r in runs)
        print(f"| {nproc} | {statistics.median(speeds):.1f} | {min(speeds):.1f}-{max(speeds):.1f} | {100 * share:.0f}% |")
    print(f"\n{args.nproc} processes / 1: {statistics.median(ratios):.2f}x (pairwise median; "
          f"min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
