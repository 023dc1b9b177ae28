"""The extraction job against what goes wrong for real: a corpus of bad and tricky files, a second writer on
the same output, a driver killed mid-run, retries, and an S3 endpoint that throttles and drops connections
in front of a real SeaweedFS. Rows are counted the way a plain pyarrow user counts them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from badvideos import ANY, build_corpus
from faultproxy import FaultProxy

from pipelines import extract_features, jobs
from timerefine.data.lock import LOCK_FOLDER
from timerefine.data.storage import Storage, video_id_from_uri
from timerefine.features import STATUS_ERROR, STATUS_OK, load_features

REPO = Path(__file__).resolve().parents[2]


def extract(*argv: str) -> int:
    return jobs.main(extract_features, ["--encoders", "1", *argv])


def plain_rows(output: str, filesystem: pafs.FileSystem | None = None) -> list[dict]:
    """Every row as plain pyarrow discovers and reads the table (no timerefine reader, no dedup)."""
    dataset = pads.dataset(output, format="parquet", filesystem=filesystem)
    columns = ["video_id", "status", "error", "num_frames", "duration_s", "frame_times_s"]
    return dataset.to_table(columns=columns).to_pylist()


def rows_per_video(rows: list[dict]) -> Counter:
    return Counter(row["video_id"] for row in rows)


@pytest.mark.integration
@pytest.mark.slow
def test_every_bad_or_tricky_file_gets_exactly_one_right_row_and_the_rest_is_named(
    ray_cluster, tmp_path, capsys
):
    videos = tmp_path / "videos"
    expected = {video_id_from_uri(name): want for name, want in build_corpus(videos).items()}
    (videos / "notes.txt").write_text("not a video")
    (videos / "cover.png").write_bytes(b"\x89PNG")
    os.mkfifo(videos / "pipe.mp4")
    (videos / "gone.mp4").symlink_to(videos / "nowhere.mp4")
    (videos / "folder.mp4").mkdir()
    output = tmp_path / "features"

    code = extract("--input", str(videos), "--output", str(output), "--videos-per-file", "8")

    assert code == 0
    printed = capsys.readouterr().out
    assert (
        f"{len(expected)} videos in {videos} (skipped 5: 1 .png, 1 .txt, 1 a folder named like a video, "
        "1 a symlink to nothing, 1 not a regular file (a pipe, socket or device))"
    ) in printed
    for name in ("pipe.mp4", "gone.mp4", "folder.mp4"):
        assert f"skipped {videos / name}:" in printed
    rows = plain_rows(str(output))
    assert rows_per_video(rows) == Counter(dict.fromkeys(expected, 1))  # every kind: exactly one row
    for row in rows:
        want = expected[row["video_id"]]
        if want.status != ANY:
            assert row["status"] == want.status, (row["video_id"], row["error"])
        if row["status"] == STATUS_ERROR:
            assert row["error"] and (want.error or "") in row["error"], row["video_id"]
            assert not row["error"].startswith("[")  # no native log prefix
        elif want.num_frames is not None:
            assert (row["num_frames"], row["video_id"]) == (want.num_frames, row["video_id"])
            assert row["duration_s"] == pytest.approx(want.duration_s, abs=0.02), row["video_id"]
            times = row["frame_times_s"]
            assert len(times) == 100 and times == sorted(times), row["video_id"]
            assert times[0] >= 0 and times[-1] < row["duration_s"], row["video_id"]
    features = load_features(str(output))
    assert features["$(touch pwned)"].features.shape == (100, 768)
    assert not (videos / "pwned").exists() and not (REPO / "pwned").exists()


def copies(source: Path, folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        shutil.copy(source, folder / f"clip{index:02d}{source.suffix}")
    return [f"clip{index:02d}" for index in range(count)]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.slow
def test_a_second_writer_is_refused_a_killed_one_resumed_and_retries_replace_rows(
    ray_cluster, sample_videos, tmp_path, capsys
):
    videos = tmp_path / "videos"
    good = copies(sample_videos["counter_short"], videos, 16)
    shutil.copy(sample_videos["not_video"], videos / "broken.mp4")
    output = tmp_path / "features"
    args = ["--input", str(videos), "--output", str(output), "--videos-per-file", "1"]
    first = subprocess.Popen(
        [sys.executable, "pipelines/extract_features.py", "--address", ray_cluster, "--encoders", "1", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: list((output / LOCK_FOLDER).glob("*.json")), 120, "the first job's lock")
        assert extract(*args) == 2  # the second writer is refused, naming the first
        err = capsys.readouterr().err
        assert f"is being written by another job (process {first.pid} on" in err
        wait_for(lambda: list(output.glob("part-*.parquet")), 120, "the first job's first part")
    finally:
        first.send_signal(signal.SIGKILL)  # the driver dies mid-run, its lock and some parts left behind
        first.wait()
    assert len(plain_rows(str(output))) < len(good) + 1

    assert extract(*args) == 0  # the lock of a dead process is taken over; the run resumes

    rows = plain_rows(str(output))
    assert rows_per_video(rows) == Counter(dict.fromkeys([*good, "broken"], 1))
    assert {row["video_id"]: row["status"] for row in rows}["broken"] == STATUS_ERROR
    assert not list((output / LOCK_FOLDER).glob("*")) and not list(output.glob(".*partial"))

    assert extract(*args, "--retry-errors") == 0
    assert "1 to extract, 16 already done, 0 failed before" in capsys.readouterr().out
    rows = plain_rows(str(output))
    assert rows_per_video(rows) == Counter(dict.fromkeys([*good, "broken"], 1))  # replaced, not added


KILLED_WRITER = """
import os, signal, sys
from timerefine.data.storage import Storage
filesystem, path = Storage().resolve(sys.argv[1])
stream = filesystem.open_output_stream(path)
stream.write(os.urandom(12 * 1024 * 1024))  # past pyarrow's part size: a multipart upload has begun
stream.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
@pytest.mark.slow
def test_s3_under_throttling_and_dropped_connections_loses_nothing_and_leaves_no_upload(
    ray_cluster, s3_server, sample_videos, tmp_path, monkeypatch
):
    names = ("counter_10fps", "vfr_offset", "rotated_90", "counter_short", "not_video")
    for name in names:
        s3_server.upload("videos", f"faulty/{sample_videos[name].name}", sample_videos[name])
    proxy = FaultProxy(s3_server.endpoint_url, throttle=0.3, drop=0.05).start()
    try:
        for name, value in s3_server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_WRITER, "s3://features/faulty/part-killed.parquet"], cwd=REPO
        )
        assert killed.returncode == -signal.SIGKILL
        client = s3_server.client()  # straight to the server, past the proxy
        assert len(client.list_multipart_uploads(Bucket="features", Prefix="faulty/")["Uploads"]) == 1

        code = extract(
            "--input", "s3://videos/faulty/", "--output", "s3://features/faulty", "--videos-per-file", "1"
        )

        assert code == 0
        requests = sum(proxy.counts.values())
        assert proxy.counts["throttled"] > 0.15 * requests and proxy.counts["dropped"] > 0, proxy.counts
    finally:
        proxy.stop()
    assert "Uploads" not in client.list_multipart_uploads(Bucket="features", Prefix="faulty/")
    direct = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint_url.removeprefix("http://"),
        scheme="http",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region="us-east-1",
    )
    rows = plain_rows("features/faulty", direct)
    assert rows_per_video(rows) == Counter(dict.fromkeys(names, 1))
    assert {row["video_id"]: row["status"] for row in rows} == {
        **dict.fromkeys(names[:-1], STATUS_OK),
        "not_video": STATUS_ERROR,
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    features = load_features("s3://features/faulty", Storage())
    assert all(row.features.shape == (100, 768) for row in features.values())
