"""Session fixture for the Ray jobs' tests: one S3 server (SeaweedFS). The local Ray cluster (``ray_cluster``)
is in tests/conftest.py, shared with tests/tune."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from featurebench import DURATION_S, FeatureBenchmark, write_feature_benchmark, write_sweep_benchmark
from s3server import S3Server, running_seaweedfs

from timerefine.data.annotations import Query
from timerefine.encoders import resolve_encoder


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """SeaweedFS on 127.0.0.1 with buckets ``videos`` and ``features``; its keys are not in the environment
    (tests set them where the driver needs them, so workers never inherit them)."""
    with running_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"),
        "AKIDPIPELINETEST",
        "pipeline-secret-789",
        ("videos", "features"),
    ) as server:
        yield server


# ---------------------------------------------------------------------------------------------------------
# A tiny grounding benchmark and one model trained on it, shared by the train / evaluate / predict tests
# (training it costs most of a minute on 2 cores, so it is done once a session).

TINY_PHRASES = ("the red circle moves", "a blue star spins", "the green box grows", "a pink ring blinks")


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


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> TinyBenchmark:
    """Random 'CLIP' features of 4 videos, 2 queries each, in the default encoder's name and shape (so a
    model trained on them can also run on a real video), and a query on a video that failed to decode."""
    encoder = resolve_encoder(None)
    broken = Query("broken_0", "broken", DURATION_S, "a red circle", ((1.0, 5.0),))
    benchmark = write_feature_benchmark(
        tmp_path_factory.mktemp("tiny_benchmark"),
        videos=4,
        queries_per_video=2,
        dim=768,
        encoder=encoder.identity,
        phrases=TINY_PHRASES,
        video_prefix="vid",
        window_starts=(0, 70),
        window_lengths=(10, 30),
        failed_queries=(broken,),
    )
    return TinyBenchmark(
        benchmark.features, benchmark.train, benchmark.queries_with_features, encoder.identity
    )


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
    from pipelines import jobs, train

    output = tmp_path_factory.mktemp("trained")
    stdout = io.StringIO()
    args = tiny_benchmark.train_args(output, "--workers", "0", "--epochs", str(TINY_EPOCHS))
    with one_torch_thread(), contextlib.redirect_stdout(stdout):
        code = jobs.main(train, args)
    assert code == 0, stdout.getvalue()[-3000:]
    summary = json.loads((output / "timerefine" / train.SUMMARY_FILE).read_text())
    return TrainedRun(output, TINY_EPOCHS, stdout.getvalue(), summary)


# ---------------------------------------------------------------------------------------------------------
# A tiny grounding benchmark for sweeps: a real feature table of a few videos, and train / val annotations
# whose windows are where the features carry the query's direction.


@pytest.fixture(scope="session")
def sweep_benchmark(tmp_path_factory: pytest.TempPathFactory) -> FeatureBenchmark:
    """For the sweep tests: 6 videos of 16-dimensional features, one query each; the last 2 are val."""
    return write_sweep_benchmark(tmp_path_factory.mktemp("sweep_benchmark"))
