"""A job's own local Ray: every socket it listens on is loopback, and SIGTERM stops it cleanly.

Run as a user runs it (``timerefine extract`` in a subprocess on real MP4s), watching the job's whole
process tree with psutil: Ray's GCS, raylet, workers, dashboard and agents are all descendants of the
job's process.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import pytest
from processes import ProcessTree, run_reaped

from timerefine.data.synthetic import SynthConfig, generate_benchmark

pytestmark = pytest.mark.integration

STOP_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("local_ray")
    generate_benchmark(folder, SynthConfig(videos=16, seed=3), progress=False)
    return folder / "videos"


class Job:
    """``timerefine <argv>`` as a user runs it, starting a Ray of its own, as a context: on the way out
    whatever it started and still runs is killed and its Ray folder removed. stdout and stderr go to
    files (a pipe nobody reads would stall the job once full)."""

    def __init__(self, argv: list[str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = folder / "stdout.txt", folder / "stderr.txt"
        self.ray_tmp = tempfile.mkdtemp(prefix="tr-ray-")  # short: Ray's socket paths must fit in 107 bytes
        env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "OMP_NUM_THREADS": "1"}
        env.setdefault("TIMEREFINE_HOME", str(folder / "home"))
        env.pop("RAY_ADDRESS", None)  # the job must start its own Ray
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            command = [sys.executable, "-m", "timerefine.cli", *argv]
            self.process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, text=True)
        self.tree = ProcessTree(self.process)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *_: object) -> None:
        self.tree.kill()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def extract(videos: Path, output: Path, *options: str) -> Job:
    argv = ["extract", "--input", str(videos), "--output", str(output), "--videos-per-file", "1", *options]
    return Job(argv, output.parent / f"{output.name}-job-{time.monotonic_ns()}")


def listening_addresses(job: Job) -> dict[str, set[str]]:
    """Every address a process of the job listens on (TCP LISTEN, or bound UDP) -> the processes."""
    found: dict[str, set[str]] = {}
    for process in [psutil.Process(job.process.pid), *job.tree.watch()]:
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


def terminate_within_the_limit(job: Job) -> str:
    """SIGTERM the job; it and every process it had started must be gone within STOP_WITHIN_S, with the
    exit status of a SIGTERM. Returns its stderr."""
    job.tree.watch()
    sent = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    job.process.wait(timeout=60)
    stopped_in = time.monotonic() - sent
    _, alive = psutil.wait_procs(job.tree.alive(), timeout=max(0.0, STOP_WITHIN_S - stopped_in))
    stderr = job.stderr
    assert stopped_in <= STOP_WITHIN_S, f"it took {stopped_in:.1f} s to stop\n{stderr[-3000:]}"
    running = [" ".join(p.cmdline()[:2])[:100] for p in alive if p.is_running()]
    assert not alive, f"still running {STOP_WITHIN_S} s after SIGTERM: {running}"
    assert job.process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    return stderr


def dashboard_address(stdout: str) -> str | None:
    """The dashboard address the job printed (``[ray] local Ray on 127.0.0.1; its dashboard: URL``)."""
    lines = [line for line in stdout.splitlines() if line.startswith("[ray] ") and "dashboard: " in line]
    return lines[0].split("dashboard: ", 1)[1].strip() if lines else None


def answers(url: str | None) -> bool:
    import urllib.request

    if url is None:
        return False
    assert url.startswith("http://127.0.0.1:"), url
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:  # still starting; or asking for Ray's token, which a served dashboard does
        return False


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 and ::1, also written IPv4-mapped (``::ffff:127.0.0.1``, which ``is_loopback`` misses)."""
    parsed = ipaddress.ip_address(address)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return (mapped or parsed).is_loopback


