"""The suite's own process hygiene (tests/processes.py) on real processes: what a test starts does not
outlive it, and a real-time policy set from outside is taken back."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from processes import NormalScheduling, reaped, run_reaped

# A process that starts a grandchild in a new session (as a daemon would), prints its pid, and sleeps.
SPAWNS_A_GRANDCHILD = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
    "start_new_session=True); "
    "print(child.pid, flush=True); time.sleep(600)"
)


def test_a_reaped_subprocess_and_its_grandchild_are_gone_when_the_block_ends():
    job = subprocess.Popen([sys.executable, "-c", SPAWNS_A_GRANDCHILD], stdout=subprocess.PIPE, text=True)
    with reaped(job) as tree:
        grandchild = psutil.Process(int(job.stdout.readline()))
        tree.watch()
        assert grandchild.pid in tree.seen
    assert job.poll() is not None
    assert not grandchild.is_running()


def test_run_reaped_kills_what_a_timed_out_command_left_behind():
    with pytest.raises(subprocess.TimeoutExpired):
        run_reaped([sys.executable, "-c", SPAWNS_A_GRANDCHILD], timeout_s=3)
    leftovers = [
        p for p in psutil.Process().children(recursive=True) if "time.sleep(600)" in " ".join(p.cmdline())
    ]
    assert leftovers == []


@pytest.mark.skipif(os.geteuid() != 0, reason="setting a real-time policy needs root (CAP_SYS_NICE)")
def test_a_process_put_under_sched_fifo_from_outside_is_put_back():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        os.sched_setscheduler(sleeper.pid, os.SCHED_FIFO, os.sched_param(1))
        assert os.sched_getscheduler(sleeper.pid) == os.SCHED_FIFO
        scheduling = NormalScheduling()
        scheduling.check()
        assert os.sched_getscheduler(sleeper.pid) == os.SCHED_OTHER
        assert sleeper.pid in scheduling.reset
    finally:
        sleeper.kill()
        sleeper.wait()
