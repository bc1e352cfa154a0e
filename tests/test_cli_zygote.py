"""The tests' zygote (tests/cli_zygote.py) gives a started command what subprocess.Popen would: its
own pid, exit code (negative when a signal ended it), output in a log file or kept for
communicate(), and a process group of its own when asked."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest

import cli_zygote


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "ABLATE_CACHE": str(tmp_path / "cache")}


def test_run_returns_the_command_s_code_and_both_streams(tmp_path, env):
    done = cli_zygote.run(["--help"], tmp_path, env, timeout=120)
    assert done.returncode == 0 and "Usage" in done.stdout and done.stderr == ""
    refused = cli_zygote.run(["no-such-command"], tmp_path, env, timeout=120)
    assert refused.returncode == 2 and "no-such-command" in refused.stderr and refused.stdout == ""


def test_a_started_command_writes_its_log_and_reports_its_code(tmp_path, env):
    log = tmp_path / "command.log"
    log.write_text("kept\n")
    proc = cli_zygote.start(["no-such-command"], tmp_path, env, log=log)
    assert proc.wait(timeout=120) == 2 and proc.poll() == 2
    assert proc.communicate() == (None, None)  # all of it went to the log, appended
    text = log.read_text()
    assert text.startswith("kept\n") and "no-such-command" in text


def test_a_started_command_merges_stderr_into_stdout(tmp_path, env):
    proc = cli_zygote.start(["no-such-command"], tmp_path, env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no-such-command" in out and err is None


def test_a_killed_command_reports_the_signal_and_its_group_goes_with_killpg(tmp_path, env):
    proc = cli_zygote.start(["train", "smoke", "--no-progress", "--out", str(tmp_path / "out")], tmp_path, env,
                            new_session=True)
    assert psutil.Process(proc.pid).ppid() != os.getpid()  # the zygote's child, not this process's
    assert os.getpgid(proc.pid) == proc.pid  # the leader of a group of its own
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.kill()  # once ended, no signal is sent (the pid may be another process's by now)
