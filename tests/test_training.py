"""Training runs' data: joining annotations with features, the answers queries are trained on."""

from __future__ import annotations

from trainingdata import make_queries

from timerefine.timecodec import Schedule, parse_answer, time_to_bin
from timerefine.training import join_queries, train_score_subset, training_target


def test_join_skips_and_reports_queries_without_features():
    queries = make_queries(6)  # videos v0..v3
    joined, summary = join_queries(queries, {"v0", "v2"}, "train")
    assert [q.qid for q in joined] == ["q0", "q2", "q4"]
    assert (summary.queries, summary.joined, summary.skipped) == (6, 3, 3)
    assert summary.missing_videos == ["v1", "v3"]
    assert "skipped 3" in summary.describe() and "v1, v3" in summary.describe()


def test_targets_depend_on_the_query_not_on_order_and_per_epoch_only_when_asked():
    queries = make_queries(3)
    once = Schedule.preset(4)
    targets = [training_target(q, once, seed=0, epoch=0) for q in queries]
    assert targets == [training_target(q, once, seed=0, epoch=5) for q in queries]
    assert targets[::-1] == [training_target(q, once, seed=0, epoch=0) for q in queries[::-1]]
    per_epoch = Schedule.preset(4, per_epoch=True)
    drawn = {training_target(queries[0], per_epoch, seed=0, epoch=e) for e in range(5)}
    assert len(drawn) > 1
    for query, target in zip(queries, targets, strict=True):
        parsed = parse_answer(target)
        start, end = query.windows[0]
        assert parsed.ok and len(parsed.steps) == 4
        assert parsed.final_bins == (time_to_bin(start, 30.0), time_to_bin(end, 30.0))


def test_the_train_score_subset_spreads_over_the_set():
    queries = make_queries(10)
    assert [q.qid for q in train_score_subset(queries, 3)] == ["q0", "q3", "q6"]
    assert train_score_subset(queries, 0) == [] and len(train_score_subset(queries, 50)) == 10


def test_training_data_names_the_decoder_a_prediction_must_use():
    """PyAV only when PyAV read every video (an "auto" table made with decord reads the files decord
    cannot with PyAV, and so does a prediction with "auto"); nothing for tables that do not record it."""
    import numpy as np

    from timerefine.features import FeatureRow
    from timerefine.training import TrainingData

    def data(*decoders: str | None) -> TrainingData:
        rows = {
            f"v{i}": FeatureRow(f"v{i}", np.zeros((2, 3)), np.zeros(2), 1.0, 2.0, 2, f"/v{i}.mp4", "enc@1", d)
            for i, d in enumerate(decoders)
        }
        return TrainingData(rows, [], [], [])

    assert data("pyav", "pyav").video_decoder == "pyav"
    assert data("decord", "pyav").video_decoder == "decord"
    assert data("decord").video_decoder == "decord"
    assert data(None, None).video_decoder is None
