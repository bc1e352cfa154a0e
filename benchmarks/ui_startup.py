"""How light `ablate ui` is, beside MLflow's own `mlflow ui` as `ablate ui` used to start it.

Run in a folder with an mlflow.db (e.g. after `ablate run smoke`):

    .venv/bin/python benchmarks/ui_startup.py [--repeats 2]

For each command, alternately: seconds from its start until /health answers, then (5 s later) the
processes it runs (itself and every descendant), their resident memory (RSS, and USS: the memory
only they use), their CPU seconds so far, the 1-minute load, and the seconds a SIGINT (Ctrl-C)
takes to stop them all, with any process left behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(port: int) -> dict[str, list[str]]:
    store = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    ablate = str(Path(sys.executable).with_name("ablate"))
    return {"ablate ui": [ablate, "ui", "--port", str(port)],
            "mlflow ui (defaults)": [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
                                     "--host", "127.0.0.1", "--port", str(port)]}


def measure(cmd: list[str], port: int) -> str:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            return f"exited with {proc.returncode} before answering"
        time.sleep(0.1)
    ready = time.monotonic() - start
    time.sleep(5)
    root = psutil.Process(proc.pid)
    procs = [root, *root.children(recursive=True)]
    rss = uss = cpu = 0.0
    for p in procs:
        with_info = p.memory_full_info()
        rss, uss = rss + with_info.rss, uss + with_info.uss
        times = p.cpu_times()
        cpu += times.user + times.system + times.children_user + times.children_system
    load = os.getloadavg()[0]
    stop = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the command's process group
    proc.wait(timeout=120)
    stopped = time.monotonic() - stop
    time.sleep(1)
    left = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for pid in left:  # not to leave a measurement's server behind
        os.kill(pid, signal.SIGKILL)
    return (f"answers after {ready:4.1f} s; {len(procs):2d} processes, RSS {rss / 2**20:5.0f} MiB, "
            f"USS {uss / 2**20:5.0f} MiB, CPU {cpu:4.1f} s; load {load:.1f}; Ctrl-C stops it in {stopped:.1f} s "
            f"(exit {proc.returncode}), {len(left)} left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not Path("mlflow.db").is_file():
        raise SystemExit("no mlflow.db here: run in a folder with tracked runs (e.g. after `ablate run smoke`)")
    for _ in range(args.repeats):
        for name, cmd in commands(port := free_port()).items():
            print(f"{name:21s} {measure(cmd, port)}", flush=True)


if __name__ == "__main__":
    main()
