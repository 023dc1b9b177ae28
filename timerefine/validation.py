"""Validation during training: greedy answers scored by IoU, as sums that ranks combine by all-reduce."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from timerefine.data.annotations import Query
from timerefine.features import FeatureRow
from timerefine.metrics import THRESHOLDS, best_window_iou
from timerefine.model import TimeRefineModel
from timerefine.optimisation import all_reduce_sum


@dataclass
class IoUTally:
    """IoU counts of the text answer over some queries; sums, so ranks combine by all-reduce."""

    queries: int = 0
    hits: tuple[int, ...] = (0,) * len(THRESHOLDS)
    iou_sum: float = 0.0

    def all_reduced(self) -> IoUTally:
        values = all_reduce_sum(torch.tensor([self.queries, *self.hits, self.iou_sum], dtype=torch.float64))
        counts = [round(v) for v in values[:-1].tolist()]
        return IoUTally(counts[0], tuple(counts[1:]), values[-1].item())

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        """R1@0.3 / 0.5 / 0.7 and mIoU in percent, as metrics.score reports them."""
        n = max(self.queries, 1)
        result = {f"{prefix}R1@{t}": 100 * h / n for t, h in zip(THRESHOLDS, self.hits, strict=True)}
        result[f"{prefix}mIoU"] = 100 * self.iou_sum / n
        return result


def validation_tally(
    model: TimeRefineModel,
    queries: Sequence[Query],
    features: Mapping[str, FeatureRow],
    batch_size: int,
    field: str = "pred",
) -> IoUTally:
    """Generate answers for ``queries`` and count IoU hits of one answer (``pred``: the text; or
    ``pred_frames``, ``pred_head``...; a missing or unparsed answer: IoU 0)."""
    return validation_tallies(model, queries, features, batch_size, (field,))[field]


def validation_tallies(
    model: TimeRefineModel,
    queries: Sequence[Query],
    features: Mapping[str, FeatureRow],
    batch_size: int,
    fields: Sequence[str],
) -> dict[str, IoUTally]:
    """``validation_tally`` for several answers of the same generated predictions."""
    ious: dict[str, list[float]] = {name: [] for name in fields}
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        videos = [features[q.video_id].features for q in chunk]
        predictions = model.generate(videos, [q.query for q in chunk], [q.duration for q in chunk])
        for name in fields:
            ious[name] += [
                best_window_iou(p.get(name), q.windows) for p, q in zip(predictions, chunk, strict=True)
            ]
    tallies = {}
    for name, values in ious.items():
        array = np.asarray(values, dtype=np.float64)
        hits = tuple(int((array >= t).sum()) for t in THRESHOLDS)
        tallies[name] = IoUTally(len(values), hits, float(array.sum()))
    return tallies
