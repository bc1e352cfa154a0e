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


def test_the_server_is_light_unless_genai_is_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(ui.subprocess, "Popen", lambda cmd, **kw: calls.append((cmd, kw["env"])))
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    ui.start("sqlite:///x.db", 5001)
    ui.start("sqlite:///x.db", 5001, genai=True)
    (light, light_env), (full, full_env) = calls
    assert light[light.index("--workers") + 1] == "1" and light_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION" not in full_env  # MLflow's default: the job runner starts


def test_which_stores_are_checked_before_the_server_starts(tmp_path):
    (tmp_path / "mlflow.db").write_text("")
    assert ui._is_ready_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not ui._is_ready_store(f"sqlite:///{tmp_path / 'new.db'}")  # created first: one migration at a time
    assert not ui._is_ready_store("http://127.0.0.1:9")  # a dead server: one line, no UI started
    assert ui._is_ready_store("postgresql://u@h/db")
