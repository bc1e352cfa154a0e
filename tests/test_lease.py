"""The lease: liveness is one rule, a heartbeat means progress, a stall gives every claim back."""

from __future__ import annotations

import time

import pytest

from ablate import lease
from ablate.errors import AblateError


class Clock(lease.ProgressClock):
    """A progress clock whose time the test sets."""

    def __init__(self):
        super().__init__()
        self.now = 1000.0

    def advance(self, now=None):
        super().advance(self.now if now is None else now)

    def idle_seconds(self, now=None):
        return super().idle_seconds(self.now if now is None else now)


class Recorder:
    """A claim that records what the lease did with it."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def renew(self):
        self.log.append(("renew", self.name))

    def give_back_stalled(self, idle):
        self.log.append(("stalled", self.name, round(idle)))


def test_stall_timeout_is_fifty_typical_steps_with_a_floor():
    assert lease.stall_seconds(None, None) == lease.STALL_FLOOR_SECONDS  # nothing measured yet
    assert lease.stall_seconds(None, 0.2) == lease.STALL_FLOOR_SECONDS  # 50 x 0.2 s = 10 s < floor
    assert lease.stall_seconds(None, 10.0) == 500.0  # 50 x 10 s
    assert lease.stall_seconds(30.0, 10.0) == 30.0  # set outright
    assert lease.stall_seconds(0.0, 10.0) == float("inf")  # 0: never


def test_configured_stall_timeout_reads_the_option_then_the_environment(monkeypatch):
    monkeypatch.delenv("ABLATE_STALL_TIMEOUT", raising=False)
    assert lease.configured_stall_timeout() is None
    monkeypatch.setenv("ABLATE_STALL_TIMEOUT", "45")
    assert lease.configured_stall_timeout() == 45.0
    assert lease.configured_stall_timeout(12.0) == 12.0
    monkeypatch.setenv("ABLATE_STALL_TIMEOUT", "soon")
    with pytest.raises(AblateError, match="ABLATE_STALL_TIMEOUT: expected seconds, got 'soon'"):
        lease.configured_stall_timeout()
    with pytest.raises(AblateError, match="--stall-timeout: expected seconds >= 0"):
        lease.configured_stall_timeout(-1.0)


def test_the_typical_step_is_the_median_gap_between_advances_in_judged_loops():
    clock = Clock()
    clock.advance()  # outside a judged loop: no gap measured
    with clock.judged():
        for gap in (1.0, 1.0, 9.0, 1.0, 1.0):  # one slow step (a checkpoint, say) does not move it
            clock.now += gap
            clock.advance()
        assert clock.typical_step() == 1.0
        clock.now += 4.0
        assert clock.idle_seconds() == 4.0
    assert clock.idle_seconds() is None  # outside judged loops nothing is judged
    clock.reset()
    assert clock.typical_step() is None


def test_claims_are_renewed_only_while_the_run_advances_then_given_back_newest_first():
    clock, log, said = Clock(), [], []
    held = lease.Lease(clock=clock, on_stalled=said.append, stall_timeout=10.0)
    queue, tracking = Recorder("queue", log), Recorder("tracking", log)
    held.add(queue)
    held.add(tracking)
    assert log == []  # a claim is made with its first beat
    with clock.judged():
        clock.now += 3
        clock.advance()
        clock.now += 9  # 9 s since the last iteration: still within 10 s
        held.tick()
        assert log == [("renew", "queue"), ("renew", "tracking")]
        clock.now += 2  # 11 s: stalled
        held.tick()
        assert log[2:] == [("stalled", "tracking", 11), ("stalled", "queue", 11)]
        assert len(said) == 1 and "made no progress for 11 s (stall timeout 10 s)" in said[0]
        held.tick()  # given back once
        assert len(log) == 4 and len(said) == 1


def test_outside_judged_loops_the_claims_are_renewed_as_long_as_the_process_lives():
    clock, log = Clock(), []
    held = lease.Lease(clock=clock, on_stalled=pytest.fail, stall_timeout=1.0)
    held.add(Recorder("queue", log))
    clock.now += 1000  # building the data set, writing the results: not judged
    held.tick()
    assert log == [("renew", "queue")]


def test_a_claim_whose_store_fails_does_not_stop_the_others():
    clock, log = Clock(), []

    class Broken(Recorder):
        def renew(self):
            raise ConnectionError("server gone")

    held = lease.Lease(clock=clock, on_stalled=pytest.fail)
    held.add(Broken("tracking", log))
    held.add(Recorder("queue", log))
    held.tick()
    assert log == [("renew", "queue")]


def test_liveness_is_one_rule_process_and_last_beat(monkeypatch):
    monkeypatch.setenv("ABLATE_HEARTBEAT", "2")
    me, now = lease.process_owner(), time.time()
    assert lease.grace_seconds() == 6
    assert lease.is_alive(me, now - 5, now)
    assert not lease.is_alive(me, now - 7, now)  # three beats missed
    assert lease.is_alive(me, None, now)  # no beat recorded: the process decides
    assert not lease.is_alive(me.rsplit(":", 1)[0] + ":1.00", now, now)  # same pid, another start
    assert lease.is_alive("another-machine:12:3.00", now - 1, now)  # its beats decide
    assert not lease.is_alive("another-machine:12:3.00", now - 60, now)


def test_the_rank_watchdog_ends_a_process_whose_loop_stopped_advancing():
    clock, said = lease.ProgressClock(), []
    with lease.watchdog(0.2, "rank 1 of 2", clock=clock, on_stalled=said.append), clock.judged():
        deadline = time.monotonic() + 30
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(said) == 1 and said[0].startswith("error: rank 1 of 2 made no progress")


def test_a_bad_stall_timeout_is_one_line(tmp_path, monkeypatch):
    """Refused before the worker starts: run in this process (CliRunner), not a fresh one."""
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["worker", "smoke", "--stall-timeout", "-1"])
    assert done.exit_code == 1
    assert "--stall-timeout: expected seconds >= 0 (0: never), got -1.0" in done.output
    assert "Traceback" not in done.output and isinstance(done.exception, SystemExit)


def test_a_bad_collective_timeout_is_one_error(monkeypatch):
    from ablate import distributed
    from ablate.errors import ConfigError

    monkeypatch.setenv("ABLATE_COLLECTIVE_TIMEOUT", "0")
    with pytest.raises(ConfigError, match="ABLATE_COLLECTIVE_TIMEOUT: expected seconds > 0, got '0'"):
        distributed.collective_timeout()
    monkeypatch.setenv("ABLATE_COLLECTIVE_TIMEOUT", "7.5")
    assert distributed.collective_timeout() == 7.5
