"""A tiny grounding benchmark for sweeps: a real feature table of a few videos, and train / val annotations
whose windows are where the features carry the query's direction."""

from __future__ import annotations

import pytest
from featurebench import FeatureBenchmark, write_feature_benchmark

PHRASES = ("the red circle moves", "a blue star spins", "the green box grows")


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> FeatureBenchmark:
    """6 videos of 16-dimensional features, one query each; the last 2 queries are the val set."""
    return write_feature_benchmark(
        tmp_path_factory.mktemp("tiny_benchmark"),
        videos=6,
        queries_per_video=1,
        dim=16,
        encoder="tiny-test-encoder@0",
        phrases=PHRASES,
        video_prefix="video",
        window_starts=(0, 60),
        window_lengths=(15, 35),
        val_queries=2,
    )
