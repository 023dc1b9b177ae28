"""Tiny synthetic grounding benchmarks for tests: a real feature table (Parquet, as extraction writes it) of
random features, and annotations whose windows are where a video's features carry the query's own
direction, so a model can learn the mapping in seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from timerefine.data.annotations import Query, write_jsonl
from timerefine.data.storage import Storage
from timerefine.features import STATUS_ERROR, STATUS_OK, feature_rows_to_table, write_feature_part

DURATION_S = 30.0
FPS = 10.0
NUM_FEATURES = 100  # one feature every third frame of a 30 s video at 10 fps
FAILED_DECODE_ERROR = "moov atom not found"


@dataclass(frozen=True)
class FeatureBenchmark:
    features: Path
    train: Path
    val: Path | None  # None when every query is in train
    queries_with_features: int


def write_feature_benchmark(
    folder: Path,
    *,
    videos: int,
    queries_per_video: int,
    dim: int,
    encoder: str,
    phrases: Sequence[str],
    video_prefix: str,
    window_starts: tuple[int, int],
    window_lengths: tuple[int, int],
    failed_queries: Sequence[Query] = (),
    val_queries: int = 0,
    seed: int = 0,
) -> FeatureBenchmark:
    """Write ``folder/features`` and ``folder/train.jsonl`` (and ``folder/val.jsonl`` with the last
    ``val_queries`` queries). Windows are drawn in feature bins: the start from ``window_starts``, the
    length from ``window_lengths`` (numpy's half-open ranges). The videos of ``failed_queries`` get an error
    row, as a video that failed to decode does, and those queries go to train."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((len(phrases), dim))
    rows, features, queries = [], {}, []
    for v in range(videos):
        video_id = f"{video_prefix}{v}"
        frames = rng.standard_normal((NUM_FEATURES, dim))
        for q in range(queries_per_video):
            phrase = (v + q) % len(phrases)
            start_bin = int(rng.integers(*window_starts))
            end_bin = start_bin + int(rng.integers(*window_lengths))
            frames[start_bin:end_bin] += 3 * directions[phrase]
            window = (start_bin * DURATION_S / NUM_FEATURES, end_bin * DURATION_S / NUM_FEATURES)
            queries.append(Query(f"{video_id}_{q}", video_id, DURATION_S, phrases[phrase], (window,)))
        features[video_id] = frames.astype(np.float16)
        rows.append(_feature_row(video_id, ok=True))
    rows += [
        _feature_row(video_id, ok=False) for video_id in dict.fromkeys(q.video_id for q in failed_queries)
    ]
    table = feature_rows_to_table(rows, features, num_frames=NUM_FEATURES, dim=dim, encoder=encoder)
    write_feature_part(table, str(folder / "features"), Storage())
    split = len(queries) - val_queries
    write_jsonl([*queries[:split], *failed_queries], folder / "train.jsonl")
    val = None
    if val_queries:
        val = folder / "val.jsonl"
        write_jsonl(queries[split:], val)
    return FeatureBenchmark(folder / "features", folder / "train.jsonl", val, len(queries))


def _feature_row(video_id: str, ok: bool) -> dict:
    return {
        "video_id": video_id,
        "uri": f"/videos/{video_id}.mp4",
        "duration_s": DURATION_S if ok else None,
        "fps": FPS if ok else None,
        "num_frames": round(DURATION_S * FPS) if ok else None,
        "frame_times_s": np.linspace(0, DURATION_S - 3 / FPS, NUM_FEATURES).tolist() if ok else None,
        "status": STATUS_OK if ok else STATUS_ERROR,
        "error": None if ok else FAILED_DECODE_ERROR,
    }


SWEEP_PHRASES = ("the red circle moves", "a blue star spins", "the green box grows")


def write_sweep_benchmark(folder: Path) -> FeatureBenchmark:
    """What the sweep tests and bench/sweep_reservations.py sweep on: 6 videos of 16-dimensional
    features, one query each; the last 2 are val."""
    return write_feature_benchmark(
        folder,
        videos=6,
        queries_per_video=1,
        dim=16,
        encoder="tiny-test-encoder@0",
        phrases=SWEEP_PHRASES,
        video_prefix="video",
        window_starts=(0, 60),
        window_lengths=(15, 35),
        val_queries=2,
    )