def test_every_socket_of_a_local_job_listens_on_loopback_only(videos: Path, tmp_path: Path) -> None:
    # With the dashboard, the most a local Ray serves: its HTTP server and its modules' sockets too.
    seen: dict[str, set[str]] = {}
    dashboard_answered = False
    with extract(videos, tmp_path / "features", "--dashboard") as job:
        deadline = time.monotonic() + 600
        while job.process.poll() is None:
            for address, processes in listening_addresses(job).items():
                seen.setdefault(address, set()).update(processes)
            dashboard_answered = dashboard_answered or answers(dashboard_address(job.stdout))
            assert time.monotonic() < deadline, "the extraction did not finish within 600 s"
            time.sleep(0.5)
        assert job.process.returncode == 0, job.stderr[-3000:]
        _, alive = psutil.wait_procs(job.tree.alive(), timeout=STOP_WITHIN_S)  # its Ray stopped with it
        assert not alive, f"still running after the job: {[p.cmdline()[:2] for p in alive if p.is_running()]}"
    assert dashboard_answered, f"the dashboard never answered at its printed address\n{job.stdout[-3000:]}"
    assert "16 ok, 0 failed" in job.stdout + job.stderr
    assert seen, "no listening socket was seen: the watch did not see Ray at all"
    exposed = {address: names for address, names in seen.items() if not is_loopback(address)}
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_sigterm_stops_the_job_and_its_ray_within_15_s_saying_how_to_resume(
    videos: Path, tmp_path: Path
) -> None:
    with extract(videos, tmp_path / "features") as job:
        deadline = time.monotonic() + 180
        # The plan line is printed once ray.init has returned and the job's SIGTERM handler replaced Ray's
        # (a SIGTERM inside ray.init meets Ray's own handler, which aborts: "raylet is up" came too early
        # on a loaded machine).
        while "encoder actor(s)" not in job.stdout:
            assert job.process.poll() is None, f"the job ended before its Ray was up\n{job.stderr[-3000:]}"
            assert time.monotonic() < deadline, "the job's Ray did not start within 180 s"
            time.sleep(0.5)
        job.tree.watch()
        time.sleep(3)  # into the extraction
        assert job.process.poll() is None, "the job ended before it could be interrupted; give it more videos"
        stderr = terminate_within_the_limit(job)
    interrupted = [line for line in stderr.splitlines() if line.startswith("[extract] interrupted:")]
    assert len(interrupted) == 1 and "rerun the same command to resume" in interrupted[0], stderr[-3000:]
    assert "Traceback" not in stderr

    with extract(videos, tmp_path / "features") as rerun:  # continues: nothing lost, nothing doubled
        assert rerun.process.wait(timeout=600) == 0, rerun.stderr[-3000:]
    import pyarrow.dataset as ds

    video_ids = ds.dataset(tmp_path / "features", format="parquet").to_table(columns=["video_id"])
    assert sorted(video_ids.column("video_id").to_pylist()) == sorted(p.stem for p in videos.glob("*.mp4"))


def test_sigterm_stops_the_demo_while_both_models_train(tmp_path: Path) -> None:
    """The demo waits on two training runs at once; SIGTERM must not wait for them to finish."""
    argv = ["demo", "--workdir", str(tmp_path / "demo"), "--videos", "24", "--epochs", "20"]
    with Job(argv, tmp_path / "job") as job:
        deadline = time.monotonic() + 400
        while "global batch" not in job.stdout:  # a training run's first line
            assert job.process.poll() is None, f"the demo ended before it trained\n{job.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"no training started within 400 s\n{job.stdout[-3000:]}"
            job.tree.watch()
            time.sleep(0.5)
        stderr = terminate_within_the_limit(job)
    assert "[demo] interrupted: " in stderr and "rerun the same command to resume" in stderr, stderr[-3000:]


def _last_json_line_of(script: str, unset: Iterable[str] = ()) -> Any:
    """Run ``script`` in a fresh Python that starts its own local Ray (no RAY_ADDRESS, its own Ray temp
    folder, the variables ``unset`` removed); the JSON its last stdout line prints."""
    import json

    ray_tmp = tempfile.mkdtemp(prefix="tr-ray-")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    for name in unset:
        env.pop(name, None)
    try:
        repo = Path(__file__).resolve().parents[2]
        result = run_reaped([sys.executable, "-c", script], 180, env=env, cwd=repo)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


