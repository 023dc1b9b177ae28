"""Validation tallies: generated answers scored as metrics.score scores them, summed for all-reduce."""

from __future__ import annotations

import pytest
from trainingdata import make_features

from timerefine.data.annotations import Query
from timerefine.metrics import Prediction, score
from timerefine.validation import IoUTally, validation_tally


def test_iou_tally_metrics_are_percentages():
    tally = IoUTally(queries=4, hits=(3, 2, 1), iou_sum=2.0)
    assert tally.metrics() == {"val_R1@0.3": 75.0, "val_R1@0.5": 50.0, "val_R1@0.7": 25.0, "val_mIoU": 50.0}
    assert tally.all_reduced() == tally


class FixedAnswers:
    """Stands in for the model's ``generate``: answers each query with a chosen segment (None: unparsed)."""

    def __init__(self, answers: dict[str, list[float] | None]) -> None:
        self.answers = answers
        self.calls = 0

    def generate(self, features, queries, durations):
        self.calls += 1
        assert len(features) == len(queries) == len(durations)
        return [{"pred": self.answers[q], "parsed": self.answers[q] is not None} for q in queries]


def test_validation_tally_agrees_with_metrics_score():
    queries = [
        Query("a", "v0", 30.0, "the red circle", ((2.0, 10.0),)),
        Query("b", "v1", 30.0, "the blue star", ((0.0, 6.0), (20.0, 30.0))),
        Query("c", "v2", 30.0, "the green box", ((5.0, 15.0),)),
        Query("d", "v3", 30.0, "the pink ring", ((1.0, 4.0),)),
    ]
    answers = {
        "the red circle": [2.0, 10.0],  # IoU 1
        "the blue star": [21.0, 30.0],  # 0.9 against the second window
        "the green box": [10.0, 20.0],  # 1/3
        "the pink ring": None,  # unparsed: a miss
    }
    model = FixedAnswers(answers)
    tally = validation_tally(model, queries, make_features(["v0", "v1", "v2", "v3"]), batch_size=3)
    expected = score(
        [Prediction(q.qid, answers[q.query], answers[q.query] is not None) for q in queries], queries
    )
    assert model.calls == 2 and tally.queries == 4
    assert tally.hits == (3, 2, 2)
    got = tally.metrics(prefix="")
    for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"):
        assert got[key] == pytest.approx(expected[key], abs=0.01)
