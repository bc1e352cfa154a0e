"""Real servers for the tests and benchmarks: PostgreSQL from the machine's own binaries, and an
MLflow tracking server over it, both on 127.0.0.1, both stopped on exit.

PostgreSQL refuses to run as root: as root the server runs as the `postgres` user (Debian's
package creates it); as anyone else, as that user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ablate.ui import NO_JOBS

USER, PASSWORD = "ablate", "s3cret-pw"

# The server tests' grid: three cells long enough to be killed or hung mid-way (each writes a
# resume checkpoint every 20 of its 100 iterations), short enough for the suite: the tiny model at
# 64 px, batches of 4 (~3 CPU s of training a cell; 128 px and batches of 8 took ~13 s). What these
# tests check (claims, stalls, resumes, each step once) does not depend on the image size.
THREE_CELL_GRID = """
description = "three cells for the server tests"
preset = "tiny"
seeds = [0]

[config]
synth.num_train = 64
synth.num_val = 16
data.min_size = 64
data.max_size = 64
train.batch_size = 4
train.iterations = 100
train.warmup_iters = 10
train.log_every = 5
data.num_workers = 0

[grid]
"loss.gamma" = [0.0, 1.0, 2.0]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path:
    """The folder of initdb / pg_ctl (Debian: /usr/lib/postgresql/15/bin, named by pg_config)."""
    try:
        return Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"PostgreSQL's binaries not found (pg_config --bindir): {e}") from e


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class Postgres:
    port: int
    folder: Path

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster in a temporary folder (removed after) with user `ablate`
    (password auth over TCP). Not under pytest's tmp_path: the server's user must be able to
    reach its folder, and pytest's is private to root."""
    bindir = postgres_bindir()
    folder = Path(tempfile.mkdtemp(prefix="ablate-pg-"))
    folder.chmod(0o755)
    data = folder / "pgdata"
    password_file = folder / "pw"
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(password_file, "postgres")
    subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={password_file}",
                                    "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    port = free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                    str(data / "server.log"), "-w", "start"]), check=True, capture_output=True)
    try:
        yield Postgres(port, folder)
    finally:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


class MlflowServer:
    """`mlflow server` over `backend_uri` with proxied artifacts in `artifacts`, on one port for its
    whole life: stop() and start() it again (a tracking server that goes away mid-grid)."""

    def __init__(self, backend_uri: str, artifacts: Path, timeout: float = 120):
        self.backend_uri, self.artifacts, self.timeout = backend_uri, artifacts, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = artifacts.parent / f"mlflow-server-{self.port}.log"

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            # Without MLflow's GenAI job runner (seven more processes; ~6 CPU s of the ~14 a start took).
            self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                          self.backend_uri, "--artifacts-destination", str(self.artifacts),
                                          "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2"],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **NO_JOBS})
        deadline = time.time() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, timeout: float = 120) -> Iterator[str]:
    """`mlflow server` over `backend_uri` with proxied artifacts in `artifacts`; yields its URL."""
    with restartable_mlflow_server(backend_uri, artifacts, timeout) as server:
        yield server.url


@contextlib.contextmanager
def restartable_mlflow_server(backend_uri: str, artifacts: Path, timeout: float = 120) -> Iterator[MlflowServer]:
    """An MlflowServer, started; stopped on exit."""
    server = MlflowServer(backend_uri, artifacts, timeout)
    try:
        server.start()
        yield server
    finally:
        server.stop()