WORKER_ENV_SCRIPT = """
import json, os, ray
from pipelines.compute import ray_connection
from pipelines.jobs import QUIET_ENV, ClusterOptions
names = ["RAY_ADDRESS", *QUIET_ENV]
with ray_connection(ClusterOptions(), num_cpus=1) as dashboard:
    worker = ray.get(ray.remote(num_cpus=0)(lambda: {name: os.environ.get(name) for name in names}).remote())
    niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    inside = os.environ.get("RAY_ADDRESS")
print(json.dumps({"worker": worker, "worker_niceness": niceness, "driver_niceness": os.nice(0),
                  "driver_inside": inside, "driver_after": os.environ.get("RAY_ADDRESS"),
                  "dashboard": dashboard}))
"""


@pytest.fixture(scope="module")
def local_ray_seen() -> dict:
    """What a job's local Ray looks like from inside (one Ray start for the tests that read it)."""
    from pipelines.jobs import QUIET_ENV

    return _last_json_line_of(WORKER_ENV_SCRIPT, unset=[*QUIET_ENV, "RAY_worker_niceness"])


def test_a_local_rays_workers_inherit_the_job_env_and_the_driver_keeps_none_of_it(local_ray_seen) -> None:
    # The variables reach the workers through the environment Ray's processes start with (no runtime
    # environment, so the idle workers Ray starts with the node serve the job); the driver's own
    # environment is as it was, so a later job in the same process does not connect to a stopped Ray.
    from pipelines.jobs import QUIET_ENV

    seen = local_ray_seen
    assert seen["worker"]["RAY_ADDRESS"].startswith("127.0.0.1:")
    assert {name: seen["worker"][name] for name in QUIET_ENV} == QUIET_ENV
    assert seen["driver_inside"] is None and seen["driver_after"] is None


def test_a_local_ray_serves_no_dashboard_unless_asked(local_ray_seen) -> None:
    # Its server and its modules' processes cost extracting 96 videos on 2 cores 1-2 s of 22.
    assert local_ray_seen["dashboard"] is None


STATE_API_SCRIPT = """
import json, ray
from ray.util.state import list_actors
from pipelines.compute import ray_connection
from pipelines.jobs import ClusterOptions

@ray.remote(num_cpus=0)
class Ping:
    def ping(self):
        return True

@ray.remote(num_cpus=0)
def states():  # asked from a worker, as Ray Train's cleaner (an actor) asks
    return [actor.state for actor in list_actors() if actor.class_name == "Ping"]

with ray_connection(ClusterOptions(), num_cpus=1, state_api=True) as dashboard:
    ping = Ping.remote()
    ray.get(ping.ping.remote())
    alive = ray.get(states.remote())
print(json.dumps({"dashboard": dashboard, "alive": alive}))
"""


def test_a_job_that_trains_gets_the_state_api_ray_train_asks() -> None:
    # Ray Train's placement-group cleaner, an actor, asks the state API, served by the dashboard, whether
    # the run's controller lives; without it the call fails ("Failed to connect to API server"). From a
    # worker, whose RAY_ADDRESS names its own Ray, the call finds it with another Ray beside it (the
    # driver, whose environment keeps no RAY_ADDRESS, would scan the machine and find both).
    seen = _last_json_line_of(STATE_API_SCRIPT)
    assert seen["dashboard"].startswith("127.0.0.1:")
    assert seen["alive"] == ["ALIVE"]


CONNECT_SCRIPT = """
import json, subprocess, sys
from pipelines.compute import ray_connection
from pipelines.jobs import ClusterOptions

CONNECT = (
    "from pipelines.compute import ray_connection; from pipelines.jobs import ClusterOptions\\n"
    "with ray_connection(ClusterOptions(address=%r), state_api=True): pass"
)
with ray_connection(ClusterOptions(), num_cpus=1) as dashboard:  # a Ray Data job's: no dashboard
    import ray
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-c", CONNECT % address]
    job = subprocess.run(command, capture_output=True, text=True, timeout=120)
print(json.dumps({"dashboard": dashboard, "returncode": job.returncode, "stderr": job.stderr}))
"""


