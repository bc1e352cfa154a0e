"""The lease of running work: who owns it, whether it still advances, and whether its owner lives.

One run is held in two stores at once: its trial in the queue (Optuna) and its run in the tracking
store (MLflow). Each store gives the run a `Claim` (renew it; give it back as stalled), and this
process's one `Lease` keeps them all: a thread renews every claim every `heartbeat_seconds()`,
but only while the run advances. Advancing is what the training loop, the evaluation and the
checkpoint writer report with `advance()`: a training iteration, an evaluated batch, a checkpoint
on disk. A heartbeat that a side thread beats whatever the training does proves only that the
process exists; this one proves progress (as torch elastic's and NCCL's watchdogs judge a
collective by its progress, not by its process).

A run that makes no progress for its stall timeout is *stalled*: every claim is given back as
such (the tracking run is closed with outcome `stalled`, the trial is failed and its planned run
enqueued again, where any worker resumes it from its last checkpoint), one line says so, and the
process is ended (a thread cannot stop a main thread stuck in a kernel or a collective). The stall
timeout is `STALL_STEPS` times the run's own typical step (the median gap between two advances),
at least `STALL_FLOOR_SECONDS`; `--stall-timeout` / $ABLATE_STALL_TIMEOUT set it outright (0: never).

Only the loops that do measured work are judged (`judged()`: the training loop, the evaluation);
around them (building the data set, writing the results) the claims are renewed as long as the
process lives, as before.

Liveness, from another process's point of view, is one rule (`is_alive`): the owner process
exists (checkable on its own machine only) and its last beat is younger than `MISSED_BEATS`
intervals. The tracking store applies it to a run's tags; the queue's journal to a trial's owner;
Optuna's RDB storage applies the same rule itself (its grace period is `grace_seconds()`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import psutil

from ablate.errors import AblateError

MISSED_BEATS = 3  # beats an owner may miss before its work is taken for abandoned
# A stall is this many typical steps without an advance: far above a slow step, an evaluation
# batch of large images, a garbage-collection pause or a resume checkpoint (0.03 s for the tiny
# preset, 0.7-1.6 s for ResNet-50-FPN, against its 0.2 s step: docs/many-machines.md).
STALL_STEPS = 50
# ... and never below this: a run's first steps (lazy CUDA init, cuDNN's autotuning, a loader's
# workers starting) are slow and unmeasured yet.
STALL_FLOOR_SECONDS = 120.0
MIN_SAMPLES = 5  # steps measured before the typical step says anything
STALLED_EXIT = 75  # exit status of a process ended for a stalled run (EX_TEMPFAIL: try again)


# ------------------------------------------------------------------------------ owner and liveness


def process_owner(pid: int | None = None) -> str:
    """'host:pid:start time' of a process (default: this one): who owns a running run or trial.
    Pids are reused; the start time tells a new process from the one that took the work."""
    proc = psutil.Process(pid)
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process named by `owner` (process_owner's string) still runs. One on another
    machine cannot be checked from here and counts as alive (its beats decide); no owner at all
    (work taken before owners were recorded) counts as gone."""
    if not owner:
        return False
    host, pid, _ = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    try:
        return process_owner(int(pid)) == owner
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def heartbeat_seconds() -> int:
    """Seconds between the beats of running work (`ABLATE_HEARTBEAT`, default 10), in the queue and
    in the tracking store alike."""
    try:
        return max(1, int(os.environ.get("ABLATE_HEARTBEAT", "10")))
    except ValueError:
        raise AblateError(f"ABLATE_HEARTBEAT: expected whole seconds, got {os.environ['ABLATE_HEARTBEAT']!r}") from None


def grace_seconds() -> int:
    """How old an owner's last beat may be before its work counts as abandoned."""
    return MISSED_BEATS * heartbeat_seconds()


def is_alive(owner: str | None, last_beat: float | None = None, now: float | None = None) -> bool:
    """The one liveness rule: the owner process exists (where it can be checked) and its last
    beat (epoch seconds; None: no beat recorded, the process decides) is younger than
    `grace_seconds()` (clocks synchronised, as NTP keeps them)."""
    if not owner_alive(owner):
        return False
    now = time.time() if now is None else now
    return last_beat is None or now - last_beat < grace_seconds()


