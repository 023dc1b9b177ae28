"""The ``ray job submit`` door: a real Ray head started with ``ray start`` and token authentication on (as
Ray 2.60 turns it on for local clusters), the extraction job submitted with ``JobSubmissionClient`` and the
repository as its working directory, its table checked, and the head stopped.

Everything stays on 127.0.0.1 and inside the test's temporary folders: the home directory holding the
token, Ray's session files, and timerefine's model cache.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from timerefine.features import STATUS_ERROR, STATUS_OK, read_feature_table

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# What never goes up with --working-dir: the virtual environment (gigabytes), caches, local runs and data.
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"]


@dataclass
class TokenAuthHead:
    dashboard: str  # http://127.0.0.1:<port>, where jobs are submitted
    token: str
    temp_dir: Path

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def head_environment(home: Path, temp_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
    return env | {
        "HOME": str(home),  # the token lives in $HOME/.ray/auth_token
        "RAY_AUTH_MODE": "token",
        "RAY_TMPDIR": str(temp_dir),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind 127.0.0.1, not the external interface
        "TIMEREFINE_HOME": str(temp_dir / "timerefine"),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # `python` in an entrypoint is this venv's
    }


def wait_for_dashboard(url: str, headers: dict[str, str], head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert head.poll() is None, f"`ray start --head` exited with {head.returncode}"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{url}/api/jobs/", headers=headers), timeout=5
            ):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert time.monotonic() < deadline, f"the dashboard at {url} did not answer within {timeout_s} s"
            time.sleep(1)


def submit_when_ready(
    client, entrypoint: str, submission_id: str, runtime_env: dict, timeout_s: float
) -> str:
    """Submit once the head's job agent has registered: a fresh head answers HTTP a little before."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env
            )
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.fixture(scope="module")
def token_auth_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenAuthHead]:
    home = tmp_path_factory.mktemp("home")
    # Ray's session folder holds Unix sockets (at most 107 characters a path, the dashboard's included):
    # pytest's folders are too deep for them.
    temp_dir = Path(tempfile.mkdtemp(prefix="job-ray-", dir="/tmp"))
    env = head_environment(home, temp_dir)
    generated = subprocess.run(
        [str(VENV_BIN / "ray"), "get-auth-token", "--generate"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token and token in generated.stdout
    dashboard_port = free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir / 'ray'}",
    ]  # fmt: skip
    with open(temp_dir / "head.log", "w") as log:
        head = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    started = TokenAuthHead(f"http://127.0.0.1:{dashboard_port}", token, temp_dir)
    try:
        wait_for_dashboard(started.dashboard, started.auth_headers(), head, timeout_s=180)
        yield started
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops every process it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the head's own process group, nothing else
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_dashboard_refuses_requests_without_the_token(token_auth_head):
    request = urllib.request.Request(f"{token_auth_head.dashboard}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in (401, 403)


def test_the_extraction_job_runs_from_a_working_dir_upload(token_auth_head, sample_videos, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("counter_10fps", "rotated_90", "not_video"):
        (videos / sample_videos[name].name).write_bytes(sample_videos[name].read_bytes())
    output = tmp_path / "features"
    client = JobSubmissionClient(token_auth_head.dashboard, headers=token_auth_head.auth_headers())
    submission_id = f"extract-{uuid.uuid4().hex[:8]}"
    entrypoint = f"python pipelines/extract_features.py --input {videos} --output {output} --encoders 1"
    working_dir = {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES}
    submitted = submit_when_ready(client, entrypoint, submission_id, working_dir, timeout_s=120)
    assert submitted == submission_id

    finished = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(submission_id)) not in finished:
        assert time.monotonic() < deadline, f"job still {status} after 300 s"
        time.sleep(2)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "[extract] 3 videos" in logs and "2 ok, 1 failed" in logs

    table = read_feature_table(str(output)).drop_columns(["features"]).to_pylist()
    statuses = {row["video_id"]: row["status"] for row in table}
    assert statuses == {"counter_10fps": STATUS_OK, "rotated_90": STATUS_OK, "not_video": STATUS_ERROR}
    assert {row["num_frames"] for row in table if row["status"] == STATUS_OK} == {50, 30}

    # What the job ran from: the repository's code, without the virtual environment.
    uploaded = [p for p in (token_auth_head.temp_dir / "ray").rglob("working_dir_files/*") if p.is_dir()]
    assert len(uploaded) == 1
    assert (uploaded[0] / "pipelines" / "extract_features.py").is_file()
    assert not (uploaded[0] / ".venv").exists() and not (uploaded[0] / ".git").exists()
