"""Query-blind priors: answers that see a video's duration but never its sentence or its frames.

They are the floor a grounding model must beat before any gain counts. On Charades-STA a single window
fitted on train already scores R1@0.5 around 30 on test, because moments cluster near the start of the
videos; a model that does not clear that has learnt the annotation bias, not the video.

- ``fixed``: the normalised window [a, b] on a 0.01 grid that maximises a train metric (mIoU by
  default), scaled to each test video (a * D, b * D). The objective matters: on Charades-STA train,
  mIoU picks [0, 0.47] (test 49.3 / 26.9 / 11.2 / 30.5) while R1@0.7 picks [0, 0.35], the window of the
  published prior (test 44.1 / 30.5 / 17.3 / 29.6).
- ``whole``: the whole video [0, D].
- ``random``: per query, one train moment's (start / D, length / D) drawn at random and scaled to D.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from timerefine.metrics import METRIC_KEYS, THRESHOLDS, Prediction, Window, score

if TYPE_CHECKING:
    from timerefine.data.annotations import Query

PRIOR_KINDS = ("fixed", "whole", "random")
GRID_STEPS = 100  # the fixed window's bounds are multiples of 1 / GRID_STEPS of the duration

# Elements per temporary array in the fixed-window search (8 bytes each): bounds memory to ~16 MB a
# temporary whatever the size of the training set.
_SEARCH_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Prior:
    """A fitted query-blind prior; build it with ``fit_prior``.

    ``window`` is the normalised [a, b] answered for every query (``fixed``, ``whole``). ``moments`` holds
    the train moments' normalised (start, length) pairs that ``random`` draws from; each query's draw is
    seeded by (``seed``, its qid), so an answer does not depend on the order queries are asked in.
    """

    kind: str
    window: Window | None = None
    moments: np.ndarray | None = field(default=None, repr=False, compare=False)
    seed: int = 0

    def predict(self, query: Query) -> Window:
        """The (start_s, end_s) this prior answers for ``query``."""
        duration = query.duration
        if self.window is not None:
            start_fraction, end_fraction = self.window
            return start_fraction * duration, end_fraction * duration
        rng = np.random.default_rng([self.seed, zlib.crc32(str(query.qid).encode())])
        start_fraction, length_fraction = self.moments[rng.integers(len(self.moments))]
        start = float(start_fraction) * duration
        return start, min(duration, start + float(length_fraction) * duration)

    def predictions(self, queries: Iterable[Query]) -> list[dict[str, Any]]:
        """Records in our predictions JSONL format, so that a prior is written and re-scored like a model."""
        records = []
        for query in queries:
            start, end = self.predict(query)
            records.append(
                {
                    "qid": query.qid,
                    "video_id": query.video_id,
                    "query": query.query,
                    "duration": query.duration,
                    "windows": [list(window) for window in query.windows],
                    "text": None,
                    "parsed": True,
                    "pred": [start, end],
                }
            )
        return records


def fit_prior(kind: str, train_queries: Iterable[Query], seed: int = 0, objective: str = "mIoU") -> Prior:
    """Fit a prior of ``kind`` (one of ``PRIOR_KINDS``) on training queries.

    ``objective`` (one of ``METRIC_KEYS``) is the train metric the ``fixed`` window maximises; the
    other kinds ignore it. ``whole`` ignores the training set too; it takes one so that all kinds are
    fitted the same way.
    """
    if kind not in PRIOR_KINDS:
        raise ValueError(f"unknown prior kind {kind!r}; choose one of {PRIOR_KINDS}")
    if objective not in METRIC_KEYS:
        raise ValueError(f"unknown objective {objective!r}; choose one of {METRIC_KEYS}")
    if kind == "whole":
        return Prior(kind="whole", window=(0.0, 1.0), seed=seed)
    train_queries = list(train_queries)
    if not train_queries:
        raise ValueError(f"the {kind!r} prior needs training queries, got none")
    if kind == "fixed":
        return Prior(kind="fixed", window=_best_fixed_window(train_queries, objective), seed=seed)
    starts, ends = _normalised_moments(train_queries)
    moments = np.stack([starts, ends - starts], axis=1)
    return Prior(kind="random", moments=moments, seed=seed)


def score_prior(prior: Prior, test_queries: Iterable[Query], compat: str | None = None) -> dict[str, Any]:
    """The prior's answers on ``test_queries``, scored exactly as a model's predictions are."""
    test_queries = list(test_queries)
    predictions = [
        Prediction(qid=str(query.qid), pred=prior.predict(query), video_id=query.video_id)
        for query in test_queries
    ]
    return score(predictions, test_queries, compat=compat)


def _best_fixed_window(queries: Sequence[Query], objective: str) -> Window:
    """Grid search of [a, b], a < b, for the best ``objective`` over ``queries``.

    IoU does not change when both windows are scaled by D, so the search runs on normalised moments,
    scoring as the metric does (best-matching window, unrounded IoU). Ties go to the smallest a, then
    the smallest b.
    """
    threshold = {f"R1@{threshold}": threshold for threshold in THRESHOLDS}.get(objective)
    starts, ends = _normalised_moments_padded(queries)
    grid = np.arange(GRID_STEPS + 1) / GRID_STEPS
    start_index, end_index = np.triu_indices(len(grid), k=1)
    candidate_starts, candidate_ends = grid[start_index], grid[end_index]

    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // starts.size)
    objective_values = np.empty(len(candidate_starts))
    for first in range(0, len(candidate_starts), chunk):
        a = candidate_starts[first : first + chunk, None, None]
        b = candidate_ends[first : first + chunk, None, None]
        overlap = np.clip(np.minimum(b, ends) - np.maximum(a, starts), 0.0, None)
        union = np.maximum(b, ends) - np.minimum(a, starts)  # >= b - a > 0
        ious = (overlap / union).max(axis=2)
        objective_values[first : first + chunk] = (ious if threshold is None else ious >= threshold).mean(
            axis=1
        )
    best = int(np.argmax(objective_values))
    return float(candidate_starts[best]), float(candidate_ends[best])


def _normalised_moments(queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray]:
    """Every ground-truth window of every query as (start / D, end / D), flat."""
    starts, ends = [], []
    for query in queries:
        for start, end in query.windows:
            starts.append(start / query.duration)
            ends.append(end / query.duration)
    return np.asarray(starts), np.asarray(ends)


def _normalised_moments_padded(queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray]:
    """(Q, W) arrays of normalised windows, W the most windows any query has.

    Short rows repeat their first window: a repeat cannot change a maximum over windows.
    """
    width = max(len(query.windows) for query in queries)
    starts = np.empty((len(queries), width))
    ends = np.empty((len(queries), width))
    for row, query in enumerate(queries):
        windows = list(query.windows) + [query.windows[0]] * (width - len(query.windows))
        starts[row] = [start / query.duration for start, _ in windows]
        ends[row] = [end / query.duration for _, end in windows]
    return starts, ends