def test_a_job_that_trains_on_a_cluster_without_the_state_api_says_so() -> None:
    # Without the dashboard's state API, every Ray Train run leaves its placement-group cleaner polling
    # for ever (measured: 200 MB, 1% of a core each); a job that trains connects, and warns.
    seen = _last_json_line_of(CONNECT_SCRIPT)
    assert seen["dashboard"] is None and seen["returncode"] == 0, seen["stderr"][-2000:]
    assert "serves no dashboard, so no state API" in seen["stderr"]
    assert "--include-dashboard=true" in seen["stderr"]


def test_a_local_rays_workers_run_at_the_drivers_priority(local_ray_seen) -> None:
    # Ray starts workers 15 nicer than its node; beside any other work the job then got almost no CPU
    # (8 videos: 202 s against a plain loop's 12.7 s beside two busy processes on 2 cores).
    assert local_ray_seen["worker_niceness"] == local_ray_seen["driver_niceness"]


WORKER_REUSE_SCRIPT = """
import json, os, tempfile, time
import ray
from pipelines.compute import ray_connection
from pipelines.jobs import ClusterOptions

@ray.remote(num_cpus=0.5)
def pid_once_all_run(folder):  # returns when all 4 tasks of the wave run at once, in 4 workers
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid()

with ray_connection(ClusterOptions(), num_cpus=2):
    waves = []
    for _ in range(2):
        folder = tempfile.mkdtemp()
        waves.append(sorted(set(ray.get([pid_once_all_run.remote(folder) for _ in range(4)]))))
        time.sleep(2.5)  # idle past Ray's 1 s before it stops workers above its limit
print(json.dumps(waves))
"""


def test_a_local_rays_workers_outlive_a_pause_between_tasks() -> None:
    # Four half-CPU tasks on 2 CPUs, each waiting for the others, run in four workers. With Ray's default
    # limit (one idle worker a CPU) two of them were stopped during the pause (measured with tasks that
    # slept 0.5 s instead: pids [a, b, c, d] then [a, c]), so the second wave needs two new ones. Every
    # wave must run in the same four workers. (The sleeping tasks also ran in 3 workers when the fourth
    # started late on a loaded machine: the wait for the others makes the first wave four.)
    first, second = _last_json_line_of(WORKER_REUSE_SCRIPT, unset=["RAY_num_workers_soft_limit"])
    assert len(first) == 4
    assert second == first


RAY_DATA_STARTS_SCRIPT = """
import json, statistics, time
import ray
from pipelines.compute import ray_connection
from pipelines.jobs import ClusterOptions

def start_then_sleep(batch):  # a generator, as the decode stage: hands on its start, then works
    yield {"started": [time.monotonic()] * len(batch["row"])}
    time.sleep(1.5)

def gap_between_the_two_tasks():
    dataset = ray.data.from_items([{"row": row} for row in range(4)], override_num_blocks=4)
    mapped = dataset.map_batches(start_then_sleep, batch_size=2, num_cpus=1)
    first, second = sorted({row["started"] for row in mapped.iter_rows()})
    return second - first

with ray_connection(ClusterOptions(), num_cpus=2):
    gap_between_the_two_tasks()  # the workers and Ray Data's own actors started
    gaps = [gap_between_the_two_tasks() for _ in range(3)]
print(json.dumps({"gap_s": statistics.median(gaps), "gaps": gaps}))
"""


def test_a_ray_data_stage_starts_a_task_on_every_cpu_at_once() -> None:
    # Ray Data's executor runs one task until it has read the cluster's size, which it reads without
    # waiting for the answer and then not again for a second: two 1-CPU tasks on 2 CPUs started 1.07-1.12 s
    # apart (0.05-0.1 s with the reads repeated until answered), a quarter of a 96-video decode stage.
    seen = _last_json_line_of(RAY_DATA_STARTS_SCRIPT)
    assert seen["gap_s"] < 0.5, seen