# ------------------------------------------------------------------------------ progress


class ProgressClock:
    """When this process's run last advanced, and how long its steps take (the gaps between two
    advances inside judged loops). Safe to read from the lease's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._judged = 0  # depth of nested judged() loops
        self._last: float | None = None
        self._gaps: deque[float] = deque(maxlen=256)

    def reset(self) -> None:
        """Forget the previous run's steps (a worker trains many runs, each judged by its own)."""
        with self._lock:
            self._last, self._gaps = None, deque(maxlen=256)

    def advance(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._judged and self._last is not None:
                self._gaps.append(now - self._last)
            self._last = now

    @contextlib.contextmanager
    def judged(self) -> Iterator[None]:
        """A loop whose every unit of work calls advance(); the lease judges it by that."""
        with self._lock:
            self._judged += 1
            if self._judged == 1:
                self._last = time.monotonic()  # the loop's start counts: its first step is measured from it
        try:
            yield
        finally:
            with self._lock:
                self._judged -= 1

    def idle_seconds(self, now: float | None = None) -> float | None:
        """Seconds since the last advance inside a judged loop; None outside one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return now - self._last if self._judged and self._last is not None else None

    def typical_step(self) -> float | None:
        """The median gap between advances, once MIN_SAMPLES were measured."""
        with self._lock:
            gaps = list(self._gaps)
        return statistics.median(gaps) if len(gaps) >= MIN_SAMPLES else None


PROGRESS = ProgressClock()


def advance() -> None:
    """Report progress: a training iteration, an evaluated batch or a checkpoint on disk."""
    PROGRESS.advance()


def judged() -> contextlib.AbstractContextManager[None]:
    return PROGRESS.judged()


def configured_stall_timeout(option: float | None = None) -> float | None:
    """The stall timeout set outright: `option` (--stall-timeout), else $ABLATE_STALL_TIMEOUT, else
    None (derived from the run's steps). 0 switches stall detection off."""
    if option is not None:
        value, source = option, "--stall-timeout"
    elif os.environ.get("ABLATE_STALL_TIMEOUT", "").strip():
        source = "ABLATE_STALL_TIMEOUT"
        try:
            value = float(os.environ["ABLATE_STALL_TIMEOUT"])
        except ValueError:
            raise AblateError(f"ABLATE_STALL_TIMEOUT: expected seconds, got {os.environ['ABLATE_STALL_TIMEOUT']!r}") from None
    else:
        return None
    if not value >= 0 or value == float("inf"):
        raise AblateError(f"{source}: expected seconds >= 0 (0: never), got {value}")
    return value


def stall_seconds(configured: float | None, typical_step: float | None) -> float:
    """The stall timeout: `configured` when set (0: never, returned as inf), else STALL_STEPS
    typical steps, at least STALL_FLOOR_SECONDS."""
    if configured is not None:
        return configured or float("inf")
    return max(STALL_FLOOR_SECONDS, STALL_STEPS * (typical_step or 0.0))


# ------------------------------------------------------------------------------ the lease


class Claim(Protocol):
    """A run's hold on its work in one store."""

    def renew(self) -> None:
        """Beat: tell the store the run advances (and notice there when it is ours no more)."""

    def give_back_stalled(self, idle: float) -> None:
        """Record the run as stalled (after `idle` seconds without progress) and hand its work back
        to the store, for another worker to resume."""


def end_this_process(line: str) -> None:
    """Say `line`, end the run's helper processes (DDP ranks, loader workers), then this process:
    its main thread is stuck where no exception reaches it."""
    print(line, file=sys.stderr, flush=True)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(STALLED_EXIT)


class Lease:
    """This process's hold on the run it trains, in every store at once: one thread renews every
    claim while the run advances, and gives them back when it stalls.

    `clock`: where progress is read; `on_stalled(line)`: what ends the process (end_this_process;
    tests pass a recorder); `stall_timeout`: configured_stall_timeout's value (None: derived)."""

    def __init__(self, clock: ProgressClock = PROGRESS, on_stalled: Callable[[str], None] = end_this_process,
                 stall_timeout: float | None = None):
        self.clock, self.on_stalled, self.stall_timeout = clock, on_stalled, stall_timeout
        self.label = "run"  # what the stall line names
        self._claims: list[Claim] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.stalled = False

    @contextlib.contextmanager
    def hold(self, claim: Claim) -> Iterator[Claim]:
        """Keep `claim` renewed for the duration."""
        self.add(claim)
        try:
            yield claim
        finally:
            self.remove(claim)

    def add(self, claim: Claim) -> None:
        """Renew `claim` from the next beat on (a claim is made with its first beat)."""
        with self._lock:
            if not self._claims:
                self.clock.reset()
                self.stalled = False
            self._claims.append(claim)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ablate-lease", daemon=True)
                self._thread.start()

    def remove(self, claim: Claim) -> None:
        with self._lock:
            if claim in self._claims:
                self._claims.remove(claim)

    def timeout(self) -> float:
        return stall_seconds(self.stall_timeout, self.clock.typical_step())

    def _run(self) -> None:
        while not self._wake.wait(heartbeat_seconds()):
            self.tick()

    def tick(self, now: float | None = None) -> None:
        """One beat: renew every claim if the run advanced within its stall timeout, else give
        them all back as stalled (the newest claim first: the tracking run is closed before the
        queue offers the work to another worker, which would otherwise find it still owned)."""
        with self._lock:
            claims = list(self._claims)
        if not claims or self.stalled:
            return
        idle = self.clock.idle_seconds(None if now is None else now)
        limit = self.timeout()
        if idle is not None and idle > limit:
            self.stalled = True
            for claim in reversed(claims):
                with contextlib.suppress(Exception):  # the other stores still get their answer
                    claim.give_back_stalled(idle)
            self.on_stalled(f"error: {self.label} made no progress for {idle:.0f} s (stall timeout {limit:.0f} s): "
                            f"recorded stalled and back in the queue, to resume from its last checkpoint; "
                            f"ending this worker process ({os.getpid()})")
            return
        for claim in claims:
            with contextlib.suppress(Exception):  # an unreachable store must not kill the training
                claim.renew()


LEASE = Lease()


# ------------------------------------------------------------------------------ test hook


def _hang_point() -> tuple[int, int | None, str | None] | None:
    """$ABLATE_TEST_HANG = 'ITERATION[:RANK][@MARKER]': the tests' way to make a run hang where a
    stuck kernel would, with every thread of the process alive. With MARKER (a file path), only
    the first process to get there hangs (it creates the file, holding its pid and the time)."""
    text = os.environ.get("ABLATE_TEST_HANG", "").strip()
    if not text:
        return None
    text, _, marker = text.partition("@")
    iteration, _, rank = text.partition(":")
    return int(iteration), int(rank) if rank else None, marker or None


def hang_here_if_asked(iteration: int, rank: int = 0) -> None:
    """Block this thread for ever at the test hook's iteration (see _hang_point); nothing otherwise.
    The variable is read here, not when the module is imported: what a command's environment says
    counts, even in a process forked after the import (the tests' zygote, tests/cli_zygote.py)."""
    point = _hang_point()
    if point is None:
        return
    at, on_rank, marker = point
    if iteration != at or (on_rank is not None and rank != on_rank):
        return
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another process hung already; this one goes on
        os.write(fd, f"{os.getpid()} {time.time():.3f}\n".encode())
        os.close(fd)
    threading.Event().wait()


@contextlib.contextmanager
def watchdog(limit: float, label: str, clock: ProgressClock = PROGRESS,
             on_stalled: Callable[[str], None] = end_this_process) -> Iterator[None]:
    """End this process when its judged loops make no progress for `limit` seconds (a rank of a
    run on several processes: one stuck in a kernel, or waiting on a stuck peer, never leaves a
    collective by itself). Checked every second (or a quarter of `limit`, if shorter)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(min(1.0, limit / 4)):
            idle = clock.idle_seconds()
            if idle is not None and idle > limit:
                on_stalled(f"error: {label} made no progress for {idle:.0f} s (collective timeout {limit:.0f} s); "
                           f"ending it ({os.getpid()})")
                return

    thread = threading.Thread(target=watch, name="ablate-rank-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
