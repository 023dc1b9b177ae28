"""A tiny grounding benchmark for sweeps: a real feature table (Parquet, as extraction writes it) of a few
videos, and train / val annotations whose windows are where the features carry the query's direction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from timerefine.data.annotations import Query, write_jsonl
from timerefine.data.storage import Storage
from timerefine.features import STATUS_OK, feature_rows_to_table, write_feature_part

DIM = 16
DURATION_S = 30.0
PHRASES = ("the red circle moves", "a blue star spins", "the green box grows")


@dataclass(frozen=True)
class TinyBenchmark:
    features: Path
    train: Path
    val: Path


def write_tiny_benchmark(folder: Path, videos: int = 6, seed: int = 0) -> TinyBenchmark:
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((len(PHRASES), DIM))
    rows, features, queries = [], {}, []
    for index in range(videos):
        video_id = f"video{index}"
        frames = rng.standard_normal((100, DIM))
        phrase = index % len(PHRASES)
        start_bin = int(rng.integers(0, 60))
        end_bin = start_bin + int(rng.integers(15, 35))
        frames[start_bin:end_bin] += 3 * directions[phrase]
        window = (start_bin * DURATION_S / 100, end_bin * DURATION_S / 100)
        queries.append(Query(f"{video_id}_0", video_id, DURATION_S, PHRASES[phrase], (window,)))
        features[video_id] = frames.astype(np.float16)
        rows.append(
            {
                "video_id": video_id,
                "uri": f"/videos/{video_id}.mp4",
                "duration_s": DURATION_S,
                "fps": 10.0,
                "num_frames": 300,
                "frame_times_s": np.linspace(0, DURATION_S - 0.3, 100).tolist(),
                "status": STATUS_OK,
                "error": None,
            }
        )
    table = feature_rows_to_table(rows, features, num_frames=100, dim=DIM, encoder="tiny-test-encoder@0")
    write_feature_part(table, str(folder / "features"), Storage())
    write_jsonl(queries[:-2], folder / "train.jsonl")
    write_jsonl(queries[-2:], folder / "val.jsonl")
    return TinyBenchmark(folder / "features", folder / "train.jsonl", folder / "val.jsonl")


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> TinyBenchmark:
    return write_tiny_benchmark(tmp_path_factory.mktemp("tiny_benchmark"))
