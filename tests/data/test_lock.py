"""The output writer lock on local disk and on a real S3 server (SeaweedFS): one holder at a time, the
holder named to the one refused, stale entries (a killed process, a silent heartbeat) taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3server import running_seaweedfs

from timerefine.data.lock import LOCK_FOLDER, OutputBusyError, OutputLock
from timerefine.data.storage import Storage

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from timerefine.data.lock import OutputLock
from timerefine.data.storage import Storage
OutputLock(sys.argv[1], Storage()).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with running_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"), "AKIDLOCKTEST", "lock-secret-456", ("outputs",)
    ) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, monkeypatch) -> str:
    if request.param == "local":
        return str(tmp_path / "features")
    server = request.getfixturevalue("s3")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://outputs/{request.node.name.replace('[', '-').rstrip(']')}"


def hold_in_another_process(output: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, output], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def entries(output: str) -> list[str]:
    return list(Storage().modified_times(f"{output}/{LOCK_FOLDER}"))


def test_a_second_writer_is_refused_naming_the_holder_until_it_is_done(output):
    holder = hold_in_another_process(output)
    try:
        with pytest.raises(OutputBusyError) as refused:
            OutputLock(output, Storage()).acquire()
        message = str(refused.value)
        assert f"is being written by another job (process {holder.pid} on {socket.gethostname()}" in message
        assert len(entries(output)) == 1  # the refused writer took its entry back
    finally:
        holder.terminate()
        holder.wait()
    # A terminated holder that never released: its process is gone from this machine, so it is stale.
    with OutputLock(output, Storage()) as lock:
        assert entries(output) == [lock.entry]
    assert entries(output) == []


def test_a_killed_holder_is_taken_over_at_once_and_a_released_lock_leaves_nothing(output):
    holder = hold_in_another_process(output)
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    first = OutputLock(output, Storage())
    first.acquire()
    with pytest.raises(OutputBusyError):
        OutputLock(output, Storage()).acquire()  # a live holder in this very process counts too
    first.release()

    assert entries(output) == []


def test_an_entry_without_a_heartbeat_is_stale_and_a_live_one_is_renewed(tmp_path):
    output = str(tmp_path / "features")
    silent = Path(output) / LOCK_FOLDER / "other-machine.json"
    silent.parent.mkdir(parents=True)
    holder = {"host": "elsewhere", "boot_id": "b", "pid": 1, "process_started": 0.0,
              "started_at": "2026-01-01T00:00:00+00:00", "command": "extract"}  # fmt: skip
    silent.write_text(json.dumps(holder))
    with pytest.raises(OutputBusyError, match="process 1 on elsewhere"):
        OutputLock(output, Storage(), heartbeat_s=1, stale_after_s=60).acquire()  # heard from just now

    old = time.time() - 61
    os.utime(silent, (old, old))
    with OutputLock(output, Storage(), heartbeat_s=0.2, stale_after_s=60) as lock:
        assert not silent.exists()
        first_beat = Path(lock.entry).stat().st_mtime
        time.sleep(0.6)
        assert Path(lock.entry).stat().st_mtime > first_beat
