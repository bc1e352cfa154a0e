"""SIGTERM and SIGHUP handled like SIGINT: a polite stop first, an immediate one on the second signal.

Preemptible machines and schedulers (Slurm, Kubernetes, spot instances) send SIGTERM and wait a
grace period before SIGKILL. A training run should use that period to write a checkpoint and
close its tracked run, so `graceful_stop()` turns the first SIGTERM or SIGINT into a flag the
training loop polls once per iteration; a second signal raises KeyboardInterrupt at once. SIGHUP
(the terminal or SSH session closed) is the same polite stop: its default, an immediate exit, left
no checkpoint and the tracked runs RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _handling(on_signal: Callable[[int, list[int]], None]) -> Iterator[Callable[[], bool]]:
    """Install `on_signal(signum, received so far)` for HANDLED's signals, yield `stop()` (True
    once one arrived), and restore the previous handlers on exit. Outside the main thread (where
    Python cannot install handlers) `stop()` stays False and the signals keep their behaviour."""
    received: list[int] = []

    def handle(signum, _frame) -> None:
        on_signal(signum, received)
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    # A SIGHUP set to be ignored stays ignored: `nohup`, and a grid's worker processes, whose parent
    # passes a hangup on as one SIGTERM (a closed terminal sends SIGHUP to the whole process group,
    # and a second signal would stop a worker before its checkpoint).
    handled = [sig for sig in HANDLED if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN)]
    previous = {sig: signal.signal(sig, handle) for sig in handled}
    try:
        yield lambda: bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def graceful_stop():
    """Yield `stop()`, True once a SIGINT or SIGTERM arrived; a second signal raises
    KeyboardInterrupt. The old handlers come back on exit."""

    def on_signal(signum: int, received: list[int]) -> None:
        if received:
            raise KeyboardInterrupt

    return _handling(on_signal)


def forward_to(processes):
    """While worker processes run: a SIGTERM or SIGHUP to this process is passed on to them as
    SIGTERM (a SIGINT from the terminal reaches the whole process group by itself), so each stops
    politely; a second signal terminates them. Yields `stop()` like graceful_stop."""

    def on_signal(signum: int, received: list[int]) -> None:
        for proc in processes:
            if proc.is_alive() and proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    if received:
                        proc.terminate()
                    elif signum in (signal.SIGTERM, signal.SIGHUP):
                        os.kill(proc.pid, signal.SIGTERM)

    return _handling(on_signal)
