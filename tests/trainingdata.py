"""Small training data for the training tests: queries on four videos, random features, a tiny model."""

from __future__ import annotations

import numpy as np
import torch

from timerefine.data.annotations import Query
from timerefine.features import FeatureRow
from timerefine.model import ModelConfig, TimeRefineModel
from timerefine.training import TrainConfig

FEATURE_DIM = 16


def make_queries(count: int, duration: float = 30.0) -> list[Query]:
    return [
        Query(f"q{i}", f"v{i % 4}", duration, f"the {colour} circle moves", ((2.0 + i, 9.0 + i),))
        for i, colour in zip(range(count), ["red", "blue", "green", "pink"] * count, strict=False)
    ]


def make_features(video_ids: list[str], seed: int = 0) -> dict[str, FeatureRow]:
    rng = np.random.default_rng(seed)
    return {
        vid: FeatureRow(
            video_id=vid,
            features=rng.standard_normal((100, FEATURE_DIM)).astype(np.float16),
            frame_times_s=np.linspace(0, 29.7, 100, dtype=np.float32),
            duration_s=30.0,
            fps=10.0,
            num_frames=300,
            uri=f"/videos/{vid}.mp4",
            encoder="test-encoder",
        )
        for vid in video_ids
    }


def tiny_model(seed: int = 0, l1_weight: float = 1.0) -> TimeRefineModel:
    torch.manual_seed(seed)
    return TimeRefineModel.from_config(ModelConfig(feature_dim=FEATURE_DIM, l1_weight=l1_weight))


def config(**overrides) -> TrainConfig:
    return TrainConfig(features="unused", train="unused", **overrides)
