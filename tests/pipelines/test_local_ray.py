"""A job's own local Ray: every socket it listens on is loopback, and SIGTERM stops it cleanly.

Run as a user runs it (``timerefine extract`` in a subprocess on real MP4s), watching the job's whole
process tree with psutil: Ray's GCS, raylet, workers, dashboard and agents are all descendants of the
job's process.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from timerefine.data.synthetic import SynthConfig, generate_benchmark

pytestmark = pytest.mark.integration

STOP_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("local_ray")
    generate_benchmark(folder, SynthConfig(videos=16, seed=3), progress=False)
    return folder / "videos"


def start_extract(videos: Path, output: Path) -> subprocess.Popen:
    ray_tmp = tempfile.mkdtemp(prefix="tr-ray-")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # the job must start its own Ray
    argv = [
        sys.executable,
        "-m",
        "timerefine.cli",
        "extract",
        "--input",
        str(videos),
        "--output",
        str(output),
    ]
    argv += ["--videos-per-file", "1"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def listening_addresses(root: psutil.Process) -> dict[str, set[str]]:
    """Every address a process of the tree listens on (TCP LISTEN, or bound UDP) -> the processes."""
    found: dict[str, set[str]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline()[:3])[:120]
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for connection in connections:
            listening = connection.status == psutil.CONN_LISTEN or (
                connection.type == 2 and not connection.raddr  # SOCK_DGRAM bound, not connected
            )
            if listening and connection.laddr:
                found.setdefault(connection.laddr.ip, set()).add(name)
    return found


def terminate_within_the_limit(job: subprocess.Popen, descendants: list[psutil.Process]) -> str:
    """SIGTERM the job; it and every process it had started must be gone within STOP_WITHIN_S, with the
    exit status of a SIGTERM. Returns its stderr."""
    sent = time.monotonic()
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, STOP_WITHIN_S - stopped_in))
    assert stopped_in <= STOP_WITHIN_S, f"it took {stopped_in:.1f} s to stop"
    assert not alive, f"still running {STOP_WITHIN_S} s after SIGTERM: {[p.pid for p in alive]}"
    assert job.returncode == 128 + signal.SIGTERM
    return stderr


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 and ::1, also written IPv4-mapped (``::ffff:127.0.0.1``, which ``is_loopback`` misses)."""
    parsed = ipaddress.ip_address(address)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return (mapped or parsed).is_loopback


def test_every_socket_of_a_local_job_listens_on_loopback_only(videos: Path, tmp_path: Path) -> None:
    job = start_extract(videos, tmp_path / "features")
    root = psutil.Process(job.pid)
    seen: dict[str, set[str]] = {}
    while job.poll() is None:
        for address, processes in listening_addresses(root).items():
            seen.setdefault(address, set()).update(processes)
        time.sleep(0.5)
    stdout, stderr = job.communicate()
    assert job.returncode == 0, stderr[-3000:]
    assert "16 ok, 0 failed" in stdout + stderr
    assert seen, "no listening socket was seen: the watch did not see Ray at all"
    exposed = {address: names for address, names in seen.items() if not is_loopback(address)}
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_sigterm_stops_the_job_and_its_ray_within_15_s_saying_how_to_resume(
    videos: Path, tmp_path: Path
) -> None:
    job = start_extract(videos, tmp_path / "features")
    root = psutil.Process(job.pid)
    deadline = time.monotonic() + 180
    while not any(p.name().startswith("raylet") for p in root.children(recursive=True)):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before its Ray was up"
        time.sleep(0.5)
    time.sleep(8)  # into the extraction
    descendants = root.children(recursive=True)
    assert job.poll() is None, "the job finished before it could be interrupted; give it more videos"
    stderr = terminate_within_the_limit(job, descendants)
    interrupted = [line for line in stderr.splitlines() if line.startswith("[extract] interrupted:")]
    assert len(interrupted) == 1 and "rerun the same command to resume" in interrupted[0], stderr[-3000:]
    assert "Traceback" not in stderr

    rerun = start_extract(videos, tmp_path / "features")  # continues: nothing lost, nothing doubled
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    import pyarrow.dataset as ds

    video_ids = ds.dataset(tmp_path / "features", format="parquet").to_table(columns=["video_id"])
    assert sorted(video_ids.column("video_id").to_pylist()) == sorted(p.stem for p in videos.glob("*.mp4"))


def test_sigterm_stops_the_demo_while_both_models_train(tmp_path: Path) -> None:
    """The demo waits on two training runs at once; SIGTERM must not wait for them to finish."""
    ray_tmp = tempfile.mkdtemp(prefix="tr-ray-")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "TIMEREFINE_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "timerefine.cli", "demo", "--workdir", str(tmp_path / "demo")]
    argv += ["--videos", "24", "--epochs", "20"]
    job = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    lines = []
    for line in job.stdout:  # read until both training runs have started
        lines.append(line)
        if line.startswith("[train") and "global batch" in line:
            break
        assert time.monotonic() < deadline and job.poll() is None, "".join(lines[-20:])
    descendants = psutil.Process(job.pid).children(recursive=True)
    stderr = terminate_within_the_limit(job, descendants)
    assert "[demo] interrupted: " in stderr and "rerun the same command to resume" in stderr
