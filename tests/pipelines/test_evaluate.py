"""Batch inference on Ray Data: predictions.jsonl and metrics.json, scored as metrics.score scores them."""

from __future__ import annotations

import json

import pytest

from pipelines import evaluate, jobs
from timerefine.data.annotations import read_annotations
from timerefine.metrics import read_predictions, score


@pytest.mark.integration
def test_evaluate_writes_predictions_and_the_metrics_of_that_file(
    tiny_benchmark, trained_run, ray_cluster, tmp_path, capsys
):
    out = tmp_path / "eval"
    args = [
        "--checkpoint", trained_run.summary["final_checkpoint"], "--features", str(tiny_benchmark.features),
        "--annotations", str(tiny_benchmark.annotations), "--output", str(out), "--batch-size", "3",
        "--draft-tokens", "0",  # token by token, while training validated with drafts (below)
    ]  # fmt: skip
    assert jobs.main(evaluate, args) == 0
    printed = capsys.readouterr().out
    assert "skipped 1" in printed and "answer: fused" in printed and "after step 2" in printed

    records = [json.loads(line) for line in (out / evaluate.PREDICTIONS_FILE).read_text().splitlines()]
    queries, _ = read_annotations(tiny_benchmark.annotations)
    with_features = [q for q in queries if q.video_id != "broken"]
    assert [r["qid"] for r in records] == [q.qid for q in with_features]  # annotation order, no failed video
    for record, query in zip(records, with_features, strict=True):
        assert record["windows"] == [list(w) for w in query.windows] and record["duration"] == query.duration
        assert set(record) >= {"text", "parsed", "steps", "pred", "pred_head", "pred_fused", "pred_frames"}

    metrics = json.loads((out / evaluate.METRICS_FILE).read_text())
    assert metrics == score(read_predictions(out / evaluate.PREDICTIONS_FILE), queries)
    assert metrics["n"] == len(queries) and metrics["missing"] == 1  # the query without features: a miss
    assert set(metrics["modes"]) == {"text", "head", "fused", "frames"}
    assert set(metrics["steps"]) == {"1", "2"}
    # The model memorised these queries in training: evaluation must see what validation saw (validation
    # decoded with drafts, this evaluation token by token: the answers are the same).
    best_val = max(m["val_mIoU"] for m in trained_run.summary["epochs"])
    assert metrics["modes"]["text"]["mIoU"] == pytest.approx(best_val * 8 / 9, abs=0.05)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--batch-size", "0", "--batch-size must be >= 1"),
        ("--draft-tokens", "-1", "--draft-tokens must be >= 0"),
        ("--cpus-per-actor", "0", "--cpus-per-actor must be > 0, got 0"),
    ],
)
def test_evaluate_refuses_bad_numbers_before_starting_anything(tmp_path, capsys, option, value, message):
    args = [
        "--checkpoint", str(tmp_path / "ckpt"), "--features", str(tmp_path / "features"),
        "--annotations", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"), option, value,
    ]  # fmt: skip
    assert jobs.main(evaluate, args) == jobs.EXIT_UNUSABLE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
