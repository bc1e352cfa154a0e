"""`ablate ui`: the MLflow UI over the project's tracking store, on 127.0.0.1, and a browser on the
ablation's Runs table when asked. The pages' URLs come from ablate.tracking (the MLflow module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser

# `mlflow ui` takes ~20 s to answer on 2 cores; a loaded machine may need a few times that.
READY_SECONDS = 120.0


def start(uri: str, port: int) -> subprocess.Popen:
    """The MLflow UI over `uri` on 127.0.0.1:port, in a process group of its own (it runs several
    worker processes, which `stop` ends together)."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    return subprocess.Popen(cmd, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()


def wait_ready(base: str, proc: subprocess.Popen, seconds: float = READY_SECONDS) -> bool:
    """Whether the UI at `base` answers its health check before `seconds` pass (False at once when
    its process ended, e.g. the port was taken)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def open_when_ready(base: str, url: str, proc: subprocess.Popen) -> bool:
    """Open `url` in the user's browser once the UI answers; False when it never did or no browser
    could be started (a headless machine)."""
    return wait_ready(base, proc) and webbrowser.open(url)
