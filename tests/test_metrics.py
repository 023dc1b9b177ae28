"""Metrics: IoU, R1/mIoU by hand, prediction files of both formats, and Moment-DETR's own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from timerefine.data.annotations import Query, read_annotations
from timerefine.metrics import (
    THRESHOLDS,
    Prediction,
    best_window_iou,
    format_table,
    read_predictions,
    score,
    temporal_iou,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

seconds = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


def query(qid: str, *windows: tuple[float, float], duration: float = 100.0) -> Query:
    return Query(qid=qid, video_id=f"video_{qid}", duration=duration, query="someone moves", windows=windows)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- temporal_iou ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ((0.0, 10.0), (5.0, 15.0), 5 / 15),
        ((2.0, 4.0), (0.0, 10.0), 2 / 10),
        ((0.0, 10.0), (0.0, 10.0), 1.0),
        ((0.0, 1.0), (1.0, 2.0), 0.0),  # touching, no overlap
        ((0.0, 1.0), (5.0, 9.0), 0.0),
        (None, (0.0, 10.0), 0.0),  # unparsed
        ((8.0, 2.0), (0.0, 10.0), 0.0),  # start > end
        ((3.0, 3.0), (3.0, 3.0), 0.0),  # zero-length union
        ((float("nan"), 4.0), (0.0, 10.0), 0.0),
        ((0.0, float("inf")), (0.0, 10.0), 0.0),
    ],
)
def test_temporal_iou_hand_computed(pred, gt, expected):
    assert temporal_iou(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_best_window_iou_takes_the_best_matching_window():
    assert best_window_iou((20.0, 30.0), [(0.0, 10.0), (20.0, 40.0)]) == pytest.approx(0.5)
    assert best_window_iou((20.0, 30.0), []) == 0.0


@given(seconds, seconds, seconds, seconds)
def test_iou_is_symmetric_and_bounded(a, b, c, d):
    forward = temporal_iou((a, b), (c, d))
    assert forward == temporal_iou((c, d), (a, b))
    assert 0.0 <= forward <= 1.0


@given(seconds, st.floats(min_value=1e-3, max_value=1e3))
def test_iou_of_identical_valid_windows_is_one(start, length):
    window = (start, start + length)
    assert temporal_iou(window, window) == 1.0


@given(seconds, st.floats(min_value=1e-3, max_value=1e3), st.floats(min_value=0, max_value=1e3), seconds)
def test_iou_of_disjoint_windows_is_zero(start, length, gap, second_length):
    first = (start, start + length)
    second_start = first[1] + gap
    second = (second_start, second_start + abs(second_length))
    assert temporal_iou(first, second) == 0.0


# --- score ----------------------------------------------------------------------------------------

GT = (0.0, 10.0)


def hand_case() -> tuple[list[Prediction], list[Query]]:
    """Five queries, IoUs 1, 0.6, 1/3, unparsed, missing; traces and head / fused answers on some."""
    queries = [query(qid, GT) for qid in ("q1", "q2", "q3", "q4", "q5")]
    predictions = [
        Prediction("q1", (0.0, 10.0), steps=((2.0, 12.0), (0.0, 10.0)), pred_head=(0.0, 5.0)),
        Prediction("q2", (0.0, 6.0), steps=((0.0, 6.0),), pred_head=(0.0, 10.0)),
        Prediction("q3", (5.0, 15.0)),
        Prediction("q4", (0.0, 10.0), parsed=False),  # a perfect window that did not parse is a miss
    ]
    return predictions, queries


def test_score_hand_computed_with_unparsed_and_missing():
    predictions, queries = hand_case()
    metrics = score(predictions, queries)
    assert (metrics["n"], metrics["unparsed"], metrics["missing"]) == (5, 1, 1)
    # IoUs: 1, 0.6, 1/3, 0, 0.
    assert metrics["R1@0.3"] == 60.0
    assert metrics["R1@0.5"] == 40.0
    assert metrics["R1@0.7"] == 20.0
    assert metrics["mIoU"] == round((1 + 0.6 + 1 / 3) / 5 * 100, 2)
    assert metrics["modes"]["text"] == {
        "n": 5,
        **{k: metrics[k] for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")},
    }


def test_score_per_mode_counts_absent_answers_as_misses():
    predictions, queries = hand_case()
    modes = score(predictions, queries)["modes"]
    assert set(modes) == {"text", "head"}  # no prediction carries a fused answer
    # head: q1 0.5, q2 1.0, the other three have no head answer.
    assert modes["head"] == {"n": 5, "R1@0.3": 40.0, "R1@0.5": 40.0, "R1@0.7": 20.0, "mIoU": 30.0}


def test_the_frames_answer_is_a_mode_and_grammar_overrules_are_counted(tmp_path):
    predictions, queries = hand_case()
    predictions[0] = Prediction("q1", (0.0, 10.0), pred_frames=(0.0, 10.0), off_grammar=False)
    predictions[2] = Prediction("q3", (5.0, 15.0), pred_frames=(0.0, 6.0), off_grammar=True)
    metrics = score(predictions, queries)
    assert metrics["modes"]["frames"]["mIoU"] == round((1 + 0.6) / 5 * 100, 2)
    assert metrics["off_grammar"] == 1
    assert "off_grammar" not in score(hand_case()[0], queries)  # free decoding says nothing of it
    record = {"qid": "q1", "pred": [0, 10], "pred_frames": [1, 9], "off_grammar": True}
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(record)])
    (read,) = read_predictions(path)
    assert read.pred_frames == (1.0, 9.0) and read.off_grammar is True
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(record | {"off_grammar": "yes"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'off_grammar'"):
        read_predictions(path)


def test_score_per_step_counts_shorter_traces_as_misses():
    predictions, queries = hand_case()
    steps = score(predictions, queries)["steps"]
    assert set(steps) == {"1", "2"}
    # step 1: q1 (2, 12) -> 8 / 12, q2 (0, 6) -> 0.6; step 2: only q1, exact.
    assert steps["1"] == {
        "n": 5,
        "R1@0.3": 40.0,
        "R1@0.5": 40.0,
        "R1@0.7": 0.0,
        "mIoU": round((8 / 12 + 0.6) / 5 * 100, 2),
    }
    assert steps["2"] == {"n": 5, "R1@0.3": 20.0, "R1@0.5": 20.0, "R1@0.7": 20.0, "mIoU": 20.0}


def test_score_without_traces_or_extra_modes_has_only_the_text_mode():
    metrics = score([Prediction("q1", (0.0, 5.0))], [query("q1", GT)])
    assert "steps" not in metrics
    assert list(metrics["modes"]) == ["text"]
    assert metrics["mIoU"] == 50.0


def test_vtimellm_compat_rounds_each_iou_before_thresholds():
    queries = [query("a", (0.0, 100.0)), query("b", (0.0, 100.0))]
    predictions = [Prediction("a", (0.0, 49.8)), Prediction("b", (0.0, 100 / 3))]  # IoUs 0.498, 0.333…
    plain = score(predictions, queries)
    rounded = score(predictions, queries, compat="vtimellm")
    assert plain["R1@0.5"] == 0.0 and rounded["R1@0.5"] == 50.0
    assert plain["mIoU"] == round((0.498 + 1 / 3) / 2 * 100, 2)
    assert rounded["mIoU"] == round((0.5 + 0.33) / 2 * 100, 2)
    assert (plain["compat"], rounded["compat"]) == (None, "vtimellm")


windows = st.tuples(st.floats(0, 100), st.floats(0.01, 100)).map(lambda w: (w[0], w[0] + w[1]))


@given(st.lists(st.tuples(windows, windows), min_size=1, max_size=30))
def test_vtimellm_compat_only_adds_hits_and_moves_miou_by_half_a_point(pairs):
    queries = [query(str(i), gt, duration=200.0) for i, (gt, _) in enumerate(pairs)]
    predictions = [Prediction(str(i), pred) for i, (_, pred) in enumerate(pairs)]
    plain = score(predictions, queries)
    rounded = score(predictions, queries, compat="vtimellm")
    # Thresholds have two decimals, so rounding to two decimals cannot drop an IoU below one it met.
    for threshold in THRESHOLDS:
        assert rounded[f"R1@{threshold}"] >= plain[f"R1@{threshold}"]
    exact_hits = sum(temporal_iou(pred, gt) == 1.0 for gt, pred in pairs)
    assert sum(round(temporal_iou(pred, gt), 2) == 1.0 for gt, pred in pairs) >= exact_hits
    assert abs(rounded["mIoU"] - plain["mIoU"]) <= 0.5 + 0.01  # 0.005 per IoU, then two decimals


def test_score_multi_window_uses_the_best_matching_window():
    metrics = score([Prediction("1", (20.0, 30.0))], [query("1", (0.0, 10.0), (20.0, 30.0))])
    assert metrics["R1@0.7"] == 100.0


def test_score_joins_on_string_qids():
    metrics = score([Prediction("7", (0.0, 10.0))], [Query("7", "v", 50.0, "x", (GT,))])
    assert metrics["missing"] == 0 and metrics["mIoU"] == 100.0


@pytest.mark.parametrize(
    ("predictions", "queries", "message"),
    [
        ([Prediction("stranger", GT)], [query("q1", GT)], "'stranger'"),
        ([Prediction("q1", GT), Prediction("q1", GT)], [query("q1", GT)], "two predictions"),
        ([], [query("q1", GT), query("q1", GT)], "twice in the annotations"),
        ([], [], "no annotated queries"),
        ([], [query("q1", GT), query("q2", GT)], "no predictions to score against 2 annotated queries"),
    ],
)
def test_score_rejects_joins_it_cannot_trust(predictions, queries, message):
    with pytest.raises(ValueError, match=message):
        score(predictions, queries)


def test_score_rejects_unknown_compat():
    with pytest.raises(ValueError, match="compat"):
        score([], [query("q1", GT)], compat="vtimellm2")


# --- read_predictions -----------------------------------------------------------------------------


def test_read_our_predictions(tmp_path):
    records = [
        {
            "qid": "a",
            "video_id": "v1",
            "query": "x",
            "duration": 30.0,
            "windows": [[1, 5]],
            "text": "...",
            "parsed": True,
            "steps": [[0, 8], [1, 6]],
            "pred": [1, 6],
            "pred_head": [1.5, 5.5],
            "pred_fused": [1.25, 5.75],
        },
        {"qid": 3, "video_id": "v2", "text": "no idea", "parsed": False, "steps": [], "pred": None},
    ]
    path = write_lines(tmp_path / "preds.jsonl", [json.dumps(r) for r in records] + [""])
    first, second = read_predictions(path)
    assert first == Prediction(
        qid="a",
        pred=(1.0, 6.0),
        parsed=True,
        pred_head=(1.5, 5.5),
        pred_fused=(1.25, 5.75),
        steps=((0.0, 8.0), (1.0, 6.0)),
        video_id="v1",
    )
    assert (second.qid, second.pred, second.parsed, second.steps) == ("3", None, False, ())


def test_read_moment_detr_predictions_takes_the_top_ranked_window(tmp_path):
    lines = [
        json.dumps({"qid": 11, "vid": "abc_0_150", "pred_relevant_windows": [[2, 30, 0.9], [0, 150, 0.1]]}),
        json.dumps({"qid": 12, "vid": "abc_0_150", "pred_relevant_windows": []}),
    ]
    top, empty = read_predictions(write_lines(tmp_path / "md.jsonl", lines))
    assert (top.qid, top.pred, top.parsed, top.video_id) == ("11", (2.0, 30.0), True, "abc_0_150")
    assert (empty.pred, empty.parsed) == (None, False)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"qid": "b", "pred": [1, 2]', "invalid JSON at column 28"),
        ('["b", 1, 2]', "JSON object"),
        ('{"qid": "b", "pred": [1]}', "'pred' must be"),
        ('{"qid": "b", "pred": ["1", 2]}', "'pred' must be"),
        ('{"qid": "b", "pred": [1, 2], "parsed": "yes"}', "'parsed'"),
        ('{"qid": null, "pred": [1, 2]}', "'qid'"),
        ('{"qid": "b", "pred": [1, 2], "steps": [[0, 1], null]}', "null segment"),
        ('{"qid": "b", "vid": "v", "pred_relevant_windows": [[1, 2, 0.5]]}', "missing field 'pred'"),
    ],
)
def test_read_predictions_names_file_and_line_of_a_bad_record(tmp_path, bad_line, message):
    good = json.dumps({"qid": "a", "pred": [0, 1]})
    path = write_lines(tmp_path / "preds.jsonl", [good, "", bad_line])
    with pytest.raises(ValueError, match=message) as raised:
        read_predictions(path)
    assert f"{path}:3:" in str(raised.value)


def test_read_predictions_rejects_a_file_of_neither_format(tmp_path):
    path = write_lines(tmp_path / "other.jsonl", [json.dumps({"qid": "a", "answer": [0, 1]})])
    with pytest.raises(ValueError, match=f"{path}:1:.*neither"):
        read_predictions(path)


# --- format_table ---------------------------------------------------------------------------------


def test_format_table_lines_up_rows_and_marks_absent_values():
    rows = {
        "fixed prior": {"n": 3720, "R1@0.3": 44.14, "R1@0.5": 30.46, "R1@0.7": 17.34, "mIoU": 29.57},
        "model": {"R1@0.3": 100.0, "R1@0.5": 5.0, "R1@0.7": 0.0, "mIoU": 33.333},
    }
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["name", "n", "R1@0.3", "R1@0.5", "R1@0.7", "mIoU"]
    assert set(lines[1]) == {"-"}
    assert len({len(line) for line in lines}) == 1
    assert lines[2].startswith("fixed prior") and lines[2].split()[2:] == [
        "3720",
        "44.14",
        "30.46",
        "17.34",
        "29.57",
    ]
    assert lines[3].split() == ["model", "-", "100.00", "5.00", "0.00", "33.33"]


# --- real reference data --------------------------------------------------------------------------


def test_reproduces_moment_detr_evaluator_on_qvhighlights_val(shared_data):
    queries, _ = read_annotations(shared_data / "annotations/qvhighlights/highlight_val_release.jsonl")
    predictions = read_predictions(shared_data / "peer_outputs/moment_detr_sample_val_preds.jsonl")
    reference = json.loads(
        (shared_data / "peer_outputs/moment_detr_sample_val_preds_metrics.json").read_text()
    )
    metrics = score(predictions, queries)
    assert (metrics["n"], metrics["missing"], metrics["unparsed"]) == (1550, 0, 0)
    assert metrics["R1@0.5"] == reference["brief"]["MR-full-R1@0.5"]
    assert metrics["R1@0.7"] == reference["brief"]["MR-full-R1@0.7"]
