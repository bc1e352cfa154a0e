"""ablate.ui: the UI server is waited for, and stopped with its whole process group on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from ablate import ui


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_when_ready_and_a_sigterm_stops_the_servers_group(tmp_path, monkeypatch):
    # A stand-in for `mlflow ui` (which takes ~20 s to start): a static server whose /health is a file.
    (tmp_path / "health").write_text("OK")
    port = _free_port()
    started = []

    def start(uri: str, p: int, genai: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(p), "--bind", "127.0.0.1",
                                 "--directory", str(tmp_path)], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        return proc

    monkeypatch.setattr(ui, "start", start)
    ready = []

    def on_ready() -> None:  # the UI answers: then the user's terminal closes (SIGTERM)
        ready.append(True)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    assert ui.serve("sqlite:///x.db", port, on_ready) == 0
    [proc] = started
    assert ready == [True]
    assert proc.returncode == -signal.SIGTERM  # stopped by us, not left serving the port
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_server_that_cannot_start_is_not_waited_for(monkeypatch):
    monkeypatch.setattr(ui, "start", lambda uri, p, genai=False: subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
    assert ui.serve("sqlite:///x.db", _free_port(), lambda: None) == 3  # e.g. the port was taken
